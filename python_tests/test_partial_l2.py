"""margin_relu and partial_l2 (Overhaul of feature distillation): parity with kdops.reference, gradients,
opcheck, compile, low precision, masking edge cases and bad inputs."""

import pytest
import torch

from conftest import DEVICES
from kdops._ops import feature as kdops_ops
from kdops import functional as F
from kdops import reference as R

SHAPES = [(4, 8, 5, 5), (3, 16, 7, 9), (2, 3, 11), (5, 6)]


def maps(shape, device, dtype=torch.float32):
    s = torch.randn(shape, dtype=torch.float64) * 1.5
    t = torch.randn(shape, dtype=torch.float64) * 1.5
    m = -torch.rand(shape[1], dtype=torch.float64) * 1.5 + 0.2  # mostly negative, a few positive margins
    return s.to(device, dtype), t.to(device, dtype), m.to(device, torch.float32)


def loss_and_grads(fn, s, t, m, grad_out=1.0, **kw):
    s = s.detach().requires_grad_()
    t = t.detach().requires_grad_()
    out = fn(s, t, m, **kw)
    gs, gt = torch.autograd.grad(out * grad_out, (s, t))
    return out.detach(), gs, gt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["sum", "batchmean", "mean"])
def test_parity_with_reference(device, shape, reduction):
    s, t, m = maps(shape, device)
    ours = loss_and_grads(F.partial_l2_loss, s, t, m, grad_out=0.7, reduction=reduction)
    ref = loss_and_grads(R.partial_l2_loss, s.double(), t.double(), m.double(), grad_out=0.7, reduction=reduction)
    for what, a, b in zip(("loss", "grad student", "grad teacher"), ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6, msg=lambda msg: "%s: %s" % (what, msg))


def test_known_value_by_hand():
    # one channel, margin -1: t^ = [0.5, -1, -0.2, 2]; kept where s > t^ or t^ > 0
    s = torch.tensor([[[1.0, -3.0, -0.5, 1.0]]])
    t = torch.tensor([[[0.5, -4.0, -0.2, 2.0]]])
    m = torch.tensor([-1.0])
    # position 0: t^ > 0 -> 0.25; 1: s=-3 <= t^=-1 <= 0 -> skip; 2: s=-0.5 <= t^=-0.2 <= 0 -> skip; 3: 1.0
    assert F.partial_l2_loss(s, t, m).item() == pytest.approx(1.25)
    torch.testing.assert_close(F.margin_relu(t, m), torch.tensor([[[0.5, -1.0, -0.2, 2.0]]]))


@pytest.mark.parametrize("device", DEVICES)
def test_all_masked_gives_zero(device):
    m = torch.full((4,), -1.0, device=device)
    t = torch.full((2, 4, 3, 3), -0.5, device=device, requires_grad=True)
    s = torch.full((2, 4, 3, 3), -2.0, device=device, requires_grad=True)
    loss = F.partial_l2_loss(s, t, m)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s)) and torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_and_strided_inputs(device):
    s, t, m = maps((3, 8, 6, 6), device)
    s_cl = s.to(memory_format=torch.channels_last)
    t_strided = torch.cat([t, t], dim=3)[..., ::2]
    assert not s_cl.is_contiguous() and not t_strided.is_contiguous()
    ours = loss_and_grads(F.partial_l2_loss, s_cl, t_strided, m)
    ref = loss_and_grads(R.partial_l2_loss, s.double(), t_strided.double(), m.double())
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_gradcheck_float64_away_from_the_mask_boundary():
    g = torch.Generator().manual_seed(1)
    m = torch.tensor([-0.5, 0.3], dtype=torch.float64)
    # teacher values at least 0.2 from the margins and from 0, student at least 0.2 from t^, so a
    # finite-difference step never crosses the mask or the margin
    t = (torch.rand(3, 2, 4, generator=g, dtype=torch.float64) + 0.2) * torch.tensor([-1.0, 1.0]).repeat(6)[:4]
    t = t + torch.tensor([-0.5, 0.3], dtype=torch.float64).view(1, 2, 1) * (t < 0)
    th = torch.maximum(t, m.view(1, 2, 1))
    s = th + (torch.rand(3, 2, 4, generator=g, dtype=torch.float64) + 0.2) * torch.sign(torch.randn(3, 2, 4, generator=g))
    s, t = s.requires_grad_(), t.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: F.partial_l2_loss(a, b, m), (s, t))
    assert torch.autograd.gradcheck(lambda b: F.margin_relu(b, m), (t,))


def op_pair_loss(s, t, m, reduction="sum"):
    """partial_l2_loss through the op pair (kdops::partial_l2 + its registered backward), as under compile."""
    total = torch.ops.kdops.partial_l2(s, t, m).sum()
    return total / {"sum": 1, "batchmean": s.shape[0], "mean": s.numel()}[reduction]


@pytest.mark.parametrize("reduction", ["sum", "batchmean", "mean"])
@pytest.mark.parametrize("grad_out", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_fused_gradient_path_matches_the_op_pair_and_reference(reduction, grad_out, teacher_grad):
    """On CPU a gradient-requiring call takes the one-pass path (gradients made in the forward); it must give
    the op pair's and the reference's gradients for any incoming gradient, to student and teacher."""
    s, t, m = maps((3, 5, 4, 6), "cpu")
    s = s.requires_grad_()
    t = t.requires_grad_(teacher_grad)
    assert kdops_ops.use_fused_gradient(s, t)
    out = F.partial_l2_loss(s, t, m, reduction=reduction)
    assert out.grad_fn.name() == "PartialL2WithGradBackward"
    wrt = (s, t) if teacher_grad else (s,)
    ours = torch.autograd.grad(out * grad_out, wrt)
    pair = torch.autograd.grad(op_pair_loss(s, t, m, reduction) * grad_out, wrt)
    s64 = s.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_(teacher_grad)
    ref_out = R.partial_l2_loss(s64, t64, m.double(), reduction=reduction)
    ref = torch.autograd.grad(ref_out * grad_out, (s64, t64) if teacher_grad else (s64,))
    torch.testing.assert_close(out.double(), ref_out.detach(), rtol=1e-5, atol=1e-6)
    for a, b, r in zip(ours, pair, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-6)


def test_fused_gradient_path_backward_accumulates_and_survives_retained_graphs():
    """.backward() accumulates; a second backward through a retained graph recomputes the gradient and does not
    touch what the first one returned."""
    s, t, m = maps((4, 3, 5, 5), "cpu")
    s = s.requires_grad_()
    expected = torch.autograd.grad(op_pair_loss(s, t, m, "batchmean"), s)[0]
    loss = F.partial_l2_loss(s, t, m, reduction="batchmean")
    first = torch.autograd.grad(loss, s, retain_graph=True)[0]
    torch.testing.assert_close(first, expected)
    second = torch.autograd.grad(loss * 0.25, s, retain_graph=True)[0]
    torch.testing.assert_close(first, expected)  # unchanged by the second call
    torch.testing.assert_close(second, expected * 0.25)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * expected)


def test_fused_gradient_path_is_not_taken_without_grad_or_under_compile():
    s, t, m = maps((2, 3, 4, 4), "cpu")
    assert not kdops_ops.use_fused_gradient(s, t)
    s.requires_grad_()
    with torch.no_grad():
        assert not kdops_ops.use_fused_gradient(s, t)
        assert F.partial_l2_loss(s, t, m).grad_fn is None
    seen = []

    def probe(a, b):
        seen.append(kdops_ops.use_fused_gradient(a, b))
        return F.partial_l2_loss(a, b, m)

    compiled = torch.compile(probe, fullgraph=True, backend="eager")
    torch.testing.assert_close(torch.autograd.grad(compiled(s, t), s)[0], torch.autograd.grad(probe(s, t), s)[0])
    assert seen == [False, True]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_with_grad_op_matches_the_op_pair(device, dtype):
    """kdops::partial_l2_with_grad: the forward's sums and, from the same pass, the backward op's gradients."""
    s, t, m = maps((3, 4, 5, 7), device, dtype)
    scale = 0.3
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for ws, wt in ((True, True), (True, False), (False, True), (False, False)):
        sums, gs, gt = torch.ops.kdops.partial_l2_with_grad(s, t, m, scale, ws, wt)
        torch.testing.assert_close(sums, torch.ops.kdops.partial_l2(s, t, m), rtol=0, atol=0)
        grad = torch.full((3,), scale, device=device, dtype=acc)
        es, et = torch.ops.kdops.partial_l2_backward(grad, s, t, m, ws, wt)
        torch.testing.assert_close(gs, es, rtol=0, atol=0)
        torch.testing.assert_close(gt, et, rtol=0, atol=0)
        assert gs.shape == (s.shape if ws else (0,)) and gt.shape == (t.shape if wt else (0,))
    torch.library.opcheck(torch.ops.kdops.partial_l2_with_grad.default, (s, t, m, scale, True, True))


def test_gradients_above_the_huge_page_size_are_written_in_full():
    """Gradient buffers above 32 MiB (advised to use huge pages on the CPU) against the backward op and the
    reference: (65, 128, 32, 32) fp32 is 32.5 MiB per map."""
    s, t, m = maps((65, 128, 32, 32), "cpu", torch.float32)
    _, gs, gt = torch.ops.kdops.partial_l2_with_grad(s, t, m, 1.0, True, True)
    es, et = torch.ops.kdops.partial_l2_backward(torch.ones(65), s, t, m, True, True)
    torch.testing.assert_close(gs, es, rtol=0, atol=0)
    torch.testing.assert_close(gt, et, rtol=0, atol=0)
    a = s.double().requires_grad_()
    ref = R.partial_l2_loss(a, t.double(), m.double(), reduction="sum")
    torch.testing.assert_close(gs.double(), torch.autograd.grad(ref, a)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("hw", [(7, 7), (8, 8), (16, 16)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_kernels_equal_the_fp32_kernel_rounded(dtype, hw):
    """The 16-bit CPU loops compute in fp32 and round once, so their gradients must equal the fp32 kernel's on the
    upcast maps, rounded, bit for bit; the sums agree to fp32 rounding. Planes of 49 elements run in the target
    clones, 256 in the 512-bit build where the CPU has AVX-512, 64 in that build where the loop stores a map."""
    s, t, m = maps((6, 5) + hw, "cpu", dtype)
    s32, t32 = s.float(), t.float()
    scale = 0.7
    sums, gs, gt = torch.ops.kdops.partial_l2_with_grad(s, t, m, scale, True, True)
    sums32, gs32, gt32 = torch.ops.kdops.partial_l2_with_grad(s32, t32, m, scale, True, True)
    torch.testing.assert_close(sums, sums32, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.ops.kdops.partial_l2(s, t, m), sums32, rtol=1e-6, atol=0)
    assert torch.equal(gs, gs32.to(dtype)) and torch.equal(gt, gt32.to(dtype))
    grad = torch.rand(6)
    for got, want in zip(torch.ops.kdops.partial_l2_backward(grad, s, t, m, True, True),
                         torch.ops.kdops.partial_l2_backward(grad, s32, t32, m, True, True)):
        assert torch.equal(got, want.to(dtype))
    assert torch.equal(F.margin_relu(t, m), F.margin_relu(t32, m).to(dtype))
    upstream = torch.randn_like(t)
    assert torch.equal(torch.ops.kdops.margin_relu_backward(upstream, t, m),
                       torch.ops.kdops.margin_relu_backward(upstream.float(), t32, m).to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype):
    s, t, m = maps((2, 4, 3, 5), device, dtype)
    s.requires_grad_()
    t.requires_grad_()
    torch.library.opcheck(torch.ops.kdops.partial_l2.default, (s, t, m))
    torch.library.opcheck(torch.ops.kdops.margin_relu.default, (t, m))
    grad = torch.rand(2, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    for ws, wt in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.kdops.partial_l2_backward.default, (grad, s.detach(), t.detach(), m, ws, wt))
    torch.library.opcheck(torch.ops.kdops.margin_relu_backward.default, (torch.rand_like(t), t.detach(), m))


def test_torch_compile_fullgraph():
    s, t, m = maps((4, 8, 4, 4), "cpu")
    compiled = torch.compile(lambda a, b: F.partial_l2_loss(a, b, m) + F.margin_relu(b, m).sum(), fullgraph=True)
    eager = lambda a, b: F.partial_l2_loss(a, b, m) + F.margin_relu(b, m).sum()  # noqa: E731
    results = []
    for f in (eager, compiled):
        a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
        out = f(a, b)
        results.append((out.detach(),) + torch.autograd.grad(out, (a, b)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(device, dtype):
    s, t, m = maps((8, 64, 16, 16), device, dtype)
    exact = loss_and_grads(R.partial_l2_loss, s.double(), t.double(), m.double())
    ours = loss_and_grads(F.partial_l2_loss, s, t, m)
    theirs = loss_and_grads(R.partial_l2_loss, s, t, m)
    assert ours[0].dtype == torch.float32 and torch.isfinite(ours[0])
    # the loss is accumulated in fp32: it must match the float64 result to fp32 accuracy
    torch.testing.assert_close(ours[0].double(), exact[0], rtol=1e-5, atol=0)
    eps = torch.finfo(dtype).eps
    for a, b, e in zip(ours[1:], theirs[1:], exact[1:]):
        assert a.dtype == dtype
        err_ours, err_torch = (a.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
        assert err_ours <= 2 * err_torch + eps * e.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_value_passes_through_exactly(dtype):
    # margin_relu with a margin below every value is the identity: all 65536 bit patterns (subnormals, inf,
    # NaN included) must survive the kernels' fp32 round trip bit for bit.
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).reshape(4, 2, 8192).clone()
    y = F.margin_relu(x, torch.full((2,), float("-inf")))
    finite = ~torch.isnan(x)
    assert torch.equal(y[finite].view(torch.int16), x[finite].view(torch.int16))
    assert torch.isnan(y[~finite]).all()
    # and through the backward, which passes the gradient where x > margin
    g = torch.ops.kdops.margin_relu_backward(x, torch.ones_like(x), torch.zeros(2))
    assert torch.equal(g[finite].view(torch.int16), x[finite].view(torch.int16))


def test_nan_propagates():
    s, t, m = maps((2, 3, 4, 4), "cpu")
    t[1, 2, 0, 0] = float("nan")
    assert torch.isnan(torch.ops.kdops.partial_l2(s, t, m)[1])
    assert torch.isnan(F.margin_relu(t, m)[1, 2, 0, 0])


BAD = [
    (lambda s, t, m: F.partial_l2_loss(s[:, :3], t, m), "connector"),
    (lambda s, t, m: F.partial_l2_loss(s[..., :2], t, m), "same shape"),
    (lambda s, t, m: F.partial_l2_loss(s, t.long(), m), "teacher must be a floating-point"),
    (lambda s, t, m: F.partial_l2_loss(s, t, m[:-1]), "margin must have shape"),
    (lambda s, t, m: F.partial_l2_loss(s[0, 0, 0], t[0, 0, 0], m), r"\(b, C, \*spatial\)"),
    (lambda s, t, m: F.partial_l2_loss(s, t, m, reduction="none"), "reduction"),
    (lambda s, t, m: F.partial_l2_loss(s, t.to("meta"), m), "same device"),
    (lambda s, t, m: F.margin_relu(t, m.long()), "margin must be a floating-point"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs(case):
    fn, message = BAD[case]
    s, t, m = maps((2, 4, 3, 3), "cpu")
    with pytest.raises(ValueError, match=message):
        fn(s, t, m)
