"""Fuzzed parity of the contrastive family (kdops::crd_nce through crd_nce_loss) with its reference: batches of
one to 33 anchors, widths of one to 300, banks of one row (every index the same row) to 5000, no negatives
(k = 0, with eps > 0), a few, and more than one work chunk of the kernels (k up to 1100: the CPU's chunks are
512 columns, CUDA's 256), every dtype and mixed anchor / memory dtypes, non-contiguous and expanded anchors,
banks (an expanded bank is one row repeated) and indices, int32 and int64 indices, anchors of norm 0.1 to 3
against unit bank rows, temperatures from 0.05 to 1, the normaliser from the batch or given, n_data, eps, every
reduction, and a non-uniform grad_output. See fuzz_support.py.

The memory bank is a leaf of the drawn call as the anchor is, so that check() measures PyTorch's error in the
promoted dtype of both (a bf16 anchor against an fp32 or fp64 bank is computed in that dtype) and perturbs both
by one rounding; its gradient is compared with the reference's, which detaches the bank rows: it must be 0, and
kdops must give it none at all (test_memory_gets_no_gradient). The cases the fuzzing found kdops wrong on are
kept as fixed examples at the end."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import F64, FUZZ, Call, check, dtype_pair, tensor
from kdops import functional as F
from kdops import reference as R

REDUCTIONS = ["mean", "sum", "none"]
INDEX_LAYOUTS = ["contiguous", "transposed", "strided", "expanded"]
# the largest b * (k + 1) * d drawn: the reference gathers a (b, k + 1, d) copy of the bank rows, seven times
# per example (check() runs it in float64, in the compute dtype and at two perturbed inputs)
MAX_GATHER = 1_000_000


def unit_rows(shape, g, norm=1.0):
    return torch.nn.functional.normalize(torch.randn(shape, generator=g, dtype=F64), dim=1) * norm


def draw_index(data, b, k1, n):
    """A (b, k + 1) index of bank rows in a drawn layout and integer dtype."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="index seed"))
    layout = data.draw(st.sampled_from(INDEX_LAYOUTS), label="index layout")
    if layout == "transposed":
        index = torch.randint(0, n, (k1, b), generator=g).t()
    elif layout == "strided":
        index = torch.randint(0, n, (b, 2 * k1), generator=g)[:, ::2]
    elif layout == "expanded":  # every anchor scored against the same rows
        index = torch.randint(0, n, (1, k1), generator=g).expand(b, k1)
    else:
        index = torch.randint(0, n, (b, k1), generator=g)
    return index.to(data.draw(st.sampled_from([torch.int64, torch.int32]), label="index dtype"))


def draw_call(data):
    b = data.draw(st.sampled_from([1, 2, 7, 33]), label="b")
    k = data.draw(st.sampled_from([0, 1, 5, 40, 600, 1100]), label="k")
    d = data.draw(st.sampled_from([w for w in (1, 3, 16, 128, 300) if b * (k + 1) * w <= MAX_GATHER]), label="d")
    n = data.draw(st.sampled_from([1, 5, 40, 5000]), label="bank rows")
    da, dm = dtype_pair(data)
    norm = data.draw(st.sampled_from([1.0, 0.1, 3.0]), label="anchor norm")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="values seed"))
    anchor, a_view = tensor(data, (b, d), da, label="anchor", values=unit_rows((b, d), g, norm))
    memory, m_view = tensor(data, (n, d), dm, label="memory", values=unit_rows((n, d), g))
    index = draw_index(data, b, k + 1, n)
    kwargs = {"temperature": data.draw(st.sampled_from([0.07, 0.05, 0.2, 1.0]), label="T"),
              "normalizer": data.draw(st.sampled_from([None, None, 3.7, 1e4, 0.01]), label="normalizer"),
              "n_data": data.draw(st.sampled_from([None, None, 100003]), label="n_data"),
              "eps": data.draw(st.sampled_from([1e-7, 1e-3] if k == 0 else [1e-7, 0.0, 1e-3]), label="eps"),
              "reduction": data.draw(st.sampled_from(REDUCTIONS), label="reduction")}
    grad_scale = data.draw(st.sampled_from([1.0, -3.7, 1e-3]), label="grad scale")

    def make(leaves, a_view=a_view, m_view=m_view, index=index):
        return [a_view(leaves[0]), m_view(leaves[1]), index]

    return with_floors(Call([anchor, memory], make, kwargs, grad_scale=grad_scale))


def with_floors(call):
    """The call with its gradient floor, per anchor row summed into one leaf entry (all b of an expanded anchor,
    else one): the size of the gradient's terms (_gradient_terms), and at least what puts the budget at half the
    spacing of the anchor dtype's subnormals, the error of a correctly rounded 16-bit gradient row where it
    underflows (fp16 below 6e-5: grad_scale 1e-3, or a positive that dwarfs c + eps without negatives, make
    such entries). The gradient of a 16-bit anchor is in its dtype, as autograd's is, so an expanded anchor's
    rows are each rounded before they are summed, which the reference in the compute dtype does not do."""
    leaf = call.leaves[0]
    rows = max(1, call.make(call.leaves)[0].numel() // leaf.numel())
    info = torch.finfo(leaf.dtype)
    half_step = info.smallest_normal * info.eps / 2
    call.grad_floor = rows * max(abs(call.grad_scale) * _gradient_terms(call), half_step / (16 * info.eps))
    return call


def check_crd(call):
    """check() of the values, then of the gradients with an allowance for the float64 reference's own sums: the
    anchor's gradient is bmm's backward, a dot product over the k + 1 index columns that the CPU sums one term
    after another, off by up to (k + 1) u of its terms' size (u = eps64 / 2; measured up to 2.3e-14 relative at
    k = 1100, beyond 16 ulps). The allowance matters for float64 only: (k + 1) eps64 / 32 is below fp32's eps
    for every k drawn. The values are compared without it (the reference sums them pairwise)."""
    k1 = call.make(call.leaves)[2].size(1)
    check("crd_nce_loss", F.crd_nce_loss, R.crd_nce_loss, call, compare_grads=False)
    check("crd_nce_loss", F.crd_nce_loss, R.crd_nce_loss, call, floor_eps=k1 * torch.finfo(F64).eps / 32)


def _gradient_terms(call):
    """The size of the terms an anchor's gradient entry sums, |dL/dx_ij| |memory[index_ij]| / T over its index
    row (each |dL/dx| <= 1, the positive's and the negatives' of opposite signs), for the largest row, divided
    by the b rows that "mean" averages: a floor for the gradient's scale where those terms cancel. Formed in
    float64 from the call's exact values, in the log domain (the published exp(x) overflows at these scores)."""
    a, m, index = call.make([leaf.detach().to(F64) for leaf in call.leaves])
    kw = call.kwargs
    b, k1 = index.shape
    n_data = kw["n_data"] or m.size(0)
    rows = m[index.long()]
    x = torch.einsum("bkd,bd->bk", rows, a) / kw["temperature"]
    if kw["normalizer"] is None:
        log_z = torch.logsumexp(x.reshape(-1), 0) - math.log(b * k1) + math.log(n_data)
    else:
        log_z = math.log(kw["normalizer"])
    u = x - log_z - math.log((k1 - 1) / n_data + kw["eps"])  # log P - log(c + eps)
    dx = torch.sigmoid(u)
    dx[:, 0] -= 1
    terms = (dx.abs() * rows.abs().amax(2)).sum(1).max().item() / kw["temperature"]
    return terms / (b if kw["reduction"] == "mean" else 1)


@FUZZ
@given(data=st.data())
def test_crd_nce_matches_reference(data):
    check_crd(draw_call(data))


@FUZZ
@given(data=st.data())
def test_memory_gets_no_gradient(data):
    # a bank that requires grad (one the caller computed, say): the anchor gets its gradient, in its own dtype,
    # the bank none, in any layout and dtype; the value does not depend on the bank requiring grad
    call = draw_call(data)
    anchor, memory = (leaf.detach().clone().requires_grad_() for leaf in call.leaves)
    out = F.crd_nce_loss(*call.make([anchor, memory]), **call.kwargs)
    out.sum().backward()
    assert memory.grad is None
    assert anchor.grad is not None and anchor.grad.dtype == anchor.dtype
    plain = F.crd_nce_loss(*call.make([anchor.detach(), memory.detach()]), **call.kwargs)
    assert torch.equal(out.detach(), plain)


@FUZZ
@given(data=st.data())
def test_crd_nce_is_never_negative(data):
    # every row's terms are a softplus and log((c + eps) / c) + a softplus, each >= 0: rounding must not push a
    # row below 0, also where the positive's P dwarfs c + eps (its term rounds towards 0)
    call = draw_call(data)
    kwargs = dict(call.kwargs, reduction="none")
    out = F.crd_nce_loss(*call.make([leaf.detach() for leaf in call.leaves]), **kwargs)
    assert bool((out >= 0).all()), out


# ---- cases the fuzzing found, kept as fixed examples ----

def fixed_call(anchor, memory, index, **kwargs):
    kwargs = dict({"temperature": 0.07, "normalizer": None, "n_data": None, "eps": 1e-7, "reduction": "mean"},
                  **kwargs)
    leaves = [anchor.requires_grad_(), memory.requires_grad_()]
    return with_floors(Call(leaves, lambda ls, index=index: [ls[0], ls[1], index], kwargs))


def test_positive_gradient_without_negatives():
    # k = 0 and the batch's normaliser: P = 1 / N = 0.025 for the one entry and eps = 1e-7, so the gradient is
    # -eps / (P + eps) / T with eps / (P + eps) = 4e-6; formed as sigmoid(u) - 1 (u = log(P / eps)), from
    # 1 - 4e-6 rounded, it is off by 1.3e-2 in fp32 (2.8e-11 in fp64), where the fp32 reference is off by 1.4e-3
    check_crd(fixed_call(torch.ones(1, 1), torch.ones(40, 1), torch.zeros(1, 1, dtype=torch.long)))


def test_loss_of_many_equal_terms():
    # a one-row bank: all 601 scores are equal, P = 1 and c = 600; the row's 600 equal negative terms (1.7e-3
    # each, after the positive's 6.4) added one after another in fp32 give 7.39768 for 7.39776 (1.1e-5
    # relative, the fp32 reference 2.4e-6)
    check_crd(fixed_call(torch.ones(1, 1), torch.ones(1, 1), torch.zeros(1, 601, dtype=torch.long)))


def test_gradient_of_many_equal_terms():
    # 1101 equal scores (every bank row the same) with n_data = 100003: P = 1 / n_data, and the positive's
    # -(c + eps) / (P + c + eps) nearly cancels the 1100 negatives' P / (P + c + eps) (the sum is
    # -eps / (P + c + eps), 1e-5 of the terms); summed one after another in fp32 the gradient's entries are off
    # by more than their size, some with the wrong sign
    g = torch.Generator().manual_seed(201)
    anchor = unit_rows((1, 16), g, 0.1).float()
    memory = unit_rows((1, 16), g).bfloat16().expand(5000, 16).contiguous()
    index = torch.randint(0, 5000, (1, 1101), generator=g)
    check_crd(fixed_call(anchor, memory, index, temperature=0.05, n_data=100003))
