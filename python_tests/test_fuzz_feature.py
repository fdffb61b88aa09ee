"""Fuzzed parity of the feature family (kdops::margin_relu, kdops::partial_l2 through partial_l2_loss,
kdops::logsum through logsum_loss, and hint_loss) with its references: maps of one channel or many, with no
spatial dimension, a long odd one (1271) or a square one, batches of one and two, every dtype and mixed
dtypes, non-contiguous and expanded maps, margins as (C,) and (1, C, 1, 1), teachers tied with the margin or
equal to the student, values up to 1e4 (whose squares overflow fp16), every reduction, alpha from 0.5 to 5,
and a non-uniform grad_output. See fuzz_support.py."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import FUZZ, Call, check, dtype_pair, tensor
from kdops import functional as F
from kdops import reference as R

SHAPES = [(2, 1), (1, 3, 5, 5), (2, 17, 4), (3, 2, 1271), (2, 4, 7, 3), (1, 1, 1, 1)]


def draw_maps(data, mixed=True, scales=(1.0, 1e-3, 1e4)):
    shape = data.draw(st.sampled_from(SHAPES), label="shape")
    scale = data.draw(st.sampled_from(scales), label="scale")
    ds, dt = dtype_pair(data, mixed)
    s, s_view = tensor(data, shape, ds, scale, label="student")
    relation = data.draw(st.sampled_from(["independent", "equal", "rounded"]), label="teacher")
    if relation == "independent":
        t, t_view = tensor(data, shape, dt, scale, label="teacher")
    else:  # the student's own values (rounded to the teacher's dtype): differences of 0 or of one rounding
        t, t_view = s.detach().to(dt).requires_grad_(), s_view
    return shape, scale, (s, s_view), (t, t_view)


def draw_margin(data, shape, scale, teacher):
    """(C,) or (1, C, 1, 1) non-positive margins; 'tied' takes them from teacher values so that t == m occurs."""
    c = shape[1]
    kind = data.draw(st.sampled_from(["random", "zero", "tied"]), label="margin")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000), label="margin seed"))
    if kind == "random":
        m = -(torch.rand(c, generator=g, dtype=torch.float64) * scale)
    elif kind == "zero":
        m = torch.zeros(c, dtype=torch.float64)
    else:
        flat = teacher.detach().to(torch.float64).transpose(0, 1).reshape(c, -1)
        m = flat[:, 0].clamp_max(0)
    m = m.to(data.draw(st.sampled_from([torch.float32, teacher.dtype]), label="margin dtype"))
    if data.draw(st.booleans(), label="margin as (1, C, 1, 1)") and len(shape) > 2:
        return m.view(1, c, *([1] * (len(shape) - 2)))
    return m


@FUZZ
@given(data=st.data())
def test_margin_relu_matches_reference(data):
    shape, scale, _, (t, t_view) = draw_maps(data, mixed=False)
    margin = draw_margin(data, shape, scale, t)
    call = Call([t], lambda leaves: [t_view(leaves[0]), margin.reshape(-1)],
                grad_scale=data.draw(st.sampled_from([1.0, -2.5])))
    check("margin_relu", F.margin_relu, R.margin_relu, call)
    # max(t, m) is exact: the kernel gives the reference's value bit for bit in the teacher's dtype
    # (the reference casts the margin to that dtype first)
    view = t_view(t.detach())
    assert torch.equal(F.margin_relu(view, margin), R.margin_relu(view, margin.reshape(-1)))


@FUZZ
@given(data=st.data())
def test_partial_l2_matches_reference(data):
    shape, scale, (s, s_view), (t, t_view) = draw_maps(data)
    margin = draw_margin(data, shape, scale, t)
    reduction = data.draw(st.sampled_from(["sum", "mean", "batchmean"]), label="reduction")
    wants = data.draw(st.sampled_from(["both", "student", "teacher"]), label="grads")
    s.requires_grad_(wants != "teacher")
    t.requires_grad_(wants != "student")
    leaves = [x for x in (s, t) if x.requires_grad]

    def make(ls, s=s, t=t):
        it = iter(ls)
        a = s_view(next(it)) if s.requires_grad else s_view(s)
        b = t_view(next(it)) if t.requires_grad else t_view(t)
        return [a, b, margin]

    # the sum's terms are (s - t)^2 <= 4 scale^2 each; the gradient entries 2 (s - t) / divisor
    n = s_view(s.detach()).numel()
    divisor = {"sum": 1, "mean": n, "batchmean": shape[0]}[reduction]
    call = Call(leaves, make, {"reduction": reduction}, grad_scale=data.draw(st.sampled_from([1.0, -3.7, 1e-3])),
                grad_floor=4 * scale / divisor, value_floor=4 * scale * scale * n / divisor)
    check("partial_l2_loss", F.partial_l2_loss, R.partial_l2_loss, call)


@FUZZ
@given(data=st.data())
def test_partial_l2_of_student_equal_to_target_is_zero(data):
    # s == max(t, m) everywhere: every term is exactly 0 in every dtype and layout
    shape, scale, (s, s_view), _ = draw_maps(data, mixed=False)
    # a margin the maps' dtype can hold, so that max(t, m) is one of the map's own values
    margin = draw_margin(data, shape, scale, s).to(s.dtype).float()
    t = s_view(s.detach())
    target = R.margin_relu(t, margin.reshape(-1))
    assert F.partial_l2_loss(target, t, margin).item() == 0.0


@FUZZ
@given(data=st.data())
def test_hint_matches_reference(data):
    shape, scale, (s, s_view), (t, t_view) = draw_maps(data)
    n = s_view(s.detach()).numel()
    call = Call([s, t], lambda ls: [s_view(ls[0]), t_view(ls[1])],
                grad_scale=data.draw(st.sampled_from([1.0, -3.7])), grad_floor=4 * scale / n,
                value_floor=4 * scale * scale)
    check("hint_loss", F.hint_loss, R.hint_loss, call)


@pytest.mark.parametrize("form", ["delta", "pair"])
@FUZZ
@given(data=st.data())
def test_logsum_matches_reference(form, data):
    shape, scale, (s, s_view), (t, t_view) = draw_maps(data, mixed=form == "pair", scales=(1.0, 1e-3, 30.0))
    alpha = data.draw(st.sampled_from([0.5, 1.0, 2.0, 4.0, 5.0]), label="alpha")
    eps = data.draw(st.sampled_from([0.0, 1e-6, 1.0]), label="eps")
    if form == "delta":
        call = Call([s], lambda ls: [s_view(ls[0])], {"alpha": alpha, "eps": eps},
                    grad_scale=data.draw(st.sampled_from([1.0, -3.7])))
    else:
        call = Call([s, t], lambda ls: [(s_view(ls[0]), t_view(ls[1]))], {"alpha": alpha, "eps": eps},
                    grad_scale=data.draw(st.sampled_from([1.0, -3.7])))
    # the reference cannot form |delta|^alpha in 16 bits without overflow at these scales; check() then measures
    # PyTorch's own error in fp32, the dtype kdops computes in. Where delta is 0 everywhere and eps = 0 the value
    # is -inf and the gradient undefined (0 / 0): only the value is compared there
    check("logsum_loss", F.logsum_loss, R.logsum_loss, call,
                        compare_grads=bool(torch.isfinite(_ref_grad_size(call)).all()))


def _ref_grad_size(call):
    leaves = [x.detach().double().requires_grad_() for x in call.leaves]
    out = R.logsum_loss(*call.make(leaves), **call.kwargs)
    return torch.stack([g.abs().max() for g in torch.autograd.grad(out, leaves)])
