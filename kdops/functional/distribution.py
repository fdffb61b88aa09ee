"""Distribution-matching losses of KD2M's metric family between point clouds of features.

x (student) is (n, d), y (teacher) is (m, d): the rows are samples (pre-classifier features of one batch), the
clouds carry uniform weights and need equal widths d (map the student to the teacher's width first). Every
function returns a 0-dim tensor in the accumulation dtype (fp32 for fp16 / bf16 / fp32, fp64 for fp64);
gradients flow to x and, when it requires grad, to y. x and y of different float dtypes are promoted, and under
autocast every loss is computed as outside it (:mod:`kdops.functional._dtypes`).

Only :func:`mmd` is a fused kernel (kdops::mmd): its cost is the three Gram blocks and what is done with them.
The other losses are compositions of ATen ops (a d x d covariance and its eigendecomposition, one GEMM) or of
POT's exact solver on the host, where a custom kernel would buy nothing: their time is in cuSOLVER / LAPACK's
eigh, the GEMM, or the network simplex.
"""

import math
import numbers

import torch

from kdops._ops import distribution as _ops_distribution
from kdops.functional import _dtypes
from kdops.functional._checks import check_number
from kdops.functional.ot import sinkhorn as _sinkhorn


def _check_clouds(name, x, y, same_size=False):
    for arg, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError("%s: %s must be a floating-point tensor, got %s"
                             % (name, arg, getattr(t, "dtype", type(t).__name__)))
        if t.dim() != 2:
            raise ValueError("%s: %s must be a point cloud of shape (n, d), got %s" % (name, arg, tuple(t.shape)))
        if t.shape[0] == 0:
            raise ValueError("%s: %s is an empty cloud (shape %s); at least one point is needed"
                             % (name, arg, tuple(t.shape)))
    if x.shape[1] != y.shape[1]:
        raise ValueError("%s: x and y must have the same feature dim d, got x %s and y %s"
                         % (name, tuple(x.shape), tuple(y.shape)))
    if x.device != y.device:
        raise ValueError("%s: x and y must be on the same device, got %s and %s" % (name, x.device, y.device))
    if same_size and x.shape[0] != y.shape[0]:
        raise ValueError("%s: x and y must hold the same number of points (paired samples), got %d and %d"
                         % (name, x.shape[0], y.shape[0]))
    return _dtypes.promote(x, y)


def _sq_dists(x, y):
    """|x_i - y_j|^2 (n, m) from the Gram matrix, clamped at 0 against cancellation."""
    return ((x * x).sum(1, keepdim=True) + (y * y).sum(1) - 2.0 * (x @ y.T)).clamp_min(0.0)


# ---- exact W2 ----

def _plan_cost(x, y, plan):
    """sum_ij P_ij |x_i - y_j|^2 without forming the (n, m) cost: the plan's marginals weight the squared
    norms and one GEMM gives the cross term."""
    return plan.sum(1) @ (x * x).sum(1) + plan.sum(0) @ (y * y).sum(1) - 2.0 * (x * (plan @ y)).sum()


@_dtypes.loss
def wasserstein_exact(x, y):
    """Squared exact 2-Wasserstein distance W2^2 between uniform clouds x (n, d) and y (m, d).

    The plan comes from POT's ``ot.emd`` (network simplex, float64, on the host) for the cost
    C_ij = |x_i - y_j|^2 and is held fixed: no gradient goes through the solver, so the gradient is that of
    <P, C> at the optimal P (which is the gradient of W2^2 wherever the optimal plan is unique).
    For n = m the plan is a permutation sigma / n and the loss is (1/n) sum_i |x_i - y_sigma(i)|^2, computed
    from the differences directly; the backward keeps sigma and the inputs, no (n, d) difference. For n != m
    it is <P, C> with the dense plan, through the expansion |x|^2 + |y|^2 - 2 <x, y> (one GEMM, no (n, m)
    cost kept for the backward), which loses digits when W2^2 is tiny next to the squared norms.
    """
    x, y = _check_clouds("wasserstein_exact", x, y)
    acc = _dtypes.acc_of(x, y)
    with torch.no_grad():
        cost = _sq_dists(x.detach().double(), y.detach().double())
    if x.shape[0] == y.shape[0]:
        perm = torch.ops.kdops.emd_permutation(cost)
        return torch.ops.kdops.permuted_sq_dist(x, y, perm)
    plan = torch.ops.kdops.emd_plan(cost).to(acc)
    return _plan_cost(x.to(acc), y.to(acc), plan)


# ---- Gaussian: W2 (Bures) and KL ----

def _eigh(a):
    """torch.linalg.eigh, retried in float64 where LAPACK's float32 solver fails to converge (it does on the
    rounding-noise covariance of repeated points, e.g. three equal points in 40 dimensions); the result is cast
    back. Under torch.compile the plain call is traced."""
    if torch.compiler.is_compiling() or a.dtype == torch.float64:
        return torch.linalg.eigh(a)
    try:
        return torch.linalg.eigh(a)
    except torch.linalg.LinAlgError:
        lam, u = torch.linalg.eigh(a.double())
        return lam.to(a.dtype), u.to(a.dtype)


class _SymmetricFunction(torch.autograd.Function):
    """f(A) = U diag(f(lambda)) U^T for a symmetric A, f = sqrt or inverse of the eigenvalues clamped from below.

    The backward is the Daleckii-Krein formula dA = U (K o sym(U^T dF U)) U^T with the divided differences
    K_ij = (f_i - f_j) / (lambda_i - lambda_j), and f'((lambda_i + lambda_j) / 2) where the two eigenvalues
    are closer than a relative tolerance. Unlike differentiating through eigh (which divides by
    lambda_i - lambda_j), this stays finite for repeated eigenvalues, e.g. the many zero eigenvalues of a
    covariance estimated from fewer samples than dimensions. Eigenvalues below `floor` count as `floor`
    (sqrt: as 0) and pass no gradient.
    """

    @staticmethod
    def forward(a, kind, floor):
        lam, u = _eigh(a)
        keep = lam > floor
        lam_c = torch.where(keep, lam, torch.zeros_like(lam) if kind == "sqrt" else floor.expand_as(lam))
        if kind == "sqrt":
            f = lam_c.sqrt()
            fp = torch.where(keep, 0.5 / f.clamp_min(torch.finfo(f.dtype).tiny), torch.zeros_like(f))
        else:
            f = 1.0 / lam_c
            fp = torch.where(keep, -f * f, torch.zeros_like(f))
        return (u * f) @ u.T, u, lam_c, f, fp

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, u, lam, f, fp = output
        ctx.save_for_backward(u, lam, f, fp)
        ctx.mark_non_differentiable(u, lam, f, fp)

    @staticmethod
    def backward(ctx, grad, *_):
        u, lam, f, fp = ctx.saved_tensors
        g = u.T @ grad @ u
        g = 0.5 * (g + g.T)
        dlam = lam[:, None] - lam[None, :]
        tol = lam.abs().max() * math.sqrt(torch.finfo(lam.dtype).eps)
        close = dlam.abs() <= tol
        k = torch.where(close, 0.5 * (fp[:, None] + fp[None, :]),
                        (f[:, None] - f[None, :]) / torch.where(close, torch.ones_like(dlam), dlam))
        return u @ (k * g) @ u.T, None, None


def _sym_fn(a, kind, floor):
    floor = torch.as_tensor(floor, dtype=a.dtype, device=a.device)
    return _SymmetricFunction.apply(0.5 * (a + a.T), kind, floor)[0]


def _moments(x):
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / x.shape[0]


def _sqrt_floor(mat):
    # Eigenvalues within rounding of 0 (relative to the largest) are 0; above it sqrt' is bounded. A tensor,
    # not a float, so that no host sync breaks a compiled graph.
    finfo = torch.finfo(mat.dtype)
    return (mat.detach().diagonal().abs().max() * (mat.shape[0] * finfo.eps)).clamp_min(finfo.tiny)


def _diag_std(x, min_var):
    # std with correction 0 (as the released code), through a clamped variance: no 0/0 in the gradient of a
    # dead dimension (clamped entries pass no gradient).
    return x.var(0, correction=0).clamp_min(min_var).sqrt()


@_dtypes.loss
def gaussian_wasserstein(x, y, diagonal=False):
    """Squared 2-Wasserstein distance between the Gaussians fitted to x (n, d) and y (m, d) (Bures):
    |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2), covariances with correction 0 (divided by
    n, as POT's ``empirical_bures_wasserstein_distance`` with ``reg=0``, whose result is the square root of
    this). ``diagonal=True``: |mu_x - mu_y|^2 + |sigma_x - sigma_y|^2 with per-dimension standard deviations
    (correction 0), the released KD2M code's form.

    Matrix square roots come from symmetric eigendecompositions with a backward that stays finite for
    singular covariances (n <= d, dead dimensions, a single sample): see :class:`_SymmetricFunction`.
    A composite of ATen ops: the time is in the two d x d eigh calls, which no custom kernel would beat.
    The value may come out a rounding error below 0 for identical clouds.
    """
    x, y = _check_clouds("gaussian_wasserstein", x, y)
    acc = _dtypes.acc_of(x, y)
    x, y = x.to(acc), y.to(acc)
    if diagonal:
        mean_term = (x.mean(0) - y.mean(0)).square().sum()
        tiny = torch.finfo(acc).tiny
        return mean_term + (_diag_std(x, tiny) - _diag_std(y, tiny)).square().sum()
    mx, sx = _moments(x)
    my, sy = _moments(y)
    root_x = _sym_fn(sx, "sqrt", _sqrt_floor(sx))
    inner = root_x @ sy @ root_x
    cross = torch.diagonal(_sym_fn(inner, "sqrt", _sqrt_floor(inner))).sum()
    return (mx - my).square().sum() + torch.diagonal(sx).sum() + torch.diagonal(sy).sum() - 2.0 * cross


@_dtypes.loss
def gaussian_kl(x, y, diagonal=True, eps=1e-6):
    """KL(N_x || N_y) between the Gaussians fitted to the student x (n, d) and the teacher y (m, d),
    covariances with correction 0:
    1/2 [tr(S_y^-1 S_x) + (mu_y - mu_x)^T S_y^-1 (mu_y - mu_x) - d + log det S_y - log det S_x].

    ``diagonal=True`` (default): per-dimension standard deviations clamped at ``eps``, sum over dimensions of
    log(s_y / s_x) + (s_x^2 + (mu_x - mu_y)^2) / (2 s_y^2) - 1/2. ``diagonal=False``: the full form with the
    eigenvalues of both covariances clamped at eps^2 (the same floor on a variance), so dead teacher
    dimensions give a large finite value instead of log 0.
    """
    x, y = _check_clouds("gaussian_kl", x, y)
    check_number("gaussian_kl", "eps", eps, positive=True)
    acc = _dtypes.acc_of(x, y)
    x, y = x.to(acc), y.to(acc)
    if diagonal:
        sx, sy = _diag_std(x, eps * eps), _diag_std(y, eps * eps)
        delta = x.mean(0) - y.mean(0)
        return (torch.log(sy / sx) + (sx * sx + delta * delta) / (2.0 * sy * sy) - 0.5).sum()
    mx, cx = _moments(x)
    my, cy = _moments(y)
    floor = eps * eps
    inv_y = _sym_fn(cy, "inv", floor)
    delta = my - mx
    d = x.shape[1]
    return 0.5 * ((inv_y * cx).sum() + delta @ inv_y @ delta - d + _logdet_floor(cy, floor) - _logdet_floor(cx, floor))


def _logdet_floor(mat, floor):
    """sum_i log max(lambda_i, floor) over the eigenvalues of the symmetric PSD `mat`. Where no eigenvalue is
    below the floor this is log det, taken from a Cholesky factor: its error is relative to each eigenvalue,
    where the eigenvalues' own error is relative to the largest one (a covariance with eigenvalues 0.5 and 2e-7
    has its small one wrong by 12 % in fp32, the Cholesky log det by 0.01 %). Below the floor the clamped
    eigenvalues are used. The choice is a torch.where, with no host sync."""
    sym = 0.5 * (mat + mat.T)
    lam = torch.linalg.eigvalsh(sym)
    clamped = lam.clamp_min(floor).log().sum()
    with torch.no_grad():
        ok = (torch.linalg.cholesky_ex(sym).info == 0) & (lam.min() > floor)
    eye = torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device)
    chol = torch.linalg.cholesky_ex(torch.where(ok, sym, eye)).L  # the identity where not used: finite gradients
    return torch.where(ok, 2.0 * chol.diagonal().log().sum(), clamped)


# ---- MMD (fused kernel) ----

MMD_KERNELS = ("linear", "rbf", "poly")


# Default bound on the weight matrices an rbf / poly MMD keeps from its forward for its backward (n m + n^2
# elements in fp32 / fp64 for x's gradient, + m^2 for y's): within it the backward runs no Gram GEMMs.
MMD_SAVE_LIMIT_BYTES = 64 * 2 ** 20


@_dtypes.loss
def mmd(x, y, kernel="rbf", bandwidth=None, gamma=None, coef0=1.0, degree=3, save_blocks=None):
    """Squared maximum mean discrepancy (the biased V-statistic)
    mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j) between x (n, d) and y (m, d).

    kernel: ``linear`` <x, y> (the loss is exactly |mean x - mean y|^2 and is computed that way, in
    O((n + m) d)); ``rbf`` exp(-|x - y|^2 / (2 sigma^2)) with sigma = ``bandwidth``, or by default the mean
    distance |z_i - z_j| over all pairs i != j of the pooled cloud z = [x; y], computed in the forward and held
    fixed (no gradient through it); ``poly`` (gamma <x, y> + coef0)^degree, gamma = 1/d by default
    (scikit-learn's polynomial_kernel convention), integer degree >= 1.

    Fused (kdops::mmd): the Gram blocks x x^T, y y^T, x y^T come from ATen GEMMs in fp32 (fp64 for fp64;
    fp16 / bf16 inputs are upcast, since |x|^2 + |y|^2 - 2 <x, y> cancels), and one pass per block applies
    the kernel and reduces it; the backward turns each recomputed block into its weight matrix in place and
    finishes with GEMMs. Nothing larger than the Gram blocks is stored.

    save_blocks: whether an rbf / poly forward that will be differentiated keeps the backward's weight
    matrices (the kernel derivatives, written over the Gram blocks in the same pass that sums the kernel), so
    that the backward runs two GEMMs per input gradient instead of recomputing Gram blocks first: fewer GEMMs
    than torch.compile's graph, at the cost of holding the blocks until the backward: n m + n^2 fp32 values
    for x's gradient, m^2 more for y's (a frozen teacher cloud y costs nothing extra). ``None`` (default) keeps
    them when they take at most ``MMD_SAVE_LIMIT_BYTES`` (64 MiB: n = m = 2896 in fp32 for x alone);
    ``False`` always recomputes (only the inputs and sigma are saved); ``True`` always keeps them.
    """
    x, y = _check_clouds("mmd", x, y)
    if kernel not in MMD_KERNELS:
        raise ValueError("mmd: kernel must be one of %s, got %r" % (MMD_KERNELS, kernel))
    if bandwidth is not None:
        check_number("mmd", "bandwidth", bandwidth, positive=True)
    if gamma is None:
        gamma = 1.0 / x.shape[1]
    check_number("mmd", "gamma", gamma)
    check_number("mmd", "coef0", coef0)
    if isinstance(degree, bool) or not isinstance(degree, numbers.Integral) or degree < 1:
        raise ValueError("mmd: degree must be an integer >= 1, got %r" % (degree,))
    if save_blocks not in (None, True, False):
        raise ValueError("mmd: save_blocks must be None, True or False, got %r" % (save_blocks,))
    if save_blocks is not None:
        save_blocks = bool(save_blocks)  # 0 / 1 compare equal to False / True
    save = 0  # kdops::mmd's save_weights: 1 for x's gradient, 2 for y's
    if kernel != "linear" and save_blocks is not False and torch.is_grad_enabled():
        save = (1 if x.requires_grad else 0) | (2 if y.requires_grad else 0)
        if save and save_blocks is None:
            itemsize = 8 if x.dtype == torch.float64 else 4
            numel = _ops_distribution._mmd_weight_numel(x.shape[0], y.shape[0], kernel, save)
            if numel * itemsize > MMD_SAVE_LIMIT_BYTES:
                save = 0
    loss, _, _ = torch.ops.kdops.mmd(x, y, kernel, float(gamma), float(coef0), int(degree),
                                     float(bandwidth) if bandwidth is not None else 0.0, save)
    return loss


# ---- class-conditional and joint ----

# metric name -> function(x_c, y_c, **metric_kwargs) giving the distance between one class's clouds.

CLASS_METRICS = {
    "exact": lambda xc, yc: wasserstein_exact(xc, yc),
    "gaussian": lambda xc, yc, diagonal=False: gaussian_wasserstein(xc, yc, diagonal=diagonal),
    "sinkhorn": lambda xc, yc, **kw: _sinkhorn(xc, yc, **kw),
}


@_dtypes.loss
def class_conditional_wasserstein(x, y, labels, metric="exact", **metric_kwargs):
    """sum over the classes c present in ``labels`` of W(x[labels == c], y[labels == c]), unweighted, with
    uniform weights inside each class (KD2M's class-conditional loss; the released code crashes on it).

    x, y: paired features (n, d) of the same n samples; labels: integer class indices (n,). metric:
    ``exact`` (:func:`wasserstein_exact`), ``gaussian`` (:func:`gaussian_wasserstein`, ``diagonal`` may be
    passed) or ``sinkhorn`` (:func:`kdops.functional.sinkhorn`, its keyword arguments passed on). A class with a
    single sample contributes |x_i - y_i|^2 under ``exact`` and ``gaussian``: the exact W2 between two Diracs,
    and for ``gaussian`` the mean term alone, its covariance being 0 (finite gradients); under ``sinkhorn`` it
    contributes that pair's cost |x_i - y_i|^p / p.
    Finding the classes present (torch.unique) reads the labels on the host.
    """
    x, y = _check_clouds("class_conditional_wasserstein", x, y, same_size=True)
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise ValueError("class_conditional_wasserstein: labels must be an integer tensor of class indices, got %s"
                         % (getattr(labels, "dtype", type(labels).__name__),))
    if labels.shape != (x.shape[0],):
        raise ValueError("class_conditional_wasserstein: labels must have shape (n,) = (%d,), got %s"
                         % (x.shape[0], tuple(labels.shape)))
    if labels.device != x.device:
        raise ValueError("class_conditional_wasserstein: labels must be on %s, got %s" % (x.device, labels.device))
    if metric not in CLASS_METRICS:
        raise ValueError("class_conditional_wasserstein: metric must be one of %s, got %r"
                         % (tuple(CLASS_METRICS), metric))
    distance = CLASS_METRICS[metric]
    total = None
    for c in torch.unique(labels):
        idx = (labels == c).nonzero().squeeze(1)
        term = distance(x.index_select(0, idx), y.index_select(0, idx), **metric_kwargs)
        total = term if total is None else total + term
    return total


@_dtypes.loss
def joint_wasserstein(x, y, logits_x, logits_y, beta=1.0):
    """Exact OT between the joint feature-label clouds: the plan P of ``ot.emd`` (held fixed) for the cost
    C_ij = |x_i - y_j|^2 / max_kl |x_k - y_l|^2 + beta |p_x,i - p_y,j|^2, p = softmax(logits), and the loss
    <P, C>. The normaliser max C is a constant of the step (no gradient through it). Gradients flow through
    both terms: to the features and to the logits of x (and of y when they require grad).

    This is the intended form of KD2M's joint loss. The released code differs: it builds the label term
    from the student's predictions against themselves (so it is constant in the teacher) and detaches the
    feature cost, so that only the label term trains the student.
    x, y: (n, d) and (m, d); logits_x, logits_y: (n, C) and (m, C).
    """
    x, y = _check_clouds("joint_wasserstein", x, y)
    logits_x, logits_y = _check_clouds("joint_wasserstein", logits_x, logits_y)
    acc = _dtypes.acc_of(x, y, logits_x, logits_y)
    if logits_x.shape[0] != x.shape[0] or logits_y.shape[0] != y.shape[0]:
        raise ValueError("joint_wasserstein: logits_x and logits_y must have one row per point, (%d, C) and "
                         "(%d, C), got %s and %s" % (x.shape[0], y.shape[0], tuple(logits_x.shape),
                                                     tuple(logits_y.shape)))
    check_number("joint_wasserstein", "beta", beta, low=0.0)
    feature_cost = _sq_dists(x.to(acc), y.to(acc))
    px, py = torch.softmax(logits_x.to(acc), dim=1), torch.softmax(logits_y.to(acc), dim=1)
    label_cost = _sq_dists(px, py)
    scale = feature_cost.detach().max().clamp_min(torch.finfo(acc).tiny)
    cost = feature_cost / scale + beta * label_cost
    plan = torch.ops.kdops.emd_plan(cost.detach().double()).to(acc)
    return (plan * cost).sum()
