"""Fuzzed parity of the KD family (kdops::kd_div through kd_loss, reverse_kd_loss, jsd_loss, dkd_loss, and
kdops::mutual_kd through mutual_kd_loss) with its
references: random shapes (one class, two, odd sizes such as 1271, sequence-shaped rows), every dtype and
mixed dtypes, non-contiguous and expanded inputs, logits up to 1e4, temperatures from 0.05 to 100, masked
rows and all-masked batches, every reduction, and a non-uniform grad_output. See fuzz_support.py."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import FUZZ, Call, check, dtype_pair, tensor
from kdops import functional as F
from kdops import reference as R

REDUCTIONS = ["batchmean", "sum", "mean", "none"]


def draw_call(data, name):
    rows = data.draw(st.sampled_from([(2,), (3,), (7,), (33,), (2, 5), (1,)]), label="rows")
    c = data.draw(st.sampled_from([1, 2, 5, 17, 1271]), label="classes")
    if name == "dkd_loss":
        c = max(c, 2)
    scale = data.draw(st.sampled_from([1.0, 3.0, 1e-3, 1e4]), label="logit scale")
    ds, dt = dtype_pair(data)
    s, s_view = tensor(data, (*rows, c), ds, scale, label="student")
    t, t_view = tensor(data, (*rows, c), dt, scale, label="teacher")
    kwargs = {"temperature": data.draw(st.sampled_from([0.05, 1.0, 4.0, 100.0]), label="T"),
              "reduction": data.draw(st.sampled_from(REDUCTIONS), label="reduction")}
    if name == "jsd_loss":
        kwargs["beta"] = data.draw(st.sampled_from([0.0, 0.3, 0.5, 1.0]), label="beta")
    if name == "dkd_loss":
        kwargs["alpha"] = data.draw(st.sampled_from([0.0, 1.0, 2.5]), label="alpha")
        kwargs["beta"] = data.draw(st.sampled_from([0.0, 8.0]), label="beta")
    masking = data.draw(st.sampled_from(["none", "some", "all"]), label="ignore_index rows")
    target = None
    if masking != "none" or name == "dkd_loss":
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000), label="target seed"))
        target = torch.randint(0, c, rows, generator=g)
        if masking == "some":
            target.view(-1)[::2] = -100
        elif masking == "all":
            target.fill_(-100)
    grad_scale = data.draw(st.sampled_from([1.0, -3.7, 1e-3]), label="grad scale")

    def make(leaves, s_view=s_view, t_view=t_view, target=target):
        args = [s_view(leaves[0]), t_view(leaves[1])]
        return args + [target] if name == "dkd_loss" else args

    if name != "dkd_loss" and target is not None:
        kwargs["target"] = target
    # a gradient entry is T * (p_s - p_t)-sized per row, divided by the rows (and classes) the reduction averages
    per = {"batchmean": s.numel() // c, "mean": s.numel(), "sum": 1, "none": 1}[kwargs["reduction"]]
    # the value sums terms of the size T^2 * (|z| / T + log C) per row (the logits and their log-sum-exp),
    # whose rounding bounds its error where it cancels to near 0
    temp, zmax = kwargs["temperature"], max(s.detach().abs().max().item(), t.detach().abs().max().item())
    return Call([s, t], make, kwargs, grad_scale=grad_scale, grad_floor=abs(grad_scale) * temp / per,
                value_floor=(temp * zmax + temp * temp * math.log(c + 1)) * (s.numel() // c) / per)


@pytest.mark.parametrize("name", ["kd_loss", "reverse_kd_loss", "jsd_loss", "dkd_loss"])
@FUZZ
@given(data=st.data())
def test_kd_family_matches_reference(name, data):
    call = draw_call(data, name)
    check(name, getattr(F, name), getattr(R, name), call)


@FUZZ
@given(data=st.data())
def test_kl_of_identical_inputs_is_zero(data):
    # exactly 0 for the same logits in any dtype, layout, temperature
    rows = data.draw(st.sampled_from([(2,), (9,), (3, 4)]))
    c = data.draw(st.sampled_from([1, 3, 1271]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    s, view = tensor(data, (*rows, c), dtype, data.draw(st.sampled_from([1.0, 1e4])))
    for fn in (F.kd_loss, F.reverse_kd_loss, F.jsd_loss):
        out = fn(view(s), view(s).detach(), temperature=data.draw(st.sampled_from([0.05, 1.0, 100.0])),
                 reduction="none")
        assert bool((out == 0).all()), (fn.__name__, out)


@pytest.mark.parametrize("name", ["kd_loss", "reverse_kd_loss", "jsd_loss", "dkd_loss"])
@FUZZ
@given(data=st.data())
def test_divergences_are_never_negative(name, data):
    # nearly equal distributions (the teacher is the student rounded to 16 bits, or nudged by 1e-6) make the
    # kernels' sums cancel; rounding must not push a per-row divergence below 0
    rows, c = data.draw(st.sampled_from([(5,), (2, 3)])), data.draw(st.sampled_from([2, 3, 40, 1271]))
    s, view = tensor(data, (*rows, c), torch.float32, data.draw(st.sampled_from([1e-3, 1.0, 1e4])), layout="contiguous")
    nudge = data.draw(st.sampled_from(["bf16", "fp16", "1e-6"]))
    t = {"bf16": s.detach().bfloat16().float(), "fp16": s.detach().half().float(), "1e-6": s.detach() * (1 + 1e-6)}[nudge]
    y = torch.zeros(rows, dtype=torch.long)
    temp = data.draw(st.sampled_from([0.05, 1.0, 100.0]))
    out = (F.dkd_loss(s, t, y, temperature=temp, reduction="none") if name == "dkd_loss"
           else getattr(F, name)(s, t, temperature=temp, reduction="none"))
    assert bool((out >= 0).all()), out


@FUZZ
@given(data=st.data())
def test_mutual_kd_matches_reference(data):
    # N peers, the first two in a drawn (possibly mixed) dtype pair, the others in the first one's dtype
    n = data.draw(st.sampled_from([2, 3, 5]), label="peers")
    rows = data.draw(st.sampled_from([(2,), (7,), (33,), (2, 5), (1,)]), label="rows")
    c = data.draw(st.sampled_from([1, 2, 17, 1271]), label="classes")
    scale = data.draw(st.sampled_from([1.0, 3.0, 1e-3, 1e4]), label="logit scale")
    d0, d1 = dtype_pair(data)
    leaves, views = [], []
    for i in range(n):
        z, view = tensor(data, (*rows, c), d1 if i == 1 else d0, scale, label="peer %d" % i)
        leaves.append(z)
        views.append(view)
    kwargs = {"temperature": data.draw(st.sampled_from([0.05, 1.0, 4.0, 100.0]), label="T"),
              "reduction": data.draw(st.sampled_from(REDUCTIONS), label="reduction"),
              "average_peers": data.draw(st.booleans(), label="average_peers")}
    grad_scale = data.draw(st.sampled_from([1.0, -3.7, 1e-3]), label="grad scale")
    per = {"batchmean": leaves[0].numel() // c, "mean": leaves[0].numel(), "sum": 1, "none": 1}[kwargs["reduction"]]
    temp = kwargs["temperature"]
    zmax = max(z.detach().abs().max().item() for z in leaves)
    # a peer's value sums N - 1 KL terms of the size T^2 (|z| / T + log C) per row; its gradient is
    # T (N p_i - S) per row
    call = Call(leaves, lambda ls, views=views: [[v(z) for v, z in zip(views, ls)]], kwargs,
                grad_scale=grad_scale, grad_floor=abs(grad_scale) * temp * n / per,
                value_floor=(n - 1) * (temp * zmax + temp * temp * math.log(c + 1)) * (leaves[0].numel() // c) / per)
    check("mutual_kd_loss", F.mutual_kd_loss, R.mutual_kd_loss, call)
