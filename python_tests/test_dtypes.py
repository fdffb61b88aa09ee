"""The dtype rules of kdops.functional._dtypes, for every public loss: mixed float dtypes are promoted as torch's
binary ops do, 16-bit inputs work, each input's gradient comes back in its own dtype, results have the stated
dtype, autocast does not change a loss's answer, and a student head under autocast gives a loss within the
error that its 16-bit outputs carry."""

import inspect

import pytest
import torch

from conftest import DEVICES
from kdops import functional as F
from kdops import nn as knn
from kdops import reference as R
from loss_cases import CASES, cast, differentiable, make, with_grad

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
MIXED = [(BF16, F32), (F16, F32), (F32, BF16), (BF16, F16), (F32, F64), (F64, BF16)]
NAMES = sorted(CASES)
# families whose result is in the accumulation dtype (fp32, or fp64 with an fp64 input) rather than the input's
ACC_RESULT = {"partial_l2_loss", "logsum_loss"} | {
    n for n in CASES if getattr(F, n).__module__.split(".")[-1] in ("relational", "distribution", "ot", "contrastive", "lm")}


# Losses not accurate to their compute dtype's epsilon, with the epsilon that bounds them: square roots of
# (near-)singular covariances lose half the digits (the class-conditional losses see classes of a few samples),
# and Sinkhorn's potentials converge to tol = 1e-6 while the reference runs a fixed number of iterations. Their
# promotion is still shown by the result dtype and by errors far below the unpromoted dtype's.
ILL_CONDITIONED = {"class_conditional_wasserstein": lambda eps: eps ** 0.5, "sinkhorn": lambda eps: max(eps, 1e-6)}


def promoted(ds, dt):
    return torch.promote_types(ds, dt)


def result_dtype(name, ds, dt):
    p = promoted(ds, dt)
    if name in ACC_RESULT:
        return F64 if p == F64 else F32
    return p


def run(name, args, kwargs, fn=None, leaves=None):
    """The loss (summed when it is not a scalar) and the gradients of 0.7 * it w.r.t. every float input
    (`leaves`: inputs that an earlier call already made, whose gradients are wanted instead)."""
    case = CASES[name]
    if leaves is None:
        args, leaves = with_grad(case, args)
    out = (fn or getattr(F, name))(*args, **kwargs)
    if out.dim() == 0:
        total = out
    else:
        w = torch.linspace(0.5, 1.5, out.numel(), dtype=F64, device=out.device).view(out.shape)
        if name == "angle_tensor":
            # psi[a, a, k] and psi[a, j, a] are constant 0; the reference's gradient there is normalize()'s 1/eps
            # times a zero vector's, which cancels only up to rounding, so no gradient is sent through them
            eye = torch.eye(out.shape[-1], dtype=torch.bool, device=out.device)
            w = w.masked_fill(eye.unsqueeze(-1), 0.0).masked_fill(eye.unsqueeze(-2), 0.0)
        total = (out.double() * w).sum()
    grads = torch.autograd.grad(total * 0.7, leaves, allow_unused=True)
    return out, [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves)]


def test_every_public_loss_has_a_case():
    public = {n for n, v in vars(F).items() if not n.startswith("_") and inspect.isfunction(v)}
    assert public == set(CASES), (sorted(public - set(CASES)), sorted(set(CASES) - public))


@pytest.mark.parametrize("name", NAMES)
def test_every_public_loss_goes_through_the_rules(name):
    # the autocast rule is applied by kdops.functional._dtypes.loss, which wraps the function
    fn = getattr(F, name)
    assert getattr(fn, "__wrapped__", None) is not None and fn.__wrapped__.__module__ == fn.__module__


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ds, dt", MIXED, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name", NAMES)
def test_mixed_dtypes_are_promoted(name, ds, dt, device):
    case = CASES[name]
    if case.teacher < 0 and not case.pair_arg and not case.nested_pairs and ds != dt:
        ds, dt = ds, ds  # one float input: nothing to mix; still a 16-bit / fp64 run
    args, kwargs = make(name, ds, dt, device)
    out, grads = run(name, args, kwargs)
    assert out.dtype == result_dtype(name, ds, dt), out.dtype
    # The reference in float64 on the same (rounded) input values: the promoted computation must match it to
    # the promoted dtype's accuracy, and every gradient comes back in its own input's dtype.
    ref, ref_grads = run(name, cast(case, args, F64), kwargs, fn=getattr(R, name))
    compute = result_dtype(name, ds, dt) if name in ACC_RESULT else promoted(ds, dt)
    eps = ILL_CONDITIONED.get(name, lambda e: e)(torch.finfo(compute).eps)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=max(64 * eps, 1e-9), atol=64 * eps)
    for x, g, r in zip(differentiable(case, args), grads, ref_grads):
        assert g.dtype == x.dtype, (g.dtype, x.dtype)
        tol = max(64 * eps, 2 * torch.finfo(x.dtype).eps)
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * max(r.abs().max().item(), 1e-3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", NAMES)
def test_autocast_does_not_change_the_answer(name, low, device):
    # The same tensors give the same loss inside and outside autocast, bit for bit, and so do the gradients
    # of the loss computed inside it (backward() called outside the region, as torch recommends): the loss's
    # own GEMMs (Gram matrices, MMD blocks, Sinkhorn's cost) are not lowered to 16 bits.
    case = CASES[name]
    args, kwargs = make(name, low, F32, device)
    out, grads = run(name, args, kwargs)
    args_ac, leaves = with_grad(case, args)
    with torch.autocast(device, dtype=low):
        out_ac = getattr(F, name)(*args_ac, **kwargs)
    _, grads_ac = run(name, args, kwargs, fn=lambda *a, **k: out_ac, leaves=leaves)
    assert out_ac.dtype == out.dtype
    torch.testing.assert_close(out_ac, out, rtol=0, atol=0)
    for a, b in zip(grads_ac, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", NAMES)
def test_student_head_under_autocast_is_within_its_rounding(name, low, device):
    # The user's situation: the student's last layer runs under autocast (16-bit outputs), the teacher's
    # outputs are fp32. The loss must differ from the float64 loss of the exact (unrounded) student outputs
    # by no more than those outputs' rounding does (the same loss in float64 on the rounded values), plus a
    # few ulps of the result dtype and twice the loss's fp32 error (the larger of PyTorch's fp32 reference on
    # the rounded values and kdops on the exact values in fp32: the conditioning of the loss itself, which for
    # the eigendecompositions of near-singular covariances is large): kdops adds no 16-bit error of its own.
    case = CASES[name]
    args, kwargs = make(name, F32, F32, device, seed=3)
    head = torch.nn.Linear(7, 7).to(device)
    head64 = torch.nn.Linear(7, 7).to(device, F64)
    head64.load_state_dict({k: v.double() for k, v in head.state_dict().items()})

    def through(layer):
        def apply(x):  # the layer over the last dim, zero-padded / cut to its width of 7
            flat = x.reshape(-1, x.shape[-1])
            y = layer(torch.nn.functional.pad(flat, (0, max(0, 7 - flat.shape[1])))[:, :7])
            return torch.cat([y, flat[:, 7:].to(y.dtype)], 1)[:, :flat.shape[1]].reshape(x.shape)
        return apply

    def student_side(a, fn):
        a = list(a)
        if case.pair_arg:
            a[0] = (fn(a[0][0]), a[0][1])
        elif case.nested_pairs:
            a[0] = [tuple(fn(x) for x in pair) for pair in a[0]]
        else:
            a[case.student] = fn(a[case.student])
        return a

    with torch.no_grad():
        with torch.autocast(device, dtype=low):
            rounded = student_side(args, through(head))
            ours = getattr(F, name)(*rounded, **kwargs)
        assert any(x.dtype == low for x in differentiable(case, rounded))
        ref_exact = getattr(R, name)(*student_side(cast(case, args, F64), through(head64)), **kwargs)
        ref_rounded = getattr(R, name)(*cast(case, rounded, F64), **kwargs)
        ref_rounded32 = getattr(R, name)(*cast(case, rounded, F32), **kwargs)
        ours_exact32 = getattr(F, name)(*cast(case, student_side(cast(case, args, F64), through(head64)), F32), **kwargs)
    rounding = (ref_rounded - ref_exact).abs()
    eps = torch.finfo(ours.dtype).eps
    fp32_error = torch.maximum((ref_rounded32.double() - ref_rounded).abs(), (ours_exact32.double() - ref_exact).abs())
    budget = rounding + 2 * fp32_error + 4 * eps * ref_exact.abs() + 1e-6
    assert bool(((ours.double() - ref_exact).abs() <= budget).all()), (ours, ref_exact, rounding)


@pytest.mark.parametrize("name", NAMES)
def test_compile_fullgraph_with_mixed_dtypes_under_autocast(name):
    if name == "class_conditional_wasserstein":
        pytest.skip("finds the classes present with torch.unique, a data-dependent graph break by design")
    args, kwargs = make(name, BF16, F32, "cpu")
    fn = getattr(F, name)

    def call(*a):
        with torch.autocast("cpu", dtype=BF16):
            return fn(*a, **kwargs)

    torch._dynamo.reset()  # each case is a new function of the same code object: start its count afresh
    eager, eager_grads = run(name, args, {}, fn=call)
    comp, comp_grads = run(name, args, {}, fn=torch.compile(call, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 6, 1, 1), (6, 1, 1), (6,)])
def test_overhaul_margin_in_the_shapes_of_the_published_code(shape, device):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 6, 4, 4, generator=g).to(device), torch.randn(3, 6, 4, 4, generator=g).to(device)
    m = -torch.rand(6, generator=g).to(device)
    ref = R.partial_l2_loss(s.double(), t.double(), m.double())
    torch.testing.assert_close(F.partial_l2_loss(s, t, m.reshape(shape)).double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(F.margin_relu(t, m.reshape(shape)), R.margin_relu(t, m))


@pytest.mark.parametrize("shape", [(1, 1, 1, 6), (6, 1), (1, 6, 1), (2, 3), (1, 6, 1, 1, 1), (1, 6, 4, 4), (7,)])
def test_overhaul_margin_of_other_shapes_is_refused(shape):
    s = t = torch.randn(3, 6, 4, 4)
    with pytest.raises(ValueError, match=r"partial_l2_loss: margin must have shape \(C,\) = \(6,\)"):
        F.partial_l2_loss(s, t, torch.zeros(shape))


def test_modules_with_connectors_under_autocast():
    # OFD's connector and LogSum's projector run under autocast like any layer; the loss then promotes the
    # 16-bit student side against the fp32 teacher instead of rounding the teacher down.
    torch.manual_seed(0)
    s, t = torch.randn(8, 5, 4, 4), torch.randn(8, 6, 4, 4)
    ofd = knn.OFDLoss(5, 6, -torch.rand(6))
    lsum = knn.ProjectorLogSumLoss(5, 6)
    zs, zt = torch.randn(8, 5), torch.randn(8, 6)
    outside = (ofd(s, t), lsum(zs, zt))
    with torch.autocast("cpu", dtype=BF16):
        inside = (ofd(s, t), lsum(zs, zt))
    for a, b in zip(inside, outside):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=8 * torch.finfo(BF16).eps, atol=1e-6)
