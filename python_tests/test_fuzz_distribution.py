"""Fuzzed parity of the distribution family (wasserstein_exact, gaussian_wasserstein, gaussian_kl, mmd,
class_conditional_wasserstein, joint_wasserstein) with its references: random cloud sizes (one or two points,
d = 1, odd sizes up to 1271 rows for the cheap losses), every dtype and mixed dtypes, non-contiguous and expanded
inputs (an expanded cloud is one point repeated: singular covariances, ties in the OT plans), duplicate points,
zero-variance columns, points shared by the two clouds, scales 1e-3 and 1e3, every kernel and option of mmd,
every class metric, and a non-uniform grad_output. See fuzz_support.py.

Where the reference is not differentiable at the drawn input, or its float64 gradient cannot be trusted (the
backward of torch.linalg.eigh divides by eigenvalue gaps and sqrt' is infinite at 0: singular or near-singular
covariances), the value is compared, and kdops' gradients are required to be finite. Where the reference is
another function (gaussian_kl's covariances below its eps floor, which the reference does not have) or undefined
(joint_wasserstein with every feature point equal), kdops' value and gradients are required to be finite. The
cases the fuzzing found kdops wrong on are kept as fixed examples at the end."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import F16, F64, FUZZ, Call, check, compute_dtype, dtype_pair, reference_grads, tensor
from kdops import functional as F
from kdops import reference as R

SCALES = [1.0, 1e3, 1e-3]
EXTREMES = ["none", "none", "duplicate points", "zero-variance column"]


def cloud_values(data, shape, scale, label):
    """float64 values of a cloud (..., n, d): normal times `scale`, with a drawn extreme: the second half of
    the points copies the first point (duplicate points), or one column is a constant (a dead dimension)."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="%s values seed" % label))
    v = torch.randn(shape, generator=g, dtype=F64) * scale
    extreme = data.draw(st.sampled_from(EXTREMES), label="%s extreme" % label)
    n, d = shape[-2:]
    if extreme == "duplicate points" and n > 1:
        v[..., n // 2:, :] = v[..., :1, :]
    elif extreme == "zero-variance column":
        k = data.draw(st.integers(0, d - 1), label="%s dead column" % label)
        v[..., k] = float(torch.randn((), generator=g, dtype=F64)) * scale
    return v


def share_points(data, xvals, yvals):
    """y's values, whose first half (of the smaller cloud) may be x's points: coincident student and teacher
    points (nearly coincident when the two dtypes round them differently)."""
    if data.draw(st.sampled_from([False, False, True]), label="y shares x's points"):
        k = (min(xvals.shape[-2], yvals.shape[-2]) + 1) // 2
        yvals = yvals.clone()
        yvals[..., :k, :] = xvals[..., :k, :]
    return yvals


def draw_clouds(data, ns, ms, ds_, same_size=False, mixed=True):
    n = data.draw(st.sampled_from(ns), label="n")
    m = n if same_size else data.draw(st.sampled_from(ms), label="m")
    d = data.draw(st.sampled_from(ds_), label="d")
    scale = data.draw(st.sampled_from(SCALES), label="scale")
    ratio = data.draw(st.sampled_from([1.0, 1.0, 0.5, 3.0]), label="teacher scale ratio")
    dx, dy = dtype_pair(data, mixed=mixed)
    xvals = cloud_values(data, (n, d), scale, "x")
    yvals = share_points(data, xvals, cloud_values(data, (m, d), scale * ratio, "y"))
    x, xv = tensor(data, (n, d), dx, label="x", values=xvals)
    y, yv = tensor(data, (m, d), dy, label="y", values=yvals)
    return x, xv, y, yv


def f64(view, leaf):
    """The exact values of an argument (the view of a leaf), in float64."""
    return view(leaf.detach()).to(F64)


def mass(view, leaf, npts):
    """The share of the cloud one entry of the leaf's gradient speaks for: 1 / npts, times the points an
    expanded leaf's row stands for (its gradient sums theirs). The gradient floors scale with it."""
    return max(1, view(leaf.detach()).numel() // leaf.numel()) / npts


def grad_scale(data):
    return data.draw(st.sampled_from([1.0, -3.7, 1e-3]), label="grad scale")


def moments(z):
    mu = z.mean(0)
    zc = z - mu
    return mu, zc.T @ zc / z.shape[0]


def spectrum_ok(a, typical, gaps=True):
    """Whether the float64 backward of torch.linalg.eigh on the symmetric `a` (and of sqrt of its eigenvalues)
    is accurate: eigenvalues above 1e-6 * typical (sqrt' = 1 / (2 sqrt(lambda)) stays moderate, and float64's
    eigenvalue error of 1e-16 * |a| is far below them) and apart by more than that (eigh's backward divides by
    the gaps)."""
    lam = torch.linalg.eigvalsh(0.5 * (a + a.T))
    tol = 1e-6 * typical
    if typical <= 0 or lam.min().item() <= tol:
        return False
    return not gaps or lam.numel() < 2 or (lam[1:] - lam[:-1]).min().item() > tol


def stds_ok(*clouds):
    """The reference's float64 gradient of a per-dimension std, (x - mu) / (n std), is trusted where every
    column's std is well above its rounding (a dead column, one point or all points equal: 0 / 0 or rounding
    noise over rounding noise, where the std is not differentiable)."""
    for z in clouds:
        if z.shape[0] < 2:
            return False
        std = z.std(0, correction=0)
        if not bool((std > 1e-6 * z.abs().amax(0)).all()) or not bool((std > 0).all()):
            return False
    return True


def bures_conditioned(x, y):
    """The reference's float64 gradient of the Bures distance is trusted where eigh is well-conditioned on S_x
    and on S_x^1/2 S_y S_x^1/2 (the two matrices it takes square roots of)."""
    _, sx = moments(x)
    _, sy = moments(y)
    d = x.shape[1]
    tx, ty = sx.trace().item() / d, sy.trace().item() / d
    if not spectrum_ok(sx, tx):
        return False
    lam, u = torch.linalg.eigh(sx)
    root = (u * lam.clamp_min(0).sqrt()) @ u.T
    return spectrum_ok(root @ sy @ root, tx * ty)


def _value_and_grads(fn, call, leaves):
    out = fn(*call.make(leaves), **dict(call.kwargs, **call.ours_kwargs))
    grads = torch.autograd.grad(out.sum() * call.grad_scale, leaves, allow_unused=True)
    return out, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


def assert_finite_grads(name, fn, call):
    """kdops' value and gradients are finite (where the reference gives nothing to compare them with): no NaN,
    and no inf but where the gradient overflows its input's dtype (kdops computes 16-bit inputs in fp32, and
    its own run on the same values in that dtype says by how much)."""
    out, grads = _value_and_grads(fn, call, call.leaves)
    assert torch.isfinite(out).all(), "%s: value %s" % (name, out)
    acc = F64 if any(t.dtype == F64 for t in call.leaves) else torch.float32
    _, grads64 = _value_and_grads(fn, call, [t.detach().to(acc).requires_grad_() for t in call.leaves])
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        representable = g64.abs() < torch.finfo(g.dtype).max / 2
        bad = torch.isnan(g) | (~torch.isfinite(g) & representable)
        assert not bad.any(), "%s: gradient %d (%s) not finite:\n%s\nin %s:\n%s" % (name, i, g.dtype, g, acc, g64)


def fit_grad_scale(call, ref_fn):
    """Scales grad_output (call.grad_scale, and grad_floor with it) by a power of 2 so that the largest
    gradient entry of the fp16 leaves is about 2^8: fp16's range (6e-5 to 65504, subnormals below) cannot hold
    these losses' gradients at every scale (1e12 for a KL against a dead teacher dimension, 1e-7 for a cost
    normalised by |x|^2 ~ 1e6), and an entry that overflows or is subnormal is fp16's rounding, not the loss's
    error. The size comes from the reference's float64 gradients."""
    halves = [i for i, t in enumerate(call.leaves) if t.dtype == F16]
    if not halves:
        return call
    _, grads = reference_grads(ref_fn, call, F64)
    gmax = 0.0
    for i in halves:
        g = grads[i][torch.isfinite(grads[i])]
        if g.numel():
            gmax = max(gmax, g.abs().max().item())
    gmax = max(gmax, call.grad_floor)  # a gradient that cancels to ~0 is rounding: not its size
    if gmax > 0:  # (within fp32's range: grad_output reaches the kernels in the fp32 of the result)
        k = 2.0 ** min(max(round(math.log2(2.0 ** 8 / gmax)), -60), 60)
        call.grad_scale *= k
        call.grad_floor *= k
    return call


def pair_call(x, xv, y, yv, kwargs=None, ours_kwargs=None, **floors):
    return Call([x, y], lambda leaves, xv=xv, yv=yv: [xv(leaves[0]), yv(leaves[1])], kwargs or {},
                ours_kwargs or {}, **floors)


# ---- exact W2 ----

# the reference run in fp16 overflows its costs at scale 1e3 (inf, NaN) and POT warns of it; fuzz_support then
# measures PyTorch's error in fp32 instead
@pytest.mark.filterwarnings("ignore:Problem unbounded")
@pytest.mark.filterwarnings("ignore:Problem infeasible")
@pytest.mark.parametrize("square", [True, False], ids=["n=m", "n!=m"])
@FUZZ
@given(data=st.data())
def test_wasserstein_exact_matches_reference(square, data):
    # n = m takes kdops' permutation path, n != m (mostly) the dense plan; both solve the same float64 cost
    # with ot.emd
    x, xv, y, yv = draw_clouds(data, [1, 2, 3, 7, 33, 64], [1, 2, 5, 31, 64], [1, 2, 5, 16, 65], same_size=square)
    x64, y64 = f64(xv, x), f64(yv, y)
    # the value is <P, C>: it sums plan-weighted squared norms |x|^2 + |y|^2 (the reference's expansion), which
    # cancel to W2^2 ~ 0 for near-identical clouds
    floor = (x64.square().sum(1).mean() + y64.square().sum(1).mean()).item()
    # a gradient entry is 2 sum_j P_ij (x_i - y_j) (rows of P summing to 1 / n, columns to 1 / m): terms of
    # size 2 max|z| / min(n, m) (see mass()), which cancel where a point sits at its image's barycentre
    gs = grad_scale(data)
    share = max(mass(xv, x, x64.shape[0]), mass(yv, y, y64.shape[0]))
    gfloor = abs(gs) * 2 * torch.cat([x64, y64]).abs().max().item() * share
    call = pair_call(x, xv, y, yv, grad_scale=gs, value_floor=floor, grad_floor=gfloor)
    check("wasserstein_exact", F.wasserstein_exact, R.wasserstein_exact, fit_grad_scale(call, R.wasserstein_exact))


# ---- Gaussian W2 ----

@pytest.mark.parametrize("diagonal", [False, True])
@FUZZ
@given(data=st.data())
def test_gaussian_wasserstein_matches_reference(diagonal, data):
    x, xv, y, yv = draw_clouds(data, [1, 2, 3, 7, 33, 1271], [2, 5, 40, 1271], [1, 2, 5, 16, 40])
    x64, y64 = f64(xv, x), f64(yv, y)
    mx, sx = moments(x64)
    my, sy = moments(y64)
    # the value |mu_x - mu_y|^2 + tr S_x + tr S_y - 2 tr(cross) sums terms of the size of the second moments,
    # and cancels to ~0 for clouds from one distribution
    floor = (mx.square().sum() + my.square().sum() + sx.trace() + sy.trace()).item()
    trusted = stds_ok(x64, y64) if diagonal else bures_conditioned(x64, y64)
    # x_i's gradient is (2 / n) [(mu_x - mu_y) + (I - T)(x_i - mu_x)], T the Monge map between the Gaussians
    # (y's likewise with T^-1): terms of size (2 / n)(|mu_x - mu_y| + (1 + |T|) max|x_i - mu_x|), which cancel
    # for near-identical clouds; |T| <= sqrt(max eig S_y / min eig S_x) (per dimension s_y / s_x if diagonal)
    gs = grad_scale(data)
    gfloor = 0.0
    if trusted:
        vx, vy = (sx.diagonal(), sy.diagonal()) if diagonal else (torch.linalg.eigvalsh(sx), torch.linalg.eigvalsh(sy))
        t = max((vy.max() / vx.min()).sqrt().item(), (vx.max() / vy.min()).sqrt().item())
        spread = max((x64 - mx).abs().max().item(), (y64 - my).abs().max().item())
        share = max(mass(xv, x, x64.shape[0]), mass(yv, y, y64.shape[0]))
        gfloor = abs(gs) * 2 * share * ((mx - my).norm().item() + (1 + t) * spread)
    call = pair_call(x, xv, y, yv, {"diagonal": diagonal}, grad_scale=gs, value_floor=floor, grad_floor=gfloor)
    # square roots of (near-)singular covariances (n <= d, dead dimensions, duplicate points) lose half the
    # digits, the reference's as kdops' (test_dtypes.ILL_CONDITIONED says so of the class-conditional losses,
    # whose classes are small): eps ** 0.5 there
    singular = not diagonal and not all(spectrum_ok(s_, s_.trace().item() / s_.shape[0], gaps=False) for s_ in (sx, sy))
    floor_eps = torch.finfo(compute_dtype(call)).eps ** 0.5 if singular else None
    check("gaussian_wasserstein", F.gaussian_wasserstein, R.gaussian_wasserstein,
          fit_grad_scale(call, R.gaussian_wasserstein), floor_eps=floor_eps, compare_grads=trusted)
    if not trusted:
        assert_finite_grads("gaussian_wasserstein", F.gaussian_wasserstein, call)


# ---- Gaussian KL ----

def kl_terms(x, y, diagonal, eps):
    """The absolute sizes of the terms the KL sums (float64), and whether the reference computes the same
    function: the full form clamps no eigenvalue in the reference, kdops clamps them at eps^2, so the two agree
    where every eigenvalue of both covariances is above eps^2."""
    mx, cx = moments(x)
    my, cy = moments(y)
    if diagonal:
        sx = x.std(0, correction=0).clamp_min(eps)
        sy = y.std(0, correction=0).clamp_min(eps)
        terms = (torch.log(sy / sx).abs() + (sx ** 2 + (mx - my) ** 2) / (2 * sy ** 2) + 0.5).sum()
        return terms.item(), True
    lx, ly = torch.linalg.eigvalsh(cx), torch.linalg.eigvalsh(cy)
    same = bool(lx.min() > eps * eps) and bool(ly.min() > eps * eps)
    if not same:
        return 0.0, False
    inv_y = torch.linalg.inv(cy)
    delta = my - mx
    terms = 0.5 * ((inv_y * cx).sum().abs() + delta @ inv_y @ delta + x.shape[1] + ly.log().sum().abs()
                   + lx.log().sum().abs())
    return terms.item(), True


@pytest.mark.parametrize("diagonal", [True, False])
@FUZZ
@given(data=st.data())
def test_gaussian_kl_matches_reference(diagonal, data):
    x, xv, y, yv = draw_clouds(data, [1, 2, 7, 33, 1271], [2, 3, 40, 1271], [1, 2, 5, 16])
    eps = data.draw(st.sampled_from([1e-6, 1e-3, 0.3]), label="eps")
    x64, y64 = f64(xv, x), f64(yv, y)
    floor, same = kl_terms(x64, y64, diagonal, eps)
    # x_i's gradient is (1 / n) [S_y^-1 (x_i - mu_x) - S_x^-1 (x_i - mu_x) + S_y^-1 (mu_x - mu_y)] (y's has
    # S_y^-1 S_x S_y^-1 in it): terms of size (1 / n) (1 + max eig S_x / min eig S_y) (max|z_i - mu| +
    # |mu_x - mu_y|) / min eig, eigenvalues (variances) floored at eps^2, which cancel for near-identical clouds
    gs = grad_scale(data)
    mx, cx = moments(x64)
    my, cy = moments(y64)
    lx, ly = (cx.diagonal(), cy.diagonal()) if diagonal else (torch.linalg.eigvalsh(cx), torch.linalg.eigvalsh(cy))
    lx, ly = lx.clamp_min(eps * eps), ly.clamp_min(eps * eps)
    spread = max((x64 - mx).abs().max().item(), (y64 - my).abs().max().item()) + (mx - my).norm().item()
    share = max(mass(xv, x, x64.shape[0]), mass(yv, y, y64.shape[0]))
    gfloor = abs(gs) * share * (1 + (lx.max() / ly.min()).item()) * spread / min(lx.min(), ly.min()).item()
    call = pair_call(x, xv, y, yv, {"diagonal": diagonal, "eps": eps}, grad_scale=gs, value_floor=floor,
                     grad_floor=gfloor)
    if not same:
        # an eigenvalue below kdops' floor eps^2: the reference (no floor) is another function there
        assert_finite_grads("gaussian_kl", F.gaussian_kl, call)
        return
    # the full form differentiates inv and logdet, accurate in float64 away from the floor; the diagonal one a
    # std clamped at eps (no gradient below it), whose gradient just above it is that of std
    trusted = not diagonal or stds_ok(x64, y64)
    check("gaussian_kl", F.gaussian_kl, R.gaussian_kl, fit_grad_scale(call, R.gaussian_kl), compare_grads=trusted)
    if not trusted:
        assert_finite_grads("gaussian_kl", F.gaussian_kl, call)


# ---- MMD ----

def draw_kernel(data, kernel, unit_scale):
    kw = {"kernel": kernel}
    if kernel == "rbf":
        bw = data.draw(st.sampled_from([None, None, "x0.1", "x1", "x30"]), label="bandwidth")
        if bw is not None:
            kw["bandwidth"] = float(bw[1:])
    elif kernel == "poly":
        kw["degree"] = data.draw(st.sampled_from([1, 2, 3, 4, 6, 9]), label="degree")
        # the default 1 / d only for clouds of unit scale: at 1e3, (<x, y> / d)^degree ~ 1e6^9 overflows the
        # fp32 the loss computes in, at 1e-3 (1e-6)^9 underflows it; otherwise gamma is relative to the clouds
        # (see the caller)
        gamma = data.draw(st.sampled_from([None, 0.3, -0.5, 2.0]), label="gamma")
        if gamma is not None or not unit_scale:
            kw["gamma"] = 1.0 if gamma is None else gamma
        kw["coef0"] = data.draw(st.sampled_from([1.0, 0.0, -0.7, 3.0]), label="coef0")
    return kw


@pytest.mark.parametrize("kernel", ["rbf", "poly", "linear"])
@FUZZ
@given(data=st.data())
def test_mmd_matches_reference(kernel, data):
    x, xv, y, yv = draw_clouds(data, [1, 2, 3, 7, 33, 1271], [1, 2, 5, 64, 257], [1, 3, 17, 64])
    x64, y64 = f64(xv, x), f64(yv, y)
    d = x64.shape[1]
    zmax = torch.cat([x64, y64]).abs().max().item()
    kw = draw_kernel(data, kernel, unit_scale=0.1 < zmax < 30)
    if "bandwidth" in kw:  # relative to the clouds' size: the kernel is neither all 0 nor all 1
        kw["bandwidth"] *= max(zmax, 1e-30) * math.sqrt(d)
    if kw["kernel"] == "poly" and "gamma" in kw:  # gamma <x, y> of order 1 whatever the scale
        kw["gamma"] /= max(zmax * zmax * d, 1e-30)
    save_blocks = data.draw(st.sampled_from([None, True, False]), label="save_blocks")
    check_mmd(mmd_call(x, xv, y, yv, kw, {"save_blocks": save_blocks}, grad_scale(data)))


def mmd_call(x, xv, y, yv, kw, ours_kw, gs):
    x64, y64 = f64(xv, x), f64(yv, y)
    z = torch.cat([x64, y64])
    zmax, d = z.abs().max().item(), z.shape[1]
    # the value is a sum of three kernel means (for linear the reference's Gram means, |mean|^2-sized), which
    # cancel to ~0 when x and y come from one distribution; their size bounds the error
    if kw["kernel"] == "rbf":
        floor = 3.0  # 0 < k <= 1
    elif kw["kernel"] == "poly":
        gamma = kw.get("gamma", 1.0 / d)
        floor = 3.0 * (gamma * (z @ z.T) + kw.get("coef0", 1.0)).abs().pow(kw.get("degree", 3)).max().item()
    else:
        floor = (x64.mean(0).square().sum() + y64.mean(0).square().sum()).item()
    # a gradient entry sums (2 / n) beta_ij (x_j - x_i) over x's points and (2 / m) beta_ij (y_j - x_i) over
    # y's (dk / dx_i = alpha x_i + beta y_j), each formed (by kdops and by the reference's autograd through its
    # Gram matrices alike) as beta_ij x_j - beta_ij x_i: terms of size (2 / min(n, m)) max|beta| max|z|, which
    # cancel where the points balance. For rbf, beta_ij = exp(-d^2 / 2 sigma^2) / sigma^2 over the pairs of
    # distinct points: a point with itself or its duplicate adds exactly 0 (the reference's clamp of d^2 at 0
    # drops it)
    if kw["kernel"] == "rbf":
        dist = torch.cdist(z, z)
        if "bandwidth" in kw:
            sigma = kw["bandwidth"]
        else:
            nz = z.shape[0]
            sigma = dist.sum().item() / (nz * nz - nz) if nz > 1 else 0.0
        norms = z.norm(dim=1)
        size = torch.maximum(norms[:, None], norms[None, :])
        pair = torch.where(dist > 0, torch.exp(-dist.square() / (2 * sigma ** 2)) * size, torch.zeros_like(dist))
        terms = pair.max().item() / sigma ** 2 if sigma > 0 else 0.0
    elif kw["kernel"] == "poly":
        gamma, degree = kw.get("gamma", 1.0 / d), kw.get("degree", 3)
        beta = degree * abs(gamma) * (gamma * (z @ z.T) + kw.get("coef0", 1.0)).abs().pow(degree - 1).max().item()
        terms = beta * zmax
    else:
        terms = zmax
    gfloor = abs(gs) * 2 * max(mass(xv, x, x64.shape[0]), mass(yv, y, y64.shape[0])) * terms
    return pair_call(x, xv, y, yv, kw, ours_kw, grad_scale=gs, value_floor=floor, grad_floor=gfloor)


def check_mmd(call):
    # the float64 reference is itself only accurate to (n + m) eps64: it takes its kernel means (and their
    # gradients) as n- and m-long BLAS sums, sequential and, with duplicate points, with systematic roundings
    # (1271 points: 14 eps64 seen, where kdops' linear MMD is exact); only float64 runs are affected
    n, m = (a.shape[0] for a in call.args)
    check("mmd", F.mmd, R.mmd, fit_grad_scale(call, R.mmd), floor_eps=(n + m) * torch.finfo(F64).eps)


# ---- class-conditional ----

def class_conditional_ref(x, y, labels, metric="exact", **kw):
    if metric != "sinkhorn":
        return R.class_conditional_wasserstein(x, y, labels, metric, **kw)
    # the reference has no sinkhorn metric: the sum over the classes of R.sinkhorn, as kdops defines it
    total = 0.0
    for c in torch.unique(labels).tolist():
        m = labels == c
        total = total + R.sinkhorn(x[m], y[m], **kw)
    return total


@pytest.mark.parametrize("metric", ["exact", "gaussian", "gaussian-diagonal", "sinkhorn"])
@FUZZ
@given(data=st.data())
def test_class_conditional_wasserstein_matches_reference(metric, data):
    # sinkhorn: the reference's loop is differentiated by autograd per class, kept to 64 points
    sizes = [1, 2, 7, 33, 64] if metric == "sinkhorn" else [1, 2, 7, 33, 200]
    x, xv, y, yv = draw_clouds(data, sizes, None, [1, 3, 8], same_size=True)
    x64, y64 = f64(xv, x), f64(yv, y)
    n = x64.shape[0]
    classes = data.draw(st.sampled_from([1, 2, 3, 10]), label="classes")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000), label="labels seed"))
    labels = torch.randint(0, classes, (n,), generator=g) * 3  # sparse class ids, some absent
    if data.draw(st.booleans(), label="a singleton class"):
        labels[0] = 100
    kw, ours_kw, floor_eps = {}, {}, None
    gs = grad_scale(data)
    trusted = True
    if metric.startswith("gaussian"):
        kw["metric"] = "gaussian"
        kw["diagonal"] = metric.endswith("diagonal")
        # classes of a few samples have (near-)singular covariances, whose square roots lose half the digits
        # (test_dtypes.ILL_CONDITIONED): eps ** 0.5
        floor_eps = lambda e: e ** 0.5  # noqa: E731
        ok = stds_ok if kw["diagonal"] else bures_conditioned
        trusted = all(ok(x64[labels == c], y64[labels == c]) for c in labels.unique() if int((labels == c).sum()) > 1)
    elif metric == "sinkhorn":
        kw["metric"] = "sinkhorn"
        cmax = (torch.cdist(x64, y64).square().max().item() / 2) or 1.0
        kw["eps"] = data.draw(st.sampled_from([0.1, 1.0]), label="eps / max cost") * cmax
        kw["max_iter"] = 50  # both converge to 1e-10 in 50 iterations for eps >= 0.1 max C, uniform weights
        ours_kw["tol"] = data.draw(st.sampled_from([0.0, 1e-9]), label="tol / eps") * kw["eps"]
        # kdops stops at tol, the reference runs its fixed iterations (test_dtypes.ILL_CONDITIONED)
        floor_eps = lambda e: max(e, 1e-6)  # noqa: E731
    else:
        kw["metric"] = "exact"
    # per class, terms of the size of the class's second moments (see the unconditional tests), summed; for
    # sinkhorn also eps log(n_c^2 + 1), the log-sum-exp's terms (see test_fuzz_ot)
    floor = sum((x64[labels == c].square().sum(1).mean() + y64[labels == c].square().sum(1).mean()).item()
                + kw.get("eps", 0.0) * math.log(int((labels == c).sum()) ** 2 + 1) for c in labels.unique())
    # a gradient entry is 2 sum_j P_ij (x_i - y_j) within its class (or the Gaussian map's, or sum_j P_ij
    # (x_i - y_j) for sinkhorn's |x - y|^2 / 2): terms of size 2 max|z| / n_c, n_c the smallest class (an
    # expanded leaf's entry sums every row: n_c / n_c per class)
    smallest = min(int((labels == c).sum()) for c in labels.unique())
    expanded = mass(xv, x, 1) > 1 or mass(yv, y, 1) > 1
    share = len(labels.unique()) if expanded else 1.0 / smallest
    gfloor = abs(gs) * 2 * torch.cat([x64, y64]).abs().max().item() * share
    call = Call([x, y], lambda leaves, xv=xv, yv=yv, labels=labels: [xv(leaves[0]), yv(leaves[1]), labels],
                dict(kw), ours_kw, grad_scale=gs, value_floor=floor, grad_floor=gfloor)
    eps = None if floor_eps is None else floor_eps(torch.finfo(compute_dtype(call)).eps)
    check("class_conditional_wasserstein", F.class_conditional_wasserstein, class_conditional_ref,
          fit_grad_scale(call, class_conditional_ref),
          floor_eps=eps, compare_grads=trusted)
    if not trusted:
        assert_finite_grads("class_conditional_wasserstein", F.class_conditional_wasserstein, call)


# ---- joint ----

@pytest.mark.filterwarnings("ignore:Problem unbounded")  # the fp16 reference's costs, as for wasserstein_exact
@pytest.mark.filterwarnings("ignore:Problem infeasible")
@FUZZ
@given(data=st.data())
def test_joint_wasserstein_matches_reference(data):
    x, xv, y, yv = draw_clouds(data, [1, 2, 7, 33, 64], [2, 3, 20, 64], [1, 5])
    n, m = f64(xv, x).shape[0], f64(yv, y).shape[0]
    c = data.draw(st.sampled_from([1, 2, 10]), label="classes")
    lscale = data.draw(st.sampled_from([1.0, 5.0, 1e-3]), label="logit scale")
    dlx, dly = dtype_pair(data)
    lx, lxv = tensor(data, (n, c), dlx, lscale, label="logits_x")
    ly, lyv = tensor(data, (m, c), dly, lscale, label="logits_y")
    beta = data.draw(st.sampled_from([1.0, 0.0, 0.3, 10.0]), label="beta")
    gs = grad_scale(data)
    # the cost is normalised to max 1 for the features, plus beta |p - q|^2 <= 2 beta: <P, C> sums terms of
    # size 1 + 2 beta (the expansions |x|^2 + |y|^2 - 2 <x, y> / max C of the features)
    x64, y64 = f64(xv, x), f64(yv, y)
    cmax = torch.cdist(x64, y64).square().max().item()
    norms = (x64.square().sum(1).max() + y64.square().sum(1).max()).item()
    floor = norms / cmax + 2 * beta if cmax > 0 else 1.0
    # a feature gradient entry is 2 sum_j P_ij (x_i - y_j) / max C, a logit one beta 2 sum_j P_ij (p_i - q_j)
    # through the softmax: terms of size (2 max|z| / max C + beta) 2 / min(n, m) (see mass())
    zmax = torch.cat([x64, y64]).abs().max().item()
    share = max(mass(v, t, k) for v, t, k in ((xv, x, n), (yv, y, m), (lxv, lx, n), (lyv, ly, m)))
    gfloor = abs(gs) * (2 * zmax / cmax + beta) * 2 * share if cmax > 0 else 0.0
    call = Call([x, y, lx, ly],
                lambda leaves, vs=(xv, yv, lxv, lyv): [v(t) for v, t in zip(vs, leaves)],
                {"beta": beta}, grad_scale=gs, value_floor=floor, grad_floor=gfloor)
    if cmax == 0:
        # every feature point the same: the reference divides its feature cost by max C = 0 (NaN value, NaN
        # plan, zero gradients), kdops clamps the normaliser and is left with the label term
        assert_finite_grads("joint_wasserstein", F.joint_wasserstein, call)
        return
    check("joint_wasserstein", F.joint_wasserstein, R.joint_wasserstein, fit_grad_scale(call, R.joint_wasserstein))


# ---- cases the fuzzing found, kept as fixed examples ----

def same(t):
    return t


def test_mmd_rbf_gradient_of_distant_points():
    # One point per cloud, 5.7 bandwidths apart (a drawn bandwidth of 0.1 max|z|): the gradient, 2 k(x, y)
    # (x - y) / sigma^2 = 6.2e-6, is what the fp32 reference gives to 1e-6. kdops' backward forms
    # W x - rowsum(W) x with the self pair's weight 2 / (n^2 sigma^2) in it (the largest weight, whose term is
    # exactly 0) and cancels that only after the x-y block is added: an error of eps32 2 |x| / sigma^2, 1e-5.
    x, y = torch.tensor([[1.5410]]), torch.tensor([[0.6614]])
    check_mmd(mmd_call(x.requires_grad_(), same, y.requires_grad_(), same, {"kernel": "rbf", "bandwidth": 0.1541},
                       {}, 1.0))


def test_mmd_rbf_gradient_of_a_single_teacher_point():
    # 1271 student points (the second half one point repeated) against one teacher point, the default
    # bandwidth: the teacher's gradient accumulates 1271 x-y terms onto its own self-pair term W_yy y (later
    # cancelled), so it is off by 1e-4 in fp32 where the fp32 reference is within 2e-6.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1271, 1, generator=g, dtype=F64)
    x[1271 // 2:] = x[0]
    y = torch.randn(1, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    check_mmd(mmd_call(x.float().requires_grad_(), same, y.float().requires_grad_(), same, {"kernel": "rbf"}, {},
                       1.0))


def test_gaussian_wasserstein_of_one_point_repeated():
    # Three equal fp32 points in 40 dimensions: the covariance is rounding noise (entries ~1e-14, rank 1),
    # on which fp32 torch.linalg.eigh fails to converge (LinAlgError); kdops raises it. The reference fails
    # the same way in fp32 (not in fp64); kdops' square roots claim singular covariances (a single sample,
    # n <= d) as their case.
    x0 = torch.randn(3, 40, generator=torch.Generator().manual_seed(3306), dtype=F64)[:1].float()
    y = torch.randn(2, 40, generator=torch.Generator().manual_seed(0), dtype=F64).float()
    call = Call([x0.requires_grad_(), y.requires_grad_()], lambda t: [t[0].expand(3, 40), t[1]])
    assert_finite_grads("gaussian_wasserstein", F.gaussian_wasserstein, call)
