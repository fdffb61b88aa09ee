"""Relational losses (FKD, SP, RKD, PKT, CC, NST, AT, FSP) and primitives: parity with the published-style
references (loss, student and teacher gradients), the published conventions on hand-computed cases, float64
gradcheck, opcheck, compile, low precision, extremes, bad inputs and the global batch under torch.distributed."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as TF

from conftest import DEVICES
from kdops import functional as F
from kdops import nn as knn
from kdops import reference as R
from kdops.functional import relational

BATCH_LOSSES = ["fkd_loss", "sp_loss", "rkd_distance_loss", "rkd_angle_loss", "pkt_loss", "cc_loss"]
MAP_LOSSES = ["at_loss", "nst_loss"]


def values_and_grads(fn, s, t, **kw):
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    out = fn(s, t, **kw)
    gs, gt = torch.autograd.grad(out * 0.7, (s, t))
    return out.detach(), gs, gt


def assert_parity(name, s, t, rtol=1e-7, atol=1e-10, **kw):
    ours = values_and_grads(getattr(F, name), s, t, **kw)
    ref = values_and_grads(getattr(R, name), s.double(), t.double(), **kw)
    for what, a, b in zip(("loss", "student grad", "teacher grad"), ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=lambda m: "%s %s: %s" % (name, what, m))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BATCH_LOSSES)
@pytest.mark.parametrize("b, ds, dt", [(2, 5, 5), (3, 1, 1), (37, 5, 9), (37, 1000, 600), (64, 8, 12)])
def test_batch_losses_match_reference(device, name, b, ds, dt):
    g = torch.Generator().manual_seed(b * 1000 + ds)
    s = torch.randn(b, ds, generator=g, dtype=torch.float64).to(device)
    t = torch.randn(b, dt, generator=g, dtype=torch.float64).to(device)
    assert_parity(name, s, t)


@pytest.mark.parametrize("name", ["sp_loss", "pkt_loss", "cc_loss", "fkd_loss", "rkd_distance_loss"])
def test_wide_batches_take_the_blocked_gram_and_match_reference(name):
    """b >= 256 and b d >= 2^18: x x^T is formed from three block products (its symmetric half)."""
    g = torch.Generator().manual_seed(12)
    s = torch.randn(256, 1030, generator=g, dtype=torch.float64)
    t = torch.randn(256, 1100, generator=g, dtype=torch.float64)
    a = s[:, :9].contiguous()
    torch.testing.assert_close(relational._gram_product(s), s @ s.T, rtol=1e-12, atol=1e-12)
    plain = a @ a.T
    # narrow: the plain GEMM, made exactly symmetric
    torch.testing.assert_close(relational._gram_product(a), (plain + plain.T) * 0.5, rtol=0, atol=0)
    for x in (s, a):
        gram = relational._gram_product(x)
        assert torch.equal(gram, gram.T)
    assert_parity(name, s, t, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MAP_LOSSES + ["sp_loss", "rkd_angle_loss"])
def test_map_inputs_match_reference(device, name):
    s = torch.randn(6, 5, 4, 3, dtype=torch.float64, device=device)
    t = torch.randn(6, 7, 4, 3, dtype=torch.float64, device=device)  # channels differ
    assert_parity(name, s, t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", [((4, 16, 2, 2), (4, 24, 2, 2)), ((4, 3, 5, 5), (4, 4, 5, 5)),
                                    ((3, 6, 3, 2), (3, 6, 3, 2))],
                         ids=["hw-gram", "channel-gram", "hw-gram-equal-channels"])
def test_nst_both_forms_match_reference(device, shapes):
    # HW (C_s + C_t) below / above C_s^2 + C_t^2 + C_s C_t picks the (b, HW, HW) or the (b, C, C') Grams;
    # 6 x (6 + 6) = 72 < 108 takes the HW form with equal channels
    s = torch.randn(*shapes[0], dtype=torch.float64, device=device)
    t = torch.randn(*shapes[1], dtype=torch.float64, device=device)
    assert_parity("nst_loss", s, t)


@pytest.mark.parametrize("device", DEVICES)
def test_at_paper_mode_and_fsp_match_reference(device):
    s = torch.randn(5, 6, 4, 4, dtype=torch.float64, device=device)
    t = torch.randn(5, 3, 4, 4, dtype=torch.float64, device=device)
    assert_parity("at_loss", s, t, mode="paper")
    assert_parity("at_loss", s, t, p=3)
    pairs_s = [(torch.randn(4, 3, 5, 5, dtype=torch.float64, device=device).requires_grad_(),
                torch.randn(4, 6, 5, 5, dtype=torch.float64, device=device).requires_grad_())]
    pairs_t = [(torch.randn(4, 3, 5, 5, dtype=torch.float64, device=device),
                torch.randn(4, 6, 5, 5, dtype=torch.float64, device=device))]
    ours, ref = F.fsp_loss(pairs_s, pairs_t), R.fsp_loss(pairs_s, pairs_t)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(ours, pairs_s[0]), torch.autograd.grad(ref, pairs_s[0])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
def test_fkd_ensemble_kernels_and_identity(device):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(50, 7, generator=g, dtype=torch.float64).to(device)
    teachers = [torch.randn(50, w, generator=g, dtype=torch.float64).to(device) for w in (9, 30)]
    for kernel in ("correlation", "linear"):
        for b in (50, 12):  # b > every width: the d x d identity; b <= a width: the b x b kernels
            kw = dict(kernel=kernel, fr_weight=0.3, fr_power=1)
            ours = F.fkd_loss(s[:b], [t[:b] for t in teachers], **kw)
            torch.testing.assert_close(ours, R.fkd_loss(s[:b], [t[:b] for t in teachers], **kw), rtol=1e-10, atol=0)
    assert_parity("fkd_loss", s, teachers[1], kernel="linear")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", ["correlation", "linear"])
@pytest.mark.parametrize("fr_power", [1, 2])
def test_fkd_fused_gram_matches_reference_with_regularisation_and_ensembles(device, kernel, fr_power):
    """b <= the widths: the fused op over the student's Gram matrix, its normalisation and the feature
    regularisation from the diagonal; gradients to student and teachers, a zero row included."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(12, 20, generator=g, dtype=torch.float64).to(device)
    t = torch.randn(12, 16, generator=g, dtype=torch.float64).to(device)
    s[3] = 0.0
    assert_parity("fkd_loss", s, t, kernel=kernel, fr_weight=0.3, fr_power=fr_power)
    teachers = [t.clone().requires_grad_(), torch.randn(12, 25, generator=g, dtype=torch.float64).to(device)]
    a = s.clone().requires_grad_()
    kw = dict(kernel=kernel, fr_weight=0.2, fr_power=fr_power)
    ours, ref = F.fkd_loss(a, teachers, **kw), R.fkd_loss(a, teachers, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=0)
    for x, y in zip(torch.autograd.grad(ours, (a, teachers[0])), torch.autograd.grad(ref, (a, teachers[0]))):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_primitives_batched_and_against_reference(device):
    x = torch.randn(3, 9, 4, dtype=torch.float64, device=device)
    for fn, kw in ((F.gram, dict(kernel="cosine")), (F.gram, {}), (F.pairwise_distance, {}),
                   (F.pairwise_distance, dict(squared=True)), (F.angle_tensor, {})):
        out = fn(x, **kw)
        torch.testing.assert_close(out, getattr(R, fn.__name__)(x, **kw), rtol=1e-9, atol=1e-10)
        for i in range(3):
            torch.testing.assert_close(out[i], fn(x[i], **kw), rtol=1e-12, atol=1e-14)
    assert F.angle_tensor(x).shape == (3, 9, 9, 9)
    assert (F.pairwise_distance(x).diagonal(dim1=1, dim2=2) == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn, kw", [(F.gram, dict(kernel="cosine")), (F.pairwise_distance, {}),
                                    (F.pairwise_distance, dict(squared=True)), (F.angle_tensor, {})],
                         ids=["cosine", "dist", "sqdist", "angle"])
def test_primitive_gradients_match_reference(device, fn, kw):
    """The fused Gram-matrix primitives' backward (direct terms plus the diagonal's row and column sums)
    against autograd through the reference, for a non-symmetric incoming gradient, batched and not, with a
    zero row and a duplicate point."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 7, 5, generator=g, dtype=torch.float64).to(device)
    x[0, 2] = 0.0
    if fn is not F.angle_tensor:  # the reference's normalize() of a zero difference has a 1/eps gradient
        x[1, 4] = x[1, 1]
    up = torch.randn(fn(x, **kw).shape, generator=g, dtype=torch.float64).to(device)
    if fn is F.angle_tensor:
        # psi[a, a, k] and psi[a, j, a] are constant 0; the reference's gradient there is normalize()'s 1/eps
        # times a zero vector's, cancelling only up to rounding (~1e-4), so no gradient is sent through them
        eye = torch.eye(7, dtype=torch.bool, device=device)
        up = up.masked_fill(eye.unsqueeze(-1), 0.0).masked_fill(eye.unsqueeze(-2), 0.0)
    for xs, ups in ((x, up), (x[1], up[1])):
        a, b = xs.clone().requires_grad_(), xs.clone().requires_grad_()
        ours, ref = fn(a, **kw), getattr(R, fn.__name__)(b, **kw)
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(torch.autograd.grad(ours, a, ups)[0], torch.autograd.grad(ref, b, ups)[0],
                                   rtol=1e-7, atol=1e-9)


def test_gram_transform_op_gradcheck_and_opcheck():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    gm = x @ x.transpose(-1, -2)
    assert torch.autograd.gradcheck(torch.ops.kdops.angle_tensor_gram, (gm.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(torch.ops.kdops.angle_tensor_gram, (gm[0].clone().requires_grad_(),))
    torch.library.opcheck(torch.ops.kdops.angle_tensor_gram, (gm.float().requires_grad_(),))
    torch.library.opcheck(torch.ops.kdops.angle_tensor_gram_backward, (torch.rand(2, 6, 6, 6, dtype=gm.dtype), gm))
    for kind in (0, 1, 2):
        assert torch.autograd.gradcheck(lambda a: torch.ops.kdops.gram_transform(a, kind),
                                        (gm.clone().requires_grad_(),)), kind
        torch.library.opcheck(torch.ops.kdops.gram_transform, (gm.float().requires_grad_(), kind))
        out = torch.ops.kdops.gram_transform(gm, kind)
        torch.library.opcheck(torch.ops.kdops.gram_transform_backward, (torch.rand_like(gm), gm, out, kind))
    with pytest.raises(RuntimeError, match="kind must be"):
        torch.ops.kdops.gram_transform(gm, 3)
    with pytest.raises(RuntimeError, match=r"\(n, n\) or \(B, n, n\)"):
        torch.ops.kdops.gram_transform(torch.randn(3, 4), 0)


def test_at_map_op_gradcheck_opcheck_and_reference():
    g = torch.Generator().manual_seed(9)
    f = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    for p, mean in ((2.0, True), (3.0, False), (1.5, True)):
        ref = f.abs().pow(p)
        ref = ref.mean(1) if mean else ref.sum(1)
        torch.testing.assert_close(torch.ops.kdops.at_map(f, p, mean), ref, rtol=1e-12, atol=0)
        assert torch.autograd.gradcheck(lambda x: torch.ops.kdops.at_map(x, p, mean), (f.clone().requires_grad_(),))
        torch.library.opcheck(torch.ops.kdops.at_map, (f.float().requires_grad_(), p, mean))
        torch.library.opcheck(torch.ops.kdops.at_map_backward, (torch.rand(3, 7, dtype=f.dtype), f, p, mean))
    with pytest.raises(RuntimeError, match="p must be finite and > 0"):
        torch.ops.kdops.at_map(f, 0.0, True)
    with pytest.raises(RuntimeError, match=r"\(b, C, HW\)"):
        torch.ops.kdops.at_map(f[0], 2.0, True)


def test_published_conventions_on_hand_computed_cases():
    # SP: G = F F^T row-normalised, |.|_F^2 / b^2
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    # G~_s = I; G~_t = all 1/sqrt(2); |I - G~_t|^2 = 2 (1 - 1/sqrt2)^2 + 2 (1/2)
    expected = (2 * (1 - 2 ** -0.5) ** 2 + 1.0) / 4
    assert F.sp_loss(s, t).item() == pytest.approx(expected, rel=1e-12)
    # PKT: the mean over all b^2 entries (not a sum, not per row)
    ps = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    pt = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    # P_s = [[2/3, 1/3], [1/3, 2/3]], P_t = all 1/2 (eps ignored below 1e-6 relative)
    kl = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))
    assert F.pkt_loss(ps, pt).item() == pytest.approx(2 * kl / 4, rel=1e-6)
    # CC: the Frobenius norm itself (not squared) / b^2
    e1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    e2 = torch.zeros(2, 2, dtype=torch.float64)
    k = lambda z: math.exp(-0.8) * (1 + 0.8 * z + 0.32 * z * z)  # noqa: E731
    diff = torch.tensor([[k(1) - k(0), 0.0], [0.0, k(1) - k(0)]], dtype=torch.float64)
    assert F.cc_loss(e1, e2).item() == pytest.approx(diff.norm().item() / 4, rel=1e-12)
    # FKD: the diagonal is left out and the sum is over b(b-1) pairs
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    rho_a = torch.tensor([[1, 0, 2 ** -0.5], [0, 1, 2 ** -0.5], [2 ** -0.5, 2 ** -0.5, 1]], dtype=torch.float64)
    assert F.fkd_loss(a, c).item() == pytest.approx(((rho_a - 1) ** 2).sum().item() / 6, rel=1e-12)
    # AT: code = mean over (b, HW) of squared differences of normalised channel means; paper = per-sample norms
    fs = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    fs[0, :, 0, 0] = 1.0
    ft = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    ft[0, 0, 0, 1] = 3.0
    assert F.at_loss(fs, ft).item() == pytest.approx(1.0, rel=1e-12)  # a_s = (1, 0), a_t = (0, 1)
    assert F.at_loss(fs, ft, mode="paper").item() == pytest.approx(2 ** 0.5, rel=1e-12)


def test_rkd_distance_student_mean_is_not_detached():
    s = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 3, dtype=torch.float64)
    g = torch.autograd.grad(F.rkd_distance_loss(s, t), s)[0]
    d = F.pairwise_distance(s)
    detached = TF.smooth_l1_loss(d / (d.sum() / (d > 0).sum()).detach(),
                                 F.pairwise_distance(t) / F.pairwise_distance(t)[F.pairwise_distance(t) > 0].mean())
    g_detached = torch.autograd.grad(detached, s)[0]
    assert not torch.allclose(g, g_detached, rtol=1e-6)
    torch.testing.assert_close(g, torch.autograd.grad(R.rkd_distance_loss(s, t), s)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_rkd_duplicates_zero_rows_and_near_duplicates(device):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(8, 6, generator=g, dtype=torch.float64).to(device)
    t = torch.randn(8, 6, generator=g, dtype=torch.float64).to(device)
    s[3] = s[1]  # exact duplicate: a zero distance
    t[5] = 0.0  # a zero row
    # the loss matches the reference (degenerate triplets are 0 on both sides); the reference's gradient there
    # is normalize()'s 1/eps blow-up (~1e9), kdops gives degenerate pairs no gradient
    torch.testing.assert_close(F.rkd_angle_loss(s, t), R.rkd_angle_loss(s, t), rtol=1e-10, atol=0)
    for name in BATCH_LOSSES:
        for dtype in (torch.float32, torch.float64):
            out, gs, gt = values_and_grads(getattr(F, name), s.to(dtype), t.to(dtype))
            assert torch.isfinite(out) and torch.isfinite(gs).all() and torch.isfinite(gt).all(), name
    near = s.clone().float()
    near[4] = near[2] + 1e-6  # closer than fp32's Gram identity resolves: treated as coincident, finite
    out, gs, gt = values_and_grads(F.rkd_angle_loss, near, t.float())
    assert torch.isfinite(out) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    zeros = torch.zeros(5, 4, dtype=torch.float64, device=device)
    for name in BATCH_LOSSES + MAP_LOSSES:
        x = zeros if name in BATCH_LOSSES else zeros.view(5, 2, 2, 1)
        out, gs, _ = values_and_grads(getattr(F, name), x, x + 1)
        assert torch.isfinite(out) and torch.isfinite(gs).all(), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
def test_low_precision_inputs(device, dtype, rtol):
    g = torch.Generator().manual_seed(11)
    s = torch.randn(37, 24, generator=g).to(device)
    t = torch.randn(37, 40, generator=g).to(device)
    for name in BATCH_LOSSES:
        ours = getattr(F, name)(s.to(dtype), t.to(dtype))
        assert ours.dtype == torch.float32
        ref = getattr(R, name)(s.to(dtype).double(), t.to(dtype).double())
        torch.testing.assert_close(ours.double(), ref, rtol=rtol, atol=1e-6, msg=lambda m: "%s: %s" % (name, m))
    ms = torch.randn(6, 5, 4, 4, generator=g).to(device)
    mt = torch.randn(6, 7, 4, 4, generator=g).to(device)
    cases = [(name, (ms, mt)) for name in MAP_LOSSES] + [("fsp_matrix", (ms, ms * ms))]
    cases += [("gram", (s,)), ("pairwise_distance", (s,)), ("angle_tensor", (s[:9],))]
    for name, args in cases:
        ours = getattr(F, name)(*(a.to(dtype) for a in args))
        assert ours.dtype == torch.float32, name
        ref = getattr(R, name)(*(a.to(dtype).double() for a in args))
        torch.testing.assert_close(ours.double(), ref, rtol=rtol, atol=1e-5, msg=lambda m: "%s: %s" % (name, m))


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    for name in BATCH_LOSSES:
        assert torch.autograd.gradcheck(getattr(F, name), (s, t)), name
    ms = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    mt = torch.randn(3, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    for name in MAP_LOSSES:
        assert torch.autograd.gradcheck(getattr(F, name), (ms, mt)), name
    gs = s @ s.T
    gt = t @ t.T
    assert torch.autograd.gradcheck(torch.ops.kdops.rkd_angle, (gs.detach().requires_grad_(),
                                                                 gt.detach().requires_grad_()))
    # PKT's and FKD's ops take the raw Gram matrices: every entry, the diagonal (the row norms) included, is an
    # input
    # every order the kernels unroll (0-4) and one past them (the general series)
    for gamma, order in ((0.4, 2), (0.25, 0), (0.3, 1), (0.3, 3), (0.6, 4), (1.5, 5)):
        assert torch.autograd.gradcheck(lambda a, k: torch.ops.kdops.cc_gram(a, k, gamma, order),
                                        (gs.detach().requires_grad_(), gt.detach().requires_grad_()))
        a = torch.randn(5, 4, generator=g, dtype=torch.float64)
        assert_parity("cc_loss", a, t, gamma=gamma, order=order)
    # equal kernels: the norm's subgradient 0, as torch.norm gives
    same = s.detach().clone().requires_grad_()
    loss = F.cc_loss(same, s.detach())
    assert loss.item() == 0.0 and (torch.autograd.grad(loss, same)[0] == 0).all()
    for cosine, fr_power in ((True, 1), (True, 2), (False, 1)):
        assert torch.autograd.gradcheck(lambda a, k: torch.ops.kdops.fkd_gram(a, k, cosine, 0.4, fr_power),
                                        (gs.detach().requires_grad_(), gt.detach().requires_grad_()))
    for eps in (1e-7, 0.3):
        assert torch.autograd.gradcheck(lambda a, b: torch.ops.kdops.pkt_gram(a, b, eps),
                                        (gs.detach().requires_grad_(), gt.detach().requires_grad_()))


@pytest.mark.parametrize("device", DEVICES)
def test_pkt_zero_rows_and_eps_match_reference(device):
    """A zero row has norm 0: the reference's x / (|x| + eps) gives it gradient 1/eps times the normalised
    side's, and the norm's subgradient 0; the fused op over the Gram matrices must give the same."""
    g = torch.Generator().manual_seed(8)
    s = torch.randn(9, 5, generator=g, dtype=torch.float64).to(device)
    t = torch.randn(9, 7, generator=g, dtype=torch.float64).to(device)
    s[2] = 0.0
    t[6] = 0.0
    assert_parity("pkt_loss", s, t, rtol=1e-7, atol=1e-9)
    assert_parity("pkt_loss", s, t, eps=0.05)


def test_opcheck_and_compile():
    s, t = torch.randn(7, 5), torch.randn(7, 3)
    torch.library.opcheck(torch.ops.kdops.rkd_angle, (s @ s.T, t @ t.T))
    torch.library.opcheck(torch.ops.kdops.rkd_angle_backward, (torch.tensor(1.3), s @ s.T, t @ t.T, True, True))
    for name, args in (("sp_gram", ()), ("pkt_gram", (1e-7,)), ("fkd_gram", (True, 0.1, 2)), ("cc_gram", (0.4, 2))):
        gs, gt = (s @ s.T).requires_grad_(), (t @ t.T).requires_grad_()
        torch.library.opcheck(getattr(torch.ops.kdops, name), (gs, gt, *args))
    for name, args in (("sp_gram", ()), ("pkt_gram", (1e-7,)), ("fkd_gram", (True, 0.1, 1)), ("cc_gram", (0.3, 3))):
        backward_op = getattr(torch.ops.kdops, name + "_backward")
        torch.library.opcheck(backward_op, (torch.tensor(0.6), s @ s.T, t @ t.T, *args, True, False))
    for name in ("rkd_angle_loss", "rkd_distance_loss", "sp_loss", "fkd_loss", "pkt_loss", "cc_loss"):
        fn = getattr(F, name)
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(s, t), fn(s, t), rtol=1e-5, atol=1e-7)
    ms, mt = torch.randn(3, 4, 3, 3), torch.randn(3, 2, 3, 3)
    for fn in (F.nst_loss, F.at_loss):
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(ms, mt), fn(ms, mt), rtol=1e-5, atol=1e-7)
    fsp = lambda a, b: F.fsp_loss([(a, a * a)], [(b, b * b)])  # noqa: E731
    torch.testing.assert_close(torch.compile(fsp, fullgraph=True)(ms, ms + 1), fsp(ms, ms + 1), rtol=1e-5, atol=1e-7)
    x = torch.randn(2, 5, 3, requires_grad=True)
    for prim in (lambda v: F.gram(v, kernel="cosine"), F.pairwise_distance, F.angle_tensor):
        ours = torch.compile(prim, fullgraph=True)(x)
        torch.testing.assert_close(ours, prim(x), rtol=1e-5, atol=1e-6)
        up = torch.randn(ours.shape)
        torch.testing.assert_close(torch.autograd.grad(ours, x, up)[0], torch.autograd.grad(prim(x), x, up)[0],
                                   rtol=1e-4, atol=1e-5)


def test_modules_match_functionals():
    s, t = torch.randn(9, 6), torch.randn(9, 4)
    torch.testing.assert_close(knn.RKDLoss()(s, t), 25 * F.rkd_distance_loss(s, t) + 50 * F.rkd_angle_loss(s, t))
    torch.testing.assert_close(knn.FKDLoss(fr_weight=0.1)(s, [t, s]), F.fkd_loss(s, [t, s], fr_weight=0.1))
    torch.testing.assert_close(knn.PKTLoss()(s, t), F.pkt_loss(s, t))
    torch.testing.assert_close(knn.CCLoss(gamma=0.3)(s, t), F.cc_loss(s, t, gamma=0.3))
    torch.testing.assert_close(knn.SPLoss()(s, t), F.sp_loss(s, t))
    ms, mt = torch.randn(3, 4, 3, 3), torch.randn(3, 2, 3, 3)
    torch.testing.assert_close(knn.ATLoss(mode="paper")(ms, mt), F.at_loss(ms, mt, mode="paper"))
    torch.testing.assert_close(knn.NSTLoss()(ms, mt), F.nst_loss(ms, mt))
    ms2 = torch.randn(3, 4, 3, 3)
    torch.testing.assert_close(knn.FSPLoss()([(ms, mt)], [(ms2, mt)]), F.fsp_loss([(ms, mt)], [(ms2, mt)]))


@pytest.mark.parametrize("call, message", [
    (lambda: F.sp_loss(torch.randn(1, 3), torch.randn(1, 3)), "at least 2"),
    (lambda: F.rkd_angle_loss(torch.randn(4, 3), torch.randn(5, 3)), "same batch size"),
    (lambda: F.fkd_loss(torch.randn(4, 3), [torch.randn(4, 2), torch.randn(3, 2)]), "same batch size"),
    (lambda: F.fkd_loss(torch.randn(4, 3), torch.randn(4, 3), kernel="rbf"), "kernel"),
    (lambda: F.fkd_loss(torch.randn(4, 3), []), "empty"),
    (lambda: F.at_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)), "spatial size"),
    (lambda: F.nst_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)), "spatial size"),
    (lambda: F.nst_loss(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4)), "same batch size"),
    (lambda: F.fsp_loss([(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))],
                        [(torch.randn(2, 4, 4, 4), torch.randn(2, 5, 4, 4))]), "channels must match"),
    (lambda: F.fsp_matrix(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)), "spatial size"),
    (lambda: F.pkt_loss(torch.randint(0, 3, (4, 3)), torch.randn(4, 3)), "floating-point"),
    (lambda: F.pkt_loss(torch.randn(4, 3), torch.randn(4, 3), eps=-1e-7), "eps"),
    (lambda: torch.ops.kdops.pkt_gram(torch.eye(3), torch.eye(3), -1.0), "eps must be finite and >= 0"),
    (lambda: torch.ops.kdops.pkt_gram(torch.eye(3), torch.eye(4), 1e-7), "must both be"),
    (lambda: torch.ops.kdops.fkd_gram(torch.eye(3), torch.eye(3), True, 0.0, 3), "fr_power must be 1 or 2"),
    (lambda: torch.ops.kdops.cc_gram(torch.eye(3), torch.eye(3), 0.4, -1), "order must be >= 0"),
    (lambda: F.cc_loss(torch.randn(4, 3), torch.randn(4, 3), gamma=math.inf), "gamma must be a finite"),
    (lambda: torch.ops.kdops.fkd_gram(torch.eye(1), torch.eye(1), True, 0.0, 2), "at least 2"),
    (lambda: F.gram(torch.randn(3), kernel="linear"), "dims"),
    (lambda: torch.ops.kdops.rkd_angle(torch.randn(3, 3), torch.randn(3, 4)), "must both be"),
])
def test_bad_inputs(call, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        call()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank, world, port, s, t, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        half = s.shape[0] // world
        results = {}
        for name in BATCH_LOSSES:
            local = s[rank * half:(rank + 1) * half].clone().requires_grad_()
            loss = getattr(F, name)(local, t[rank * half:(rank + 1) * half], gather_distributed=True)
            results[name] = (loss.detach(), torch.autograd.grad(loss, local)[0])
        out[rank] = results
    finally:
        dist.destroy_process_group()


def test_gather_distributed_two_processes_equals_global_batch():
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(12, 5, generator=g), torch.randn(12, 7, generator=g)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_distributed_worker, args=(2, _free_port(), s, t, out), nprocs=2, join=True)
        out = dict(out)
    for name in BATCH_LOSSES:
        sg = s.clone().requires_grad_()
        ref = getattr(F, name)(sg, t)
        ref_grad = torch.autograd.grad(ref, sg)[0]
        for rank in range(2):
            loss, grad = out[rank][name]
            torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-7, msg=lambda m: name + m)
            # every rank's loss is the global one; all_gather's backward sums them: world_size x the gradient
            torch.testing.assert_close(grad / 2, ref_grad[rank * 6:(rank + 1) * 6], rtol=1e-4, atol=1e-7,
                                       msg=lambda m: name + m)
