"""kd_div and the KD losses built on it: parity with kdops.reference, gradients, opcheck, compile, dtypes,
extremes and bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as TF

import kdops
from conftest import DEVICES
from kdops import functional as F
from kdops import nn as knn
from kdops import reference as R

LOSSES = {
    "kd": (F.kd_loss, R.kd_loss),
    "reverse": (F.reverse_kd_loss, R.reverse_kd_loss),
    "jsd": (F.jsd_loss, R.jsd_loss),
    "dkd": (F.dkd_loss, R.dkd_loss),
}
DIVERGENCE_OF = {"kd": "kl", "reverse": "reverse_kl", "jsd": "jsd", "dkd": "dkd"}


def call(fn, name, s, t, y=None, **kw):
    """Calls a kdops or reference loss; DKD takes the target positionally, the others as a keyword."""
    if name == "dkd":
        return fn(s, t, y, **kw)
    return fn(s, t, target=y, **kw) if y is not None else fn(s, t, **kw)


def logits(shape, device, dtype=torch.float32, scale=3.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def loss_and_grads(fn, name, s, t, y=None, grad_out=None, **kw):
    s = s.detach().requires_grad_()
    t = t.detach().requires_grad_()
    out = call(fn, name, s, t, y, **kw)
    g = torch.ones_like(out) if grad_out is None else grad_out.to(out.dtype)
    gs, gt = torch.autograd.grad(out, (s, t), g)
    return out.detach(), gs, gt


def assert_close_to_reference(name, s, t, y=None, rtol=1e-4, atol=1e-5, **kw):
    """kdops on (s, t) against the reference evaluated in float64 on the same values."""
    ours = loss_and_grads(LOSSES[name][0], name, s, t, y, **kw)
    g = kw.pop("grad_out", None)
    ref = loss_and_grads(LOSSES[name][1], name, s.double(), t.double(), y,
                         grad_out=None if g is None else g.double(), **kw)
    for what, a, b in zip(("loss", "grad student", "grad teacher"), ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=lambda m: "%s %s: %s" % (name, what, m))


def assert_within_torch_error(name, s, t, y=None, **kw):
    """The error of kdops against float64 must stay within PyTorch's own error for the same computation in
    the input dtype (doubled, plus one rounding of the largest value to that dtype)."""
    exact = loss_and_grads(LOSSES[name][1], name, s.double(), t.double(), y, **kw)
    ours = loss_and_grads(LOSSES[name][0], name, s, t, y, **kw)
    theirs = loss_and_grads(LOSSES[name][1], name, s, t, y, **kw)
    eps = torch.finfo(s.dtype).eps
    for what, a, b, e in zip(("loss", "grad student", "grad teacher"), ours, theirs, exact):
        assert a.dtype == s.dtype
        err_ours = (a.double() - e).abs().max().item()
        err_torch = (b.double() - e).abs().max().item()
        budget = 2.0 * err_torch + eps * e.abs().max().item()
        assert err_ours <= budget, "%s %s: kdops error %g > budget %g (torch %g)" % (name, what, err_ours, budget,
                                                                                   err_torch)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("shape", [(8, 10), (41 * 3, 1271), (3, 5, 7)])
def test_parity_with_reference(device, name, reduction, temperature, shape):
    s, t = logits(shape, device), logits(shape, device)
    y = torch.randint(0, shape[-1], shape[:-1], device=device)
    rows = shape[:-1]
    grad_out = torch.rand(rows if reduction == "none" else (), dtype=torch.float64, device=device) + 0.5
    kw = dict(temperature=temperature, reduction=reduction)
    assert_close_to_reference(name, s, t, y if name == "dkd" else None, grad_out=grad_out, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_non_contiguous_inputs(device, name):
    base_s, base_t = logits((37, 2 * 301), device), logits((301, 37), device)
    s = base_s[:, ::2]          # strided rows
    t = base_t.t()              # transposed
    assert not s.is_contiguous() and not t.is_contiguous()
    y = torch.randint(0, 301, (37,), device=device)
    assert_close_to_reference(name, s, t, y if name == "dkd" else None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["kd", "reverse", "jsd"])
def test_jsd_beta_and_scale_options(device, name):
    s, t = logits((16, 33), device), logits((16, 33), device)
    kw = dict(scale_t2=False, temperature=2.0)
    if name == "jsd":
        for beta in (0.0, 0.1, 0.9, 1.0):
            assert_close_to_reference(name, s, t, beta=beta, **kw)
    else:
        assert_close_to_reference(name, s, t, **kw)


def test_known_value_by_hand():
    # p_t = [3/4, 1/4], p_s = [1/2, 1/2] at T = 1, in float64 so the math is checked to its last digits
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert F.kd_loss(s, t, temperature=1.0).item() == pytest.approx(kl, rel=1e-12)
    rkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert F.reverse_kd_loss(s, t, temperature=1.0).item() == pytest.approx(rkl, rel=1e-12)
    m = [0.625, 0.375]
    jsd = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) + \
        0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    assert F.jsd_loss(s, t, temperature=1.0).item() == pytest.approx(jsd, rel=1e-12)


def test_student_gradient_formula():
    # METHODS.md: d/dz_s = (T / b) * (p_s - p_t) under batchmean with T^2 on.
    T, b = 4.0, 6
    s = logits((b, 9), "cpu").requires_grad_()
    t = logits((b, 9), "cpu")
    F.kd_loss(s, t, temperature=T).backward()
    expected = (T / b) * (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1))
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-7)


def mdistiller_dkd(s, t, y, alpha, beta, T):
    """DKD written as in the paper's released code (target masked by subtracting 1000)."""
    gt = TF.one_hot(y, s.shape[-1]).to(s.dtype)
    ps, pt = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = TF.kl_div(bs.log(), bt, reduction="sum") * T ** 2 / s.shape[0]
    lqs = TF.log_softmax(s / T - 1000.0 * gt, -1)
    qt = torch.softmax(t / T - 1000.0 * gt, -1)
    nckd = TF.kl_div(lqs, qt, reduction="sum") * T ** 2 / s.shape[0]
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize("device", DEVICES)
def test_dkd_matches_the_published_form(device):
    s, t = logits((32, 100), device, torch.float64), logits((32, 100), device, torch.float64)
    y = torch.randint(0, 100, (32,), device=device)
    expected = mdistiller_dkd(s, t, y, 1.0, 8.0, 4.0)
    torch.testing.assert_close(F.dkd_loss(s, t, y), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(F.dkd_loss(s.float(), t.float(), y).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_dkd_one_and_two_classes(device):
    # C = 1: both binary distributions are [1, 0] and there is no non-target class: loss and gradients 0.
    s, t = logits((5, 1), device).requires_grad_(), logits((5, 1), device).requires_grad_()
    y = torch.zeros(5, dtype=torch.long, device=device)
    loss = F.dkd_loss(s, t, y)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s)) and torch.equal(t.grad, torch.zeros_like(t))
    # C = 2: NCKD is over one class, so it is 0 and DKD is alpha * TCKD, the KL of the two softmaxes.
    s, t = logits((7, 2), device), logits((7, 2), device)
    y = torch.randint(0, 2, (7,), device=device)
    T = 4.0
    expected = 2.0 * F.kd_loss(s, t, temperature=T)  # TCKD with alpha = 2 equals 2 * KD when C = 2
    got = F.dkd_loss(s, t, y, alpha=2.0, beta=8.0, temperature=T)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert_close_to_reference("dkd", s, t, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_huge_logits_stay_finite_and_exact(device, name):
    s = (torch.rand(16, 50, dtype=torch.float64) * 2e4 - 1e4).float().to(device)
    t = (torch.rand(16, 50, dtype=torch.float64) * 2e4 - 1e4).float().to(device)
    s[0], t[0] = 1e4, -1e4  # constant rows at the extremes
    y = torch.randint(0, 50, (16,), device=device)
    for T in (1.0, 4.0):
        out = loss_and_grads(LOSSES[name][0], name, s, t, y if name == "dkd" else None, temperature=T)
        assert all(torch.isfinite(x).all() for x in out)
        assert_within_torch_error(name, s, t, y if name == "dkd" else None, temperature=T)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("shape", [(8, 5000), (1024, 8200)], ids=["multi-chunk", "streaming-over-64MiB"])
def test_long_rows_with_late_large_maxima(device, name, shape):
    # Rows span several CPU chunks; maxima jump by hundreds (in units of z / T) in later chunks, which
    # sends the single-pass CPU path back to a two-pass chunk. The larger shape takes the streaming path.
    s, t = logits(shape, device), logits(shape, device)
    s[:, 4100], t[:, 2500], t[:, 4600] = 300.0, -300.0, 250.0
    y = torch.randint(0, shape[-1], shape[:-1], device=device)
    assert_close_to_reference(name, s, t, y if name == "dkd" else None, temperature=1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_nan_logits_propagate(device, name):
    s, t = logits((3, 4000), device), logits((3, 4000), device)
    s[1, 2100] = float("nan")
    t[2, 7] = float("nan")
    out = call(LOSSES[name][0], name, s, t, torch.zeros(3, dtype=torch.long, device=device), reduction="none")
    assert torch.isfinite(out[0]) and torch.isnan(out[1]) and torch.isnan(out[2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_equal_logits_give_zero(device, name):
    s = torch.full((4, 9), 2.5, device=device)
    out, gs, gt = loss_and_grads(LOSSES[name][0], name, s, s.clone(), torch.zeros(4, dtype=torch.long, device=device))
    assert abs(out.item()) < 1e-6
    assert gs.abs().max().item() < 1e-6 and gt.abs().max().item() < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["kd", "reverse", "jsd"])
def test_minus_inf_masked_classes_drop_out(device, name):
    # Vocabulary masking: classes at -inf in both student and teacher carry no probability. The result
    # must equal the loss over the remaining classes (where the naive reference would give NaN).
    s, t = logits((6, 12), device), logits((6, 12), device)
    keep = torch.ones(12, dtype=torch.bool)
    keep[[1, 5, 6]] = False
    s_m = s.masked_fill(~keep.to(device), float("-inf"))
    t_m = t.masked_fill(~keep.to(device), float("-inf"))
    ours = loss_and_grads(LOSSES[name][0], name, s_m, t_m)
    ref = loss_and_grads(LOSSES[name][1], name, s[:, keep].double(), t[:, keep].double())
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[1:], ref[1:]):
        torch.testing.assert_close(a[:, keep].double(), b, rtol=1e-5, atol=1e-6)
        assert torch.equal(a[:, ~keep], torch.zeros_like(a[:, ~keep]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_ignore_index_rows(device, name, reduction):
    B, L, C = 3, 7, 19
    s, t = logits((B, L, C), device), logits((B, L, C), device)
    y = torch.randint(0, C, (B, L), device=device)
    y[0, :3] = -100
    y[2, 6] = -100
    kept = y != -100
    out, gs, gt = loss_and_grads(LOSSES[name][0], name, s, t, y, reduction=reduction)
    # Independent check: the loss over the kept rows only, as a (rows, C) batch.
    ref, rgs, rgt = loss_and_grads(LOSSES[name][1], name, s[kept].double(), t[kept].double(), y[kept],
                                   reduction=reduction)
    if reduction == "none":
        torch.testing.assert_close(out[kept].double(), ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    else:
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs[kept].double(), rgs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt[kept].double(), rgt, rtol=1e-5, atol=1e-6)
    assert torch.equal(gs[~kept], torch.zeros_like(gs[~kept]))


@pytest.mark.parametrize("name", list(LOSSES))
def test_all_rows_ignored_gives_zero(name):
    s, t = logits((4, 6), "cpu").requires_grad_(), logits((4, 6), "cpu")
    y = torch.full((4,), -100)
    loss = call(LOSSES[name][0], name, s, t, y)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck_float64(name):
    s = logits((3, 5), "cpu", torch.float64).requires_grad_()
    t = logits((3, 5), "cpu", torch.float64).requires_grad_()
    y = torch.tensor([0, -100, 4])
    kw = dict(temperature=2.0)
    fn = LOSSES[name][0]
    assert torch.autograd.gradcheck(lambda a, b: call(fn, name, a, b, y, reduction="none", **kw), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: call(fn, name, a, b, y, **kw), (s, t))
    if name == "jsd":
        assert torch.autograd.gradcheck(lambda a, b: fn(a, b, beta=0.2, **kw), (s, t))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "dkd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, divergence, dtype):
    s = logits((4, 3, 11), device, dtype).requires_grad_()
    t = logits((4, 3, 11), device, dtype).requires_grad_()
    y = torch.randint(0, 11, (4, 3), device=device)
    y[1, 1] = -100
    target = y if divergence == "dkd" else None
    torch.library.opcheck(torch.ops.kdops.kd_div.default, (s, t, target, 2.0, divergence, 1.0, 0.3, -100))
    torch.library.opcheck(torch.ops.kdops.kd_div.default, (s, t, target, 2.0, divergence, 1.0, 0.3, -100, 0.25))
    _, stats = torch.ops.kdops.kd_div(s, t, y, 2.0, divergence, 1.0, 0.3, -100)
    grad = torch.rand(4, 3, device=device, dtype=dtype)
    for ws, wt in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.kdops.kd_div_backward.default,
                              (grad, s.detach(), t.detach(), y, stats, 2.0, divergence, 1.0, 0.3, -100, ws, wt, 0.25))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "dkd"])
def test_op_scale_is_linear(device, divergence):
    # kd_div's `scale` (the reduction constants folded into the kernel) scales values and gradients exactly
    s, t = logits((5, 2, 13), device), logits((5, 2, 13), device)
    y = torch.randint(0, 13, (5, 2), device=device)
    args = (y, 3.0, divergence, 0.5, 0.3, -100)
    one, stats = torch.ops.kdops.kd_div(s, t, *args)
    scaled, _ = torch.ops.kdops.kd_div(s, t, *args, 0.125)
    torch.testing.assert_close(scaled, one * 0.125)
    grad = torch.rand(5, 2, device=device)
    g_one = torch.ops.kdops.kd_div_backward(grad, s, t, y, stats, *args[1:], True, True)
    g_scaled = torch.ops.kdops.kd_div_backward(grad, s, t, y, stats, *args[1:], True, True, 0.125)
    for a, b in zip(g_scaled, g_one):
        torch.testing.assert_close(a, b * 0.125)


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_torch_compile_fullgraph(name):
    fn = LOSSES[name][0]
    s, t = logits((16, 40), "cpu"), logits((16, 40), "cpu")
    y = torch.randint(0, 40, (16,))
    y[3] = -100
    eager = lambda a, b, c: call(fn, name, a, b, c)  # noqa: E731
    compiled = torch.compile(eager, fullgraph=True, backend="inductor")
    results = []
    for f in (eager, compiled):
        a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
        out = f(a, b, y)
        results.append((out.detach(),) + torch.autograd.grad(out, (a, b)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_pytorch_budget(device, name, dtype):
    s, t = logits((64, 500), device, dtype, scale=2.0), logits((64, 500), device, dtype, scale=2.0)
    y = torch.randint(0, 500, (64,), device=device)
    yy = y if name == "dkd" else None
    assert_within_torch_error(name, s, t, y if name == "dkd" else None)


@pytest.mark.parametrize("device", DEVICES)
def test_modules_match_functional(device):
    s, t = logits((10, 13), device), logits((10, 13), device)
    y = torch.randint(0, 13, (10,), device=device)
    pairs = [
        (knn.KDLoss(temperature=3.0), F.kd_loss(s, t, temperature=3.0)),
        (knn.ReverseKDLoss(temperature=2.0, reduction="sum"), F.reverse_kd_loss(s, t, 2.0, "sum")),
        (knn.JSDLoss(beta=0.3), F.jsd_loss(s, t, beta=0.3)),
    ]
    for module, expected in pairs:
        torch.testing.assert_close(module(s, t), expected)
    torch.testing.assert_close(knn.DKDLoss(alpha=0.5, beta=2.0)(s, t, y), F.dkd_loss(s, t, y, 0.5, 2.0))


def test_teacher_without_grad_gets_none():
    s = logits((5, 7), "cpu").requires_grad_()
    t = logits((5, 7), "cpu")
    F.kd_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


BAD = [
    (lambda s, t, y: F.kd_loss(s, t[:, :-1]), "same shape"),
    (lambda s, t, y: F.kd_loss(s, t.long()), "teacher_logits must be a floating-point"),
    (lambda s, t, y: F.kd_loss(s, t, temperature=0.0), "temperature"),
    (lambda s, t, y: F.kd_loss(s, t, temperature=-1.0), "temperature"),
    (lambda s, t, y: F.kd_loss(s.long(), t.long()), "floating-point"),
    (lambda s, t, y: F.kd_loss(s, t.to("meta")), "same device"),
    (lambda s, t, y: F.kd_loss(s[:0], t[:0]), "empty batch"),
    (lambda s, t, y: F.kd_loss(s[:, :0], t[:, :0]), "at least one class"),
    (lambda s, t, y: F.kd_loss(s, t, reduction="avg"), "reduction"),
    (lambda s, t, y: F.kd_loss(s, t, target=y[:-1]), "target must have shape"),
    (lambda s, t, y: F.kd_loss(s, t, target=y.float()), "integer tensor"),
    (lambda s, t, y: F.dkd_loss(s, t, None), "target is required"),
    (lambda s, t, y: F.jsd_loss(s, t, beta=1.5), "beta"),
    (lambda s, t, y: F.dkd_loss(s, t, y, alpha=float("nan")), "alpha"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs_raise_value_error(case):
    fn, message = BAD[case]
    s, t = logits((4, 6), "cpu"), logits((4, 6), "cpu")
    y = torch.randint(0, 6, (4,))
    with pytest.raises(ValueError, match=message):
        fn(s, t, y)


def test_dkd_target_out_of_range_raises():
    s, t = logits((4, 6), "cpu"), logits((4, 6), "cpu")
    with pytest.raises(RuntimeError, match="out of range"):
        F.dkd_loss(s, t, torch.tensor([0, 1, 6, 2]))
    with pytest.raises(RuntimeError, match="out of range"):
        F.dkd_loss(s, t, torch.tensor([0, -1, 2, 2]))


def test_op_level_errors_name_the_argument():
    s, t = logits((4, 6), "cpu"), logits((4, 6), "cpu")
    with pytest.raises(RuntimeError, match="divergence must be one of"):
        torch.ops.kdops.kd_div(s, t, None, 1.0, "hellinger", 0.0, 0.0, -100)
    with pytest.raises(RuntimeError, match="temperature must be > 0"):
        torch.ops.kdops.kd_div(s, t, None, 0.0, "kl", 0.0, 0.0, -100)
    with pytest.raises(RuntimeError, match="dkd needs a target"):
        torch.ops.kdops.kd_div(s, t, None, 1.0, "dkd", 0.0, 0.0, -100)

