"""logsum (the LogSum of the projector recipe) and ProjectorLogSumLoss: parity, gradients, opcheck,
compile, overflow-free low precision, bad inputs."""

import pytest
import torch

from conftest import DEVICES
from kdops import functional as F
from kdops import nn as knn
from kdops import reference as R


def pair(shape, device, dtype=torch.float32, scale=1.0):
    a = torch.randn(shape, dtype=torch.float64) * scale
    b = torch.randn(shape, dtype=torch.float64) * scale
    return a.to(device, dtype), b.to(device, dtype)


def value_and_grads(fn, a, b, as_pair, **kw):
    a = a.detach().requires_grad_()
    b = b.detach().requires_grad_()
    out = fn((a, b) if as_pair else a - b, **kw)
    ga, gb = torch.autograd.grad(out * 0.6, (a, b))
    return out.detach(), ga, gb


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 3.0, 4.0, 5.0])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
@pytest.mark.parametrize("as_pair", [True, False], ids=["pair", "delta"])
def test_parity_with_reference(device, alpha, eps, as_pair):
    a, b = pair((37, 129), device)
    ours = value_and_grads(F.logsum_loss, a, b, as_pair, alpha=alpha, eps=eps)
    ref = value_and_grads(R.logsum_loss, a.double(), b.double(), as_pair, alpha=alpha, eps=eps)
    for what, x, y in zip(("loss", "grad a", "grad b"), ours, ref):
        torch.testing.assert_close(x.double(), y, rtol=2e-5, atol=1e-7, msg=lambda m: "%s: %s" % (what, m))


def test_large_sums_keep_fp32_accuracy():
    # millions of terms: the fp32 sum must still match float64 to fp32 accuracy
    a, b = pair((1024, 2048), "cpu")
    torch.testing.assert_close(F.logsum_loss((a, b)).double(), R.logsum_loss((a.double(), b.double())),
                               rtol=1e-6, atol=0)


def test_gradients_above_the_huge_page_size_are_written_in_full():
    """Gradient buffers above 32 MiB (advised to use huge pages on the CPU), for both inputs, against the reference."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(9_000_000, generator=g).requires_grad_()
    b = torch.randn(9_000_000, generator=g).requires_grad_()
    ga, gb = torch.autograd.grad(F.logsum_loss((a, b), alpha=2.0), (a, b))
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ra, rb = torch.autograd.grad(R.logsum_loss((a64, b64), alpha=2.0), (a64, b64))
    torch.testing.assert_close(ga.double(), ra, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-5, atol=1e-12)


def test_gradcheck_float64():
    a, b = pair((5, 7), "cpu", torch.float64)
    a.requires_grad_()
    b.requires_grad_()
    for alpha in (1.5, 4.0):
        assert torch.autograd.gradcheck(lambda x, y: F.logsum_loss((x, y), alpha=alpha, eps=1e-3), (a, b))
        assert torch.autograd.gradcheck(lambda x: F.logsum_loss(x, alpha=alpha), (a,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_does_not_overflow(device, dtype):
    # |delta| ~ 300: delta^4 ~ 1e10 overflows fp16 (max 65504), so the reference in fp16 gives inf.
    a, b = pair((16, 64), device, dtype, scale=200.0)
    exact = value_and_grads(R.logsum_loss, a.double(), b.double(), True)
    ours = value_and_grads(F.logsum_loss, a, b, True)
    assert ours[0].dtype == torch.float32 and torch.isfinite(ours[0])
    torch.testing.assert_close(ours[0].double(), exact[0], rtol=1e-5, atol=1e-5)
    for g, e in zip(ours[1:], exact[1:]):
        assert g.dtype == dtype and torch.isfinite(g).all()
        # one rounding to the dtype; below its smallest normal number no relative precision is representable
        torch.testing.assert_close(g.double(), e, rtol=2 * torch.finfo(dtype).eps, atol=torch.finfo(dtype).tiny)


def test_zero_delta_gives_zero_gradient():
    a = torch.zeros(3, 4, requires_grad=True)
    loss = F.logsum_loss(a, alpha=1.5, eps=1.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    a, b = pair((6, 10), device)
    a.requires_grad_()
    b.requires_grad_()
    torch.library.opcheck(torch.ops.kdops.logsum.default, (a, b, 4.0, 0.0))
    torch.library.opcheck(torch.ops.kdops.logsum.default, (a, None, 1.5, 1e-3))
    loss, total = torch.ops.kdops.logsum(a, b, 4.0, 0.0)
    for wa, wb in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.kdops.logsum_backward.default,
                              (torch.tensor(0.5, device=device), a.detach(), b.detach(), total, 4.0, 0.0, wa, wb))


def test_torch_compile_fullgraph():
    a, b = pair((8, 32), "cpu")
    fn = lambda x, y: F.logsum_loss((x, y), alpha=4.0)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    results = []
    for f in (fn, compiled):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = f(x, y)
        results.append((out.detach(),) + torch.autograd.grad(out, (x, y)))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y)


def reference_projector_logsum(module, z_s, z_t):
    p = module.projector(z_s)
    if module.norm == "bn":
        norm = lambda x: torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-4)  # noqa: E731
    elif module.norm == "l2":
        norm = lambda x: x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    elif module.norm == "group":
        norm = lambda x: torch.nn.functional.group_norm(x, module.groups)  # noqa: E731
    else:
        norm = lambda x: x  # noqa: E731
    return module.weight * R.logsum_loss(norm(p) - norm(z_t), alpha=module.alpha)


@pytest.mark.parametrize("norm", ["bn", "l2", "group", "none"])
@pytest.mark.parametrize("projector", ["linear", "mlp"])
def test_projector_logsum_module(norm, projector):
    module = knn.ProjectorLogSumLoss(24, 64, alpha=4.0, norm=norm, projector=projector, hidden=32, groups=8)
    z_s, z_t = torch.randn(16, 24), torch.randn(16, 64)
    loss = module(z_s, z_t)
    expected = reference_projector_logsum(module, z_s, z_t)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, list(module.parameters()))
    ref_grads = torch.autograd.grad(expected, list(module.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm", ["bn", "l2"])
def test_identity_projector_compares_the_features_themselves(norm):
    module = knn.ProjectorLogSumLoss(32, 32, alpha=4.0, norm=norm, projector="identity")
    assert not list(module.parameters())
    z_s, z_t = torch.randn(16, 32, requires_grad=True), torch.randn(16, 32)
    n = (lambda x: torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-4)) if norm == "bn" \
        else (lambda x: torch.nn.functional.normalize(x, dim=1))
    expected = module.weight * R.logsum_loss(n(z_s) - n(z_t), alpha=4.0)
    loss = module(z_s, z_t)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, z_s)[0], torch.autograd.grad(expected, z_s)[0],
                               rtol=1e-4, atol=1e-6)


BAD = [
    (lambda a, b: F.logsum_loss((a, b), alpha=-1.0), "alpha"),
    (lambda a, b: F.logsum_loss((a, b), alpha=0.0), "alpha"),
    (lambda a, b: F.logsum_loss((a, b), eps=-1.0), "eps"),
    (lambda a, b: F.logsum_loss((a, b[:, :3])), "same shape"),
    (lambda a, b: F.logsum_loss((a, b.long())), "b must be a floating-point"),
    (lambda a, b: F.logsum_loss((a, b, a)), "two tensors"),
    (lambda a, b: F.logsum_loss(a[:0]), "empty"),
    (lambda a, b: knn.ProjectorLogSumLoss(4, 4)(a[:1, :4], b[:1, :4]), "at least 2"),
    (lambda a, b: knn.ProjectorLogSumLoss(4, 4, norm="layer"), "norm must be one of"),
    (lambda a, b: knn.ProjectorLogSumLoss(4, 4)(a[:, :4], b[:, :5]), "teacher_dim"),
    (lambda a, b: knn.ProjectorLogSumLoss(4, 6, projector="identity"), "needs student_dim == teacher_dim"),
    (lambda a, b: knn.ProjectorLogSumLoss(4, 4, projector="conv"), "'linear', 'mlp' or 'identity'"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs(case):
    fn, message = BAD[case]
    a, b = pair((4, 6), "cpu")
    with pytest.raises(ValueError, match=message):
        fn(a, b)
