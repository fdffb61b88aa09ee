"""mutual_kd_loss (Deep Mutual Learning's term for N peers, the fused kdops::mutual_kd op): parity with the
pairwise reference (values and each peer's gradient with the other peers detached), odd shapes, temperatures,
reductions, 16-bit inputs within PyTorch's own error, gradcheck, opcheck, compile, extremes and bad inputs."""

import math

import pytest
import torch

from conftest import DEVICES
from kdops import functional as F
from kdops import nn as knn
from kdops import reference as R


def peers(n, shape, device, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
            for _ in range(n)]


def values_and_grads(fn, zs, weights, **kw):
    leaves = [z.detach().clone().requires_grad_() for z in zs]
    out = fn(leaves, **kw)
    grads = torch.autograd.grad((out * weights.to(out.dtype).view(-1, *[1] * (out.dim() - 1))).sum(), leaves)
    return out.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, shape", [(2, (7, 13)), (3, (33, 1271)), (5, (4, 3, 10)), (9, (17, 100)), (2, (1, 1))])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_matches_pairwise_reference(device, n, shape, temperature, reduction):
    zs = peers(n, shape, device)
    w = torch.linspace(0.5, 2.0, n, device=device)  # grad_output != 1, different per peer
    kw = dict(temperature=temperature, reduction=reduction)
    ours, ours_g = values_and_grads(F.mutual_kd_loss, zs, w, **kw)
    ref, ref_g = values_and_grads(R.mutual_kd_loss, [z.double() for z in zs], w.double(), **kw)
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    # fp32: a gradient entry N p_i - S cancels terms of the size of the row's largest entries
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_g, ref_g):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_stacked_input_average_peers_and_module(device):
    zs = peers(4, (6, 11), device, seed=1)
    stacked = torch.stack(zs)
    a = F.mutual_kd_loss(zs, temperature=2.0, average_peers=True)
    b = F.mutual_kd_loss(stacked, temperature=2.0, average_peers=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref = R.mutual_kd_loss([z.double() for z in zs], temperature=2.0, average_peers=True)
    torch.testing.assert_close(a.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(knn.MutualKDLoss(temperature=2.0, average_peers=True)(zs), a, rtol=0, atol=0)
    no_t2 = F.mutual_kd_loss(zs, temperature=2.0, scale_t2=False)
    torch.testing.assert_close(no_t2 * 4, F.mutual_kd_loss(zs, temperature=2.0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_is_n_p_minus_s_and_reaches_each_peer_only(device):
    # the gradient of peer 0's term reaches peer 0 only, and is (N p_0 - S) / T / rows there
    zs = [z.requires_grad_() for z in peers(3, (5, 8), device, dtype=torch.float64, seed=2)]
    T = 2.0
    out = F.mutual_kd_loss(zs, temperature=T, scale_t2=False)
    grads = torch.autograd.grad(out[0], zs, allow_unused=True)
    p = [torch.softmax(z.detach() / T, -1) for z in zs]
    expect = (3 * p[0] - sum(p)) / T / 5
    torch.testing.assert_close(grads[0], expect, rtol=1e-12, atol=1e-15)
    for g in grads[1:]:
        assert g is None or torch.count_nonzero(g) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_identical_peers_give_zero(device):
    z = peers(1, (9, 37), device)[0]
    out = F.mutual_kd_loss([z, z.clone(), z.clone()], temperature=4.0)
    assert (out >= 0).all()
    torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_within_torch_error(device, dtype):
    zs = peers(3, (64, 100), device, dtype=dtype, seed=3)
    w = torch.tensor([1.0, -0.5, 2.0], device=device)
    exact, exact_g = values_and_grads(R.mutual_kd_loss, [z.double() for z in zs], w.double(), temperature=2.0)
    ours, ours_g = values_and_grads(F.mutual_kd_loss, zs, w, temperature=2.0)
    theirs, theirs_g = values_and_grads(R.mutual_kd_loss, zs, w, temperature=2.0)
    assert ours.dtype == dtype and all(g.dtype == dtype for g in ours_g)
    eps = torch.finfo(dtype).eps

    def err(a, b):
        return (a.double() - b).abs().max().item()

    assert err(ours, exact) <= 2 * err(theirs, exact) + eps * exact.abs().max().item()
    for a, b, c in zip(ours_g, exact_g, theirs_g):
        assert err(a, b) <= 2 * err(c, b) + eps * b.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_promote(device):
    zs = peers(2, (5, 7), device, seed=4)
    out = F.mutual_kd_loss([zs[0].to(torch.bfloat16), zs[1]])
    assert out.dtype == torch.float32
    ref = R.mutual_kd_loss([zs[0].to(torch.bfloat16).double(), zs[1].double()])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_extremes(device):
    # logits of +-1e4 (one-hot peers), and a masked class (-inf) that another peer gives mass: +inf
    z1 = torch.tensor([[1e4, 0.0, -1e4], [0.0, 0.0, 0.0]], device=device)
    z2 = torch.tensor([[0.0, 1e4, -1e4], [0.0, 0.0, 0.0]], device=device)
    ref = R.mutual_kd_loss([z1.double(), z2.double()], reduction="none")
    ours = F.mutual_kd_loss([z1, z2], reduction="none")
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    masked = torch.tensor([[0.0, float("-inf")]], device=device)
    other = torch.tensor([[0.0, 0.0]], device=device)
    out = F.mutual_kd_loss([masked, other], reduction="none")
    # peer 1's term KL([1, 0] || [1/2, 1/2]) = log 2 (F.kl_div with log_target gives NaN there: 0 * -inf)
    assert out[0, 0] == float("inf")
    torch.testing.assert_close(out[1, 0].double(), torch.tensor(math.log(2), dtype=torch.float64), rtol=1e-6, atol=0)


def test_gradcheck_float64():
    # the op's gradient of peer i's term, for peer i with the other peers fixed, is that term's derivative
    zs = peers(3, (3, 5), "cpu", dtype=torch.float64, seed=5)
    for i in range(3):
        def term(zi, i=i):
            args = [z.detach() for z in zs]
            args[i] = zi
            return F.mutual_kd_loss(args, temperature=1.7, reduction="none")[i]
        torch.autograd.gradcheck(term, (zs[i].clone().requires_grad_(),))


def test_opcheck_and_compile():
    zs = [z.requires_grad_() for z in peers(3, (4, 9), "cpu", seed=6)]
    torch.library.opcheck(torch.ops.kdops.mutual_kd, (zs, 2.0, 0.5))
    vals, stats = torch.ops.kdops.mutual_kd([z.detach() for z in zs], 2.0, 0.5)
    torch.library.opcheck(torch.ops.kdops.mutual_kd_backward,
                          (torch.rand(3, 4), [z.detach() for z in zs], stats, 2.0, 0.5))
    for arg in (zs, torch.stack([z.detach() for z in zs]).requires_grad_()):
        fn = lambda zz: F.mutual_kd_loss(zz, temperature=2.0)  # noqa: E731
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(arg), fn(arg), rtol=1e-6, atol=0)


def test_cost_is_linear_in_peers():
    # one op call for all N peers (the pairwise reference makes N (N - 1) kl_div calls)
    zs = peers(6, (4, 10), "cpu")
    with torch.profiler.profile() as prof:
        F.mutual_kd_loss(zs)
    calls = [e.key for e in prof.key_averages() if e.key == "kdops::mutual_kd"]
    assert calls == ["kdops::mutual_kd"] and [e.count for e in prof.key_averages() if e.key == calls[0]] == [1]


@pytest.mark.parametrize("logits, kw, message", [
    ([torch.randn(3, 4)], {}, "at least 2 peers"),
    (torch.randn(1, 3, 4), {}, "at least 2 peers"),
    ([torch.randn(3, 4), torch.randn(3, 5)], {}, "shape of logits\\[0\\]"),
    ([torch.randn(3, 4), torch.randint(0, 3, (3, 4))], {}, "logits\\[1\\] must be a floating-point"),
    (torch.randn(4), {}, "\\(N, ..., C\\)"),
    ("not a tensor", {}, "a tensor \\(N, ..., C\\) or a list"),
    ([torch.randn(0, 4), torch.randn(0, 4)], {}, "empty batch"),
    ([torch.randn(3, 0), torch.randn(3, 0)], {}, "at least one class"),
    ([torch.randn(3, 4), torch.randn(3, 4)], {"temperature": 0}, "temperature"),
    ([torch.randn(3, 4), torch.randn(3, 4)], {"reduction": "avg"}, "reduction"),
])
def test_bad_inputs(logits, kw, message):
    with pytest.raises(ValueError, match=message):
        F.mutual_kd_loss(logits, **kw)
