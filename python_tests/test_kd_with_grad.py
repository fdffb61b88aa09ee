"""kdops::kd_div_with_grad, the CPU KL forward that also forms the student gradient, and the paths of kd_loss that
use it (a student that requires grad, a teacher that does not): values, stats and gradients against kd_div /
kd_div_backward and the float64 reference, the AVX-512 loop against the portable one, every backward branch
(unit, power-of-two, other and per-row upstream gradients), retain_graph, opcheck and compile."""

import pytest
import torch

import kdops  # noqa: F401
from kdops import functional as F
from kdops import reference as R

ARGS = (2.0, -100)  # temperature, ignore_index


def logits(shape, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def old_path(s, t, target=None, scale=1.0, grad=None):
    """kd_div and kd_div_backward: the per-row values, stats and student gradient for upstream grad (ones)."""
    per_row, stats = torch.ops.kdops.kd_div(s, t, target, ARGS[0], "kl", 0.0, 0.0, ARGS[1], scale)
    grad = torch.ones_like(per_row) if grad is None else grad
    gs, _ = torch.ops.kdops.kd_div_backward(grad, s, t, target, stats, ARGS[0], "kl", 0.0, 0.0, ARGS[1], True,
                                            False, scale)
    return per_row, stats, gs


TOL = {torch.float32: dict(rtol=2e-6, atol=1e-7), torch.float64: dict(rtol=1e-12, atol=1e-14),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=1e-6)}


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 16), (4, 17), (9, 100), (2, 3, 2049), (2, 5000)])
def test_op_matches_kd_div_and_its_backward(shape, dtype):
    s, t = logits(shape, dtype), logits(shape, dtype, seed=1)
    per_row, stats, grad = torch.ops.kdops.kd_div_with_grad(s, t, None, *ARGS, 0.375)
    ref_row, ref_stats, ref_grad = old_path(s, t, scale=0.375)
    assert grad.dtype == dtype and grad.shape == s.shape
    torch.testing.assert_close(per_row.double(), ref_row.double(), **TOL[dtype])
    torch.testing.assert_close(stats.double(), ref_stats.double(), rtol=1e-5 if dtype != torch.float64 else 1e-12,
                               atol=1e-6 if dtype != torch.float64 else 1e-13)
    torch.testing.assert_close(grad.double(), ref_grad.double(), **TOL[dtype])


@pytest.mark.parametrize("C", list(range(1, 40)) + [1000])
def test_wide_loop_matches_portable_loop(C, monkeypatch):
    """The AVX-512 exps (where the CPU has them) against the portable loop, every tail length of a 16-wide
    vector, with -inf and large negative logits in the row."""
    s, t = logits((6, C), seed=C), logits((6, C), seed=C + 100)
    s[0, 0] = float("-inf")
    t[1, C - 1] = float("-inf")
    t[2] = t[2] * 60  # exps far below the float range
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("KDOPS_CPU_WIDE_KD", flag)
        outs.append(torch.ops.kdops.kd_div_with_grad(s, t, None, *ARGS, 1.0))
        outs.append(torch.ops.kdops.kd_div(s, t, None, ARGS[0], "kl", 0.0, 0.0, ARGS[1], 1.0))
    # The two loops sum the exps in different orders: values and stats agree to a few ulp of the terms they are
    # formed from (the logits / T, up to 270 here: KL and E_pt[t - s] cancel terms of that size), the gradient
    # p_s - p_t (times 1 / T) to a few ulp of the probabilities. An all -inf student row (C = 1) is NaN in both.
    terms = max(s[s.isfinite()].abs().max().item(), t[t.isfinite()].abs().max().item()) / ARGS[0]
    for wide, portable in ((outs[0], outs[2]), (outs[1], outs[3])):
        for a, b in zip(wide[:2], portable[:2]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * terms, equal_nan=True)
    torch.testing.assert_close(outs[0][2], outs[2][2], rtol=1e-6, atol=2e-7 / ARGS[0], equal_nan=True)
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0, equal_nan=True)  # kd_div: the same loop


def test_specials_masked_nan_and_ignored_rows():
    s, t = logits((5, 50)), logits((5, 50), seed=1)
    s[0, :10] = float("-inf")  # student puts no mass where the teacher does: KL = inf
    s[1, :10] = float("-inf")
    t[1, :10] = float("-inf")  # both masked: those classes drop out
    s[2, 3] = float("nan")
    target = torch.tensor([0, 1, 2, -100, 4])
    per_row, stats, grad = torch.ops.kdops.kd_div_with_grad(s, t, target, *ARGS, 1.0)
    ref_row, ref_stats, ref_grad = old_path(s, t, target)
    assert per_row[0] == float("inf")
    assert torch.isnan(per_row[2]) and torch.isnan(grad[2]).all()
    assert per_row[3] == 0 and (grad[3] == 0).all() and (stats[3] == 0).all()
    torch.testing.assert_close(per_row, ref_row, equal_nan=True)
    torch.testing.assert_close(grad, ref_grad, equal_nan=True, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(grad[1, :10], torch.zeros(10))
    exact = R.kd_loss(s[1:2, 10:].double(), t[1:2, 10:].double(), temperature=ARGS[0], reduction="sum",
                      scale_t2=False)
    torch.testing.assert_close(per_row[1].double(), exact, rtol=1e-5, atol=1e-7)


def grads(s, t, upstream, **kw):
    """kd_loss's value and student gradient through kd_div_with_grad (teacher without grad) and through the
    separate backward kernel (teacher with grad)."""
    out = []
    for teacher_grad in (False, True):
        a = s.detach().clone().requires_grad_()
        b = t.detach().clone().requires_grad_(teacher_grad)
        loss = F.kd_loss(a, b, **kw)
        g = upstream(loss)
        out.append((loss.detach(), torch.autograd.grad(loss, a, g)[0]))
    return out


UPSTREAM = {"unit": lambda l: torch.ones_like(l), "power_of_two": lambda l: torch.full_like(l, 0.25),
            "other": lambda l: torch.full_like(l, 0.3),
            "per_row": lambda l: torch.rand(l.shape, generator=torch.Generator().manual_seed(3)).to(l.dtype)}


# a per-row upstream gradient needs reduction='none'
BRANCHES = [(u, r) for u in UPSTREAM for r in ("batchmean", "sum", "mean", "none") if u != "per_row" or r == "none"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("upstream,reduction", BRANCHES)
def test_backward_branches_match_the_backward_kernel(dtype, upstream, reduction):
    s, t = logits((12, 37), dtype), logits((12, 37), dtype, seed=1)
    (l1, g1), (l2, g2) = grads(s, t, UPSTREAM[upstream], reduction=reduction, temperature=2.0)
    torch.testing.assert_close(l1, l2, **TOL[dtype])
    if dtype == torch.bfloat16 and upstream in ("other", "per_row"):
        # not a plain scaling of a rounded gradient: the separate kernel, rounding once, gives the same bits
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    else:
        torch.testing.assert_close(g1, g2, **TOL[dtype])
    ref_s = s.double().requires_grad_()
    ref = R.kd_loss(ref_s, t.double(), temperature=2.0, reduction=reduction)
    g_ref = torch.autograd.grad(ref, ref_s, UPSTREAM[upstream](ref).double())[0]
    torch.testing.assert_close(g1.double(), g_ref, rtol=2e-2 if dtype == torch.bfloat16 else 1e-4,
                               atol=1e-4 if dtype == torch.bfloat16 else 1e-7)


def test_masked_batchmean_and_fp16_take_the_backward_kernel():
    """16-bit losses that divide by a count of kept rows, and fp16 (not folded), keep the separate backward."""
    s, t = logits((10, 30), torch.bfloat16), logits((10, 30), torch.bfloat16, seed=1)
    target = torch.tensor([1, -100, 3, 4, -100, 6, 7, 8, 9, 0])
    (l1, g1), (l2, g2) = grads(s, t, UPSTREAM["unit"], target=target)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    (l1, g1), (l2, g2) = grads(s.half(), t.half(), UPSTREAM["unit"])
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_unit_upstream_returns_the_forward_gradient_and_retain_graph_repeats_it():
    s, t = logits((8, 21)).requires_grad_(), logits((8, 21), seed=1)
    loss = F.kd_loss(s, t, reduction="sum", temperature=2.0)
    g1 = torch.autograd.grad(loss, s, retain_graph=True)[0]
    g2 = torch.autograd.grad(loss, s, torch.tensor(2.0), retain_graph=True)[0]
    g3 = torch.autograd.grad(loss, s)[0]
    _, _, expected = torch.ops.kdops.kd_div_with_grad(s.detach(), t, None, *ARGS, 4.0)
    torch.testing.assert_close(g1, expected, rtol=0, atol=0)
    torch.testing.assert_close(g2, 2 * expected, rtol=0, atol=0)
    torch.testing.assert_close(g3, expected, rtol=0, atol=0)
    s.grad = None
    F.kd_loss(s, t, reduction="sum", temperature=2.0).backward()  # accumulated into .grad
    torch.testing.assert_close(s.grad, expected, rtol=0, atol=0)


def test_no_grad_and_teacher_grad_take_kd_div():
    s, t = logits((4, 9)), logits((4, 9), seed=1)
    with torch.no_grad():
        a = F.kd_loss(s.requires_grad_(), t)
    assert a.grad_fn is None
    b = F.kd_loss(s, t.requires_grad_())
    assert "KlWithGrad" not in type(b.grad_fn).__name__
    gs, gt = torch.autograd.grad(b, (s, t))
    ref_s, ref_t = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    ref = R.kd_loss(ref_s, ref_t)
    for ours, theirs in zip((gs, gt), torch.autograd.grad(ref, (ref_s, ref_t))):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-7)


def test_registered_autograd_of_the_op():
    """The op's own autograd (torch.ops.kdops.kd_div_with_grad called with a student that requires grad)."""
    s, t = logits((6, 11)).requires_grad_(), logits((6, 11), seed=1)
    per_row, _, _ = torch.ops.kdops.kd_div_with_grad(s, t, None, *ARGS, 1.0)
    w = torch.rand(6, generator=torch.Generator().manual_seed(0))
    g = torch.autograd.grad((per_row * w).sum(), s)[0]
    _, _, ref = old_path(s.detach(), t, grad=w)
    torch.testing.assert_close(g, ref, rtol=2e-6, atol=1e-7)


def test_opcheck():
    s, t = logits((5, 19)).requires_grad_(), logits((5, 19), seed=1)
    torch.library.opcheck(torch.ops.kdops.kd_div_with_grad.default, (s, t, None, 2.0, -100, 0.5))
    target = torch.tensor([0, -100, 2, 3, 4])
    torch.library.opcheck(torch.ops.kdops.kd_div_with_grad.default, (s, t, target, 2.0, -100, 1.0))


def test_torch_compile_matches_eager():
    s, t = logits((7, 33)).requires_grad_(), logits((7, 33), seed=1)
    compiled = torch.compile(F.kd_loss, fullgraph=True, backend="aot_eager")
    loss = compiled(s, t)
    g = torch.autograd.grad(loss, s)[0]
    eager = F.kd_loss(s, t)
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-7)
    g_eager = torch.autograd.grad(eager, s)[0]
    torch.testing.assert_close(g, g_eager, rtol=1e-5, atol=2e-7 * g_eager.abs().max().item())


def test_large_output_is_written_in_full():
    """The gradient buffer of a large call (advised to use huge pages) holds the whole gradient."""
    s, t = logits((128, 70000)), logits((128, 70000), seed=1)
    _, _, grad = torch.ops.kdops.kd_div_with_grad(s, t, None, *ARGS, 1.0)
    _, _, ref = old_path(s, t)
    torch.testing.assert_close(grad, ref, rtol=2e-6, atol=1e-9)


def test_bad_inputs_name_the_argument():
    s, t = logits((3, 4)), logits((3, 5))
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.kdops.kd_div_with_grad(s, t, None, *ARGS, 1.0)
    with pytest.raises(RuntimeError, match="temperature"):
        torch.ops.kdops.kd_div_with_grad(s, s, None, 0.0, -100, 1.0)
    with pytest.raises(RuntimeError, match="target"):
        torch.ops.kdops.kd_div_with_grad(s, s, torch.zeros(4, dtype=torch.long), *ARGS, 1.0)


def test_huge_page_advice_can_be_turned_off(tmp_path):
    """KDOPS_CPU_HUGE_PAGES=0 (read once per process) leaves large outputs on ordinary pages, same values."""
    import os
    import subprocess
    import sys

    s, t = logits((128, 70000)), logits((128, 70000), seed=1)
    torch.save((s, t), tmp_path / "in.pt")
    code = ("import torch, kdops; s, t = torch.load(%r); "
            "torch.save(torch.ops.kdops.kd_div_with_grad(s, t, None, 2.0, -100, 1.0), %r)"
            % (str(tmp_path / "in.pt"), str(tmp_path / "out.pt")))
    env = dict(os.environ, KDOPS_CPU_HUGE_PAGES="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root, timeout=300)
    for a, b in zip(torch.load(tmp_path / "out.pt"), torch.ops.kdops.kd_div_with_grad(s, t, None, *ARGS, 1.0)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_second_derivative_raises():
    s, t = logits((4, 9)).requires_grad_(), logits((4, 9), seed=1)
    g = torch.autograd.grad(F.kd_loss(s, t), s, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(g.sum(), s)
