"""CRD benchmark (Tian et al. 2020, "Contrastive Representation Distillation"): kdops' fused NCE loss
(``crd_nce_loss``: the anchors scored against the bank rows memory[index] in place) vs the published gather
form (the eager reference: index_select of the (b, k + 1, d) rows, bmm, exp / T, normaliser, NCE log terms) vs
torch.compile of it, forward and forward + backward (the anchor's gradient; the memory bank gets none), fp32 and
bf16 (anchor and bank in bf16).

Shapes (b, d, N, k): batch b, embedding width d, bank rows N (the training-set size), k negatives per anchor. The
published CIFAR-100 setting is b = 64, d = 128, N = 50000 with k = 4096 and k = 16384 (the headline); there the
published code's gather is b (k + 1) d = 134 M elements, 0.54 GB per side in fp32 (1.07 GB per step for its two
sides, student and teacher), kept alive for the backward. One side is timed here: one anchor batch against one
bank. The anchors and bank rows are L2-normalised as in CRD, T = 0.07, n_data = N, and the normaliser Z is
fixed: the value the published code forms on its first batch (mean(exp(x)) * N on these inputs, once per
shape), passed as a number to every provider, as in training after the first batch.

The floor is ``torch.index_select(memory, 0, index.flatten())``, the reference's first step: each of the
b (k + 1) bank rows read once and written once, i.e. the clone() floor of the memory-bound families taken over
the rows the loss reads. It bounds the published form from below (which gathers, then reads the copy again).
The fused op reads the same rows but writes no copy, so kdops / floor may fall below 1; that is the gather's
cost avoided. A torch.bmm over the gathered rows is no floor for kdops (it needs the gather first), and a
read-only pass such as F.embedding_bag(index, memory, mode="sum") was not taken: its CUDA kernel runs one
thread per (bag, feature) over the bag's k + 1 rows in sequence, which with 64 bags times latency, not bandwidth.

    pytest benchmarks/bench_crd_nce.py --benchmark-only --benchmark-json=run.json
    python -m benchmarks.report run.json

Each kdops benchmark first checks kdops against the reference in float64 on the same values (the loss and the
anchor's gradient); peak memory is that of one call (benchmarks/common.py).
"""

import pytest
import torch

import kdops  # noqa: F401
from benchmarks.common import DEVICES, compiled, dtypes, forward_backward, modes, run, shape_id, sizes
from kdops import functional as F
from kdops import reference as R

# (b, d, N, k): CIFAR-100's b = 64, d = 128, N = 50000 with k = 4096 and the headline k = 16384
SHAPES = sizes([(64, 128, 50000, 4096), (64, 128, 50000, 16384)], quick=[(8, 16, 256, 31), (5, 8, 40, 100)],
               headline=[(64, 128, 50000, 16384)])
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEMPERATURE = 0.07  # CRD's nce_t


def kdops_crd(anchor, memory, index, z):
    return F.crd_nce_loss(anchor, memory, index, temperature=TEMPERATURE, normalizer=z)


def reference_crd(anchor, memory, index, z):
    return R.crd_nce_loss(anchor, memory, index, temperature=TEMPERATURE, normalizer=z)


PROVIDERS = {"kdops": lambda: kdops_crd, "eager": lambda: reference_crd,
             "compiled": lambda: compiled(reference_crd)}


def make_inputs(shape):
    """(anchor (b, d), bank (N, d), index (b, k + 1)) in fp32 on the CPU: unit rows; column 0 of the index the
    batch's own samples (distinct bank rows), columns 1..k negatives drawn uniformly, as ContrastMemory does."""
    g = torch.Generator().manual_seed(0)
    b, d, n, k = shape
    anchor = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    memory = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    index = torch.randint(0, n, (b, k + 1), generator=g)
    index[:, 0] = torch.randperm(n, generator=g)[:b]
    return anchor, memory, index


_normalizers = {}


def first_batch_normalizer(shape):
    """Z = mean(exp(x)) * N, what the reference forms with normalizer=None (the published code on its first
    batch), here in float64 on the fp32 inputs, once per shape; every provider and dtype then gets it as a number."""
    if shape not in _normalizers:
        anchor, memory, index = make_inputs(shape)
        x = torch.bmm(memory.double()[index.flatten()].view(*index.shape, -1), anchor.double().unsqueeze(-1))
        _normalizers[shape] = (torch.exp(x / TEMPERATURE).mean() * memory.size(0)).item()
    return _normalizers[shape]


def device_inputs(shape, dtype, device):
    anchor, memory, index = make_inputs(shape)
    return anchor.to(device=device, dtype=dtype), memory.to(device=device, dtype=dtype), index.to(device)


def check_against_reference(anchor, memory, index, z):
    a = anchor.detach().clone().requires_grad_()
    ours = kdops_crd(a, memory, index, z)
    (ours_g,) = torch.autograd.grad(ours, a)
    ref_a = anchor.detach().double().requires_grad_()
    ref = reference_crd(ref_a, memory.double(), index, z)
    (ref_g,) = torch.autograd.grad(ref, ref_a)
    assert ours.dtype == torch.float32 and ours_g.dtype == anchor.dtype
    # bf16: the op reads the 16-bit values and computes in fp32, so the loss is near fp32 accuracy on them;
    # the gradient is returned in bf16 (its rounding, 2^-8 relative)
    fp32 = anchor.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-4 if fp32 else 1e-3, atol=1e-5)
    # a gradient entry sums the positive's and the negatives' terms, of either sign: an absolute tolerance
    # relative to the largest entry
    scale = ref_g.abs().max().item()
    torch.testing.assert_close(ours_g.double(), ref_g, rtol=1e-3 if fp32 else 2e-2,
                               atol=(1e-4 if fp32 else 1e-2) * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", modes(["fwd", "fwd+bwd"]))
@pytest.mark.parametrize("dtype", dtypes(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_crd_nce_loss(benchmark, provider, shape, dtype, mode, device):
    anchor, memory, index = device_inputs(shape, DTYPES[dtype], device)
    z = first_batch_normalizer(shape)
    loss_fn = PROVIDERS[provider]()
    if provider == "kdops":
        check_against_reference(anchor, memory, index, z)
    if mode == "fwd":
        fn = lambda: loss_fn(anchor, memory, index, z)  # noqa: E731
    else:
        anchor.requires_grad_()
        fn = forward_backward(loss_fn, (anchor, memory, index, z), wrt=[0])
    run(benchmark, "crd_nce", fn, device, shape=shape_id(shape), dtype=dtype, mode=mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtypes(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_floor_index_select(benchmark, shape, dtype, device):
    """The floor: the b (k + 1) bank rows read once and written once (the reference's gather)."""
    _, memory, index = device_inputs(shape, DTYPES[dtype], device)
    flat = index.flatten()
    run(benchmark, "crd_nce", lambda: torch.index_select(memory, 0, flat), device, shape=shape_id(shape),
        dtype=dtype, mode="floor")
