"""Fuzzed parity of the lm family (kdops::fused_linear_kd through fused_linear_kd_loss, kdops::topk_kd through
topk_kd_loss) with its reference: one to 33 tokens in one or two leading dims, hidden widths of one to 24, a
vocabulary of one to 301 ids (the teacher's three wider, with vocab_size), every divergence, beta and skew,
temperatures from 0.5 to 10, softcaps, logit scales, the hard term, no / some / all rows ignored, every reduction
and num_items_in_batch, chunks of one token to all of them, every dtype and mixed dtypes, non-contiguous and
expanded hidden states and weights, and a non-uniform grad_output. The teacher's hidden states and weight are
leaves too (their gradients are compared). See fuzz_support.py.

The budget is fuzz_support's: twice PyTorch's own error on the same input in the compute dtype (the reference
forms the logits in that dtype, as eager code does; kdops forms them in fp32), plus a few ulps of the result's
scale. The scale floors below are the size of a gradient entry where the reference's gradient cancels to (near)
0, e.g. identical teacher and student distributions."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import FUZZ, Call, check, dtype_pair, tensor
from kdops import functional as F
from kdops import reference as R

REDUCTIONS = ["mean", "sum", "none", "items"]


def _draw_common(data):
    lead = data.draw(st.sampled_from([(1,), (2,), (7,), (33,), (3, 5)]), label="tokens")
    v = data.draw(st.sampled_from([1, 2, 17, 301]), label="vocab")
    hs = data.draw(st.sampled_from([1, 3, 16]), label="Hs")
    T = data.draw(st.sampled_from([0.5, 1.0, 2.0, 10.0]), label="T")
    red = data.draw(st.sampled_from(REDUCTIONS), label="reduction")
    masking = data.draw(st.sampled_from(["none", "some", "all"]), label="ignored rows")
    hard = data.draw(st.sampled_from([0.0, 0.5]), label="hard weight")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000), label="target seed"))
    target = None
    if masking != "none" or hard != 0.0:
        target = torch.randint(0, v, lead, generator=g)
        if masking == "some":
            target.view(-1)[::2] = -100
        elif masking == "all":
            target.fill_(-100)
    kwargs = {"temperature": T, "hard_weight": hard, "target": target,
              "scale_t2": data.draw(st.booleans(), label="scale_t2"),
              "chunk_size": data.draw(st.sampled_from([1, 3, None]), label="chunk"),
              "student_softcap": data.draw(st.sampled_from([None, 5.0]), label="student softcap"),
              "student_logit_scale": data.draw(st.sampled_from([1.0, 0.7]), label="student scale")}
    if red == "items":
        kwargs["num_items_in_batch"] = data.draw(st.sampled_from([3, 11.5]), label="items")
    else:
        kwargs["reduction"] = red
    grad_scale = data.draw(st.sampled_from([1.0, -3.7, 1e-3]), label="grad scale")
    ntok = math.prod(lead)
    per = {"mean": ntok, "sum": 1, "none": 1, "items": 3}[red]
    return lead, v, hs, kwargs, grad_scale, per


def _floors(kwargs, grad_scale, per, zmax, v, ntok, hscale):
    # A logit gradient entry is at most c = soft T^(+1 with scale_t2) / T + hard in size per token (before the
    # reduction's 1 / per), and a row's entries sum to at most 2c in absolute value. The hidden-state gradient
    # sums a row's entries times weight entries (|w| <~ 3); the weight gradient sums one entry per token times
    # hidden entries (|h| <~ 3 hscale), accumulated chunk by chunk in fp32 (the design: chunk_size = 1 adds one
    # token at a time). The floor is the larger of these sums of |terms|, the scale that a sum's rounding error is
    # relative to where the sum itself cancels to 0 (e.g. identical student and teacher distributions).
    T = kwargs["temperature"]
    c = (T if kwargs["scale_t2"] else 1.0 / T) + kwargs["hard_weight"]
    grad_floor = abs(grad_scale) * c * 3.0 * max(2.0, ntok * hscale) / per
    value_floor = (T * T if kwargs["scale_t2"] else 1.0) * (zmax / T + math.log(v + 1)) * 3 / per
    return grad_floor, value_floor


@FUZZ
@given(st.data())
def test_fused_linear_kd_matches_reference(data):
    lead, v, hs, kwargs, grad_scale, per = _draw_common(data)
    ht = data.draw(st.sampled_from([1, 5, 24]), label="Ht")
    vt = v + data.draw(st.sampled_from([0, 3]), label="extra teacher columns")
    div = data.draw(st.sampled_from(F.LM_DIVERGENCES), label="divergence")
    kwargs["divergence"] = div
    if div == "jsd":
        kwargs["beta"] = data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="beta")
    if div.startswith("skew"):
        kwargs["skew"] = data.draw(st.sampled_from([0.0, 0.1, 0.6]), label="skew")
    kwargs["teacher_softcap"] = data.draw(st.sampled_from([None, 3.0]), label="teacher softcap")
    kwargs["teacher_logit_scale"] = data.draw(st.sampled_from([1.0, 1.5]), label="teacher scale")
    if vt != v:
        kwargs["vocab_size"] = v
    ds, dt = dtype_pair(data)
    hscale = data.draw(st.sampled_from([1.0, 3.0]), label="hidden scale")
    sh, sh_view = tensor(data, (*lead, hs), ds, hscale, label="student hidden")
    sw, sw_view = tensor(data, (v, hs), ds, 1.0, label="student weight")
    th, th_view = tensor(data, (*lead, ht), dt, hscale, label="teacher hidden")
    tw, tw_view = tensor(data, (vt, ht), dt, 1.0, label="teacher weight")

    def make(leaves):
        return [sh_view(leaves[0]), sw_view(leaves[1]), th_view(leaves[2]), tw_view(leaves[3])]

    zmax = hscale * 3 * max(hs, ht) ** 0.5 * 3
    grad_floor, value_floor = _floors(kwargs, grad_scale, per, zmax, v, math.prod(lead), hscale)
    call = Call([sh, sw, th, tw], make, kwargs, grad_scale=grad_scale, grad_floor=grad_floor,
                value_floor=value_floor)
    check("fused_linear_kd_loss", F.fused_linear_kd_loss, R.fused_linear_kd_loss, call)


@FUZZ
@given(st.data())
def test_topk_kd_matches_reference(data):
    lead, v, hs, kwargs, grad_scale, per = _draw_common(data)
    k = data.draw(st.sampled_from([k for k in (1, 4, 16) if k <= v]), label="K")
    kwargs["tail"] = data.draw(st.sampled_from(F.TOPK_TAILS), label="tail")
    kwargs["teacher_temperature"] = data.draw(st.sampled_from([kwargs["temperature"], 0.7]), label="T_g")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000), label="teacher seed"))
    ntok = math.prod(lead)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(ntok)]).reshape(*lead, k)
    lps = torch.log_softmax(torch.randn(ntok, v + 5, generator=g, dtype=torch.float64) * 2, -1)[:, :k]
    if data.draw(st.booleans(), label="padding ids"):
        lps[::3, -1] = -math.inf
    lps = lps.reshape(*lead, k).to(torch.float32)
    ds, _ = dtype_pair(data, mixed=False)
    hscale = data.draw(st.sampled_from([1.0, 3.0]), label="hidden scale")
    sh, sh_view = tensor(data, (*lead, hs), ds, hscale, label="student hidden")
    sw, sw_view = tensor(data, (v, hs), ds, 1.0, label="student weight")

    def make(leaves):
        return [sh_view(leaves[0]), sw_view(leaves[1]), ids, lps]

    zmax = hscale * 3 * hs ** 0.5 * 3
    grad_floor, value_floor = _floors(kwargs, grad_scale, per, zmax, v, ntok, hscale)
    call = Call([sh, sw], make, kwargs, grad_scale=grad_scale, grad_floor=grad_floor, value_floor=value_floor)
    check("topk_kd_loss", F.topk_kd_loss, R.topk_kd_loss, call)
