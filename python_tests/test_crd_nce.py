"""crd_nce_loss (CRD's NCE loss, the fused kdops::crd_nce op) and kdops.nn.CRDLoss: parity with the published
gather form (values, the anchor's gradient, the batch normaliser), odd shapes, k past one work chunk, 16-bit
inputs within PyTorch's own error, gradcheck, opcheck, compile, extremes, bad inputs, and the module's bank
update (scored before the update, the published momentum step) and normalisers (fixed by the first batch,
saved in the state dict)."""

import pytest
import torch

from conftest import DEVICES
from kdops import functional as F
from kdops import nn as knn
from kdops import reference as R


def unit(shape, g, dtype=torch.float64):
    return torch.nn.functional.normalize(torch.randn(shape, generator=g, dtype=torch.float64), dim=1).to(dtype)


def inputs(b, d, n, k, device, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    anchor = (unit((b, d), g) * scale).to(device=device, dtype=dtype)
    memory = unit((n, d), g).to(device=device, dtype=dtype)
    index = torch.randint(0, n, (b, k + 1), generator=g).to(device)
    return anchor, memory, index


def value_and_grad(fn, anchor, *args, weights=None, **kw):
    a = anchor.detach().clone().requires_grad_()
    out = fn(a, *args, **kw)
    w = torch.ones_like(out) if weights is None else weights.to(out)
    (g,) = torch.autograd.grad((out * w).sum(), a)
    return out.detach(), g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b, d, n, k", [(11, 7, 23, 5), (1, 1, 1, 1), (64, 128, 5000, 700), (3, 33, 40, 1100),
                                        (5, 16, 9, 0)])
@pytest.mark.parametrize("normalizer", [None, 3.7])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_published_gather_form(device, b, d, n, k, normalizer, reduction):
    anchor, memory, index = inputs(b, d, n, k, device)
    kw = dict(temperature=0.07, normalizer=normalizer, reduction=reduction, eps=1e-7 if k else 1e-3)
    w = torch.linspace(0.5, 2.0, b, device=device) if reduction == "none" else None  # grad_output != 1
    ours, ours_g = value_and_grad(F.crd_nce_loss, anchor, memory, index, weights=w, **kw)
    ref, ref_g = value_and_grad(R.crd_nce_loss, anchor.double(), memory.double(), index,
                                weights=None if w is None else w.double(), **kw)
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=2e-5, atol=1e-5)
    # a gradient entry sums terms of either sign (the positive's and the negatives'), which may cancel: the
    # tolerance is the larger of a relative one and twice the published form's own error in fp32
    _, fp32_g = value_and_grad(R.crd_nce_loss, anchor, memory, index, weights=w, **kw)
    atol = max(2e-5 * ref_g.abs().max().item(), 2 * (fp32_g.double() - ref_g).abs().max().item())
    torch.testing.assert_close(ours_g.double(), ref_g, rtol=2e-5, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_is_exact_and_normalizer_from_the_batch(device):
    anchor, memory, index = inputs(9, 12, 50, 30, device, dtype=torch.float64, seed=1)
    a, g = value_and_grad(F.crd_nce_loss, anchor, memory, index, n_data=1000, reduction="none")
    r, rg = value_and_grad(R.crd_nce_loss, anchor, memory, index, n_data=1000, reduction="none")
    torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, rg, rtol=1e-11, atol=1e-13)
    # the Z the op used is the published mean(exp(x)) * n_data of the batch, and passing it back gives the same
    loss, z = F.contrastive._crd_nce("t", anchor, memory, index, 0.07, None, 1000, 1e-7, "none")
    x = torch.einsum("bkd,bd->bk", memory[index], anchor) / 0.07
    torch.testing.assert_close(z, x.exp().mean() * 1000, rtol=1e-12, atol=0)
    torch.testing.assert_close(F.crd_nce_loss(anchor, memory, index, normalizer=z, n_data=1000, reduction="none"),
                               loss, rtol=1e-13, atol=0)
    # a tensor normaliser <= 0 means "not set yet" (the module's buffer before the first batch)
    torch.testing.assert_close(F.crd_nce_loss(anchor, memory, index, normalizer=torch.zeros((), device=device,
                                                                                          dtype=torch.float64),
                                              n_data=1000), loss.mean(), rtol=1e-13, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_memory_gets_no_gradient_and_mixed_dtypes_promote(device):
    anchor, memory, index = inputs(6, 8, 20, 4, device, seed=2)
    m = memory.clone().requires_grad_()
    a = anchor.clone().requires_grad_()
    F.crd_nce_loss(a, m, index).backward()
    assert a.grad is not None and m.grad is None
    out = F.crd_nce_loss(anchor.bfloat16(), memory, index)
    assert out.dtype == torch.float32
    ref = R.crd_nce_loss(anchor.bfloat16().double(), memory.double(), index)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert F.crd_nce_loss(anchor.double(), memory.half(), index).dtype == torch.float64
    # int32 indices are taken as int64
    torch.testing.assert_close(F.crd_nce_loss(anchor, memory, index.int()), F.crd_nce_loss(anchor, memory, index),
                               rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_within_torch_error(device, dtype):
    anchor, memory, index = inputs(32, 64, 300, 100, device, dtype=dtype, seed=3)
    w = torch.linspace(-1.0, 2.0, 32, device=device)
    kw = dict(reduction="none")
    exact, exact_g = value_and_grad(R.crd_nce_loss, anchor.double(), memory.double(), index, weights=w.double(), **kw)
    ours, ours_g = value_and_grad(F.crd_nce_loss, anchor, memory, index, weights=w, **kw)
    # the published code in fp32 on the same 16-bit values (in 16 bits its exp(s / 0.07) overflows fp16)
    theirs, theirs_g = value_and_grad(R.crd_nce_loss, anchor.float(), memory.float(), index, weights=w.float(), **kw)
    assert ours.dtype == torch.float32 and ours_g.dtype == dtype
    eps = torch.finfo(dtype).eps

    def err(a, b):
        return (a.double() - b).abs().max().item()

    assert err(ours, exact) <= 2 * err(theirs, exact) + 1e-6 * exact.abs().max().item()
    assert err(ours_g, exact_g) <= 2 * err(theirs_g.to(dtype), exact_g) + eps * exact_g.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
def test_extremes_stay_finite_where_the_published_form_overflows(device):
    # un-normalised anchors: exp(<m, v> / 0.07) overflows fp32 (and float64 at this scale) in the published form;
    # the log-domain terms stay finite and match float64 with a normaliser it can still form
    anchor, memory, index = inputs(4, 16, 30, 10, device, seed=4, scale=30.0)
    ours = F.crd_nce_loss(anchor, memory, index, normalizer=1e30, reduction="none")
    assert torch.isfinite(ours).all()
    ref = R.crd_nce_loss(anchor.double(), memory.double(), index, normalizer=1e30, reduction="none")
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-4)
    assert not torch.isfinite(R.crd_nce_loss(anchor, memory, index, normalizer=1e30)).item()
    big, bg = value_and_grad(F.crd_nce_loss, anchor * 100, memory, index)
    assert torch.isfinite(big).all() and torch.isfinite(bg).all()
    # the loss is never negative (every term is a softplus plus log(a / c) >= 0)
    assert (F.crd_nce_loss(anchor, memory, index, reduction="none") >= 0).all()


def test_gradcheck_float64():
    anchor, memory, index = inputs(4, 5, 12, 6, "cpu", dtype=torch.float64, seed=5)
    # (with a fixed normaliser: one formed from the batch is a constant for the gradient, as published, which a
    # finite difference does not see)
    for z in (0.3, 2.5):
        torch.autograd.gradcheck(lambda a: F.crd_nce_loss(a, memory, index, temperature=0.5, normalizer=z,
                                                          reduction="none"), (anchor.clone().requires_grad_(),))


def test_thread_count_does_not_change_the_result():
    anchor, memory, index = inputs(8, 32, 400, 2000, "cpu", seed=6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = value_and_grad(F.crd_nce_loss, anchor, memory, index)
        torch.set_num_threads(max(2, threads))
        many = value_and_grad(F.crd_nce_loss, anchor, memory, index)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_opcheck_and_compile():
    anchor, memory, index = inputs(5, 8, 30, 7, "cpu", seed=7)
    a = anchor.clone().requires_grad_()
    for z in (torch.zeros(()), torch.full((), 4.0)):
        torch.library.opcheck(torch.ops.kdops.crd_nce, (a, memory, index, z, 0.07, 30, 1e-7, True))
        torch.library.opcheck(torch.ops.kdops.crd_nce, (anchor, memory, index, z, 0.07, 30, 1e-7, False))
    fn = lambda x: F.crd_nce_loss(x, memory, index, normalizer=torch.zeros(()))  # noqa: E731
    eager, eager_g = value_and_grad(fn, anchor)
    comp, comp_g = value_and_grad(torch.compile(fn, fullgraph=True), anchor)
    torch.testing.assert_close(comp, eager, rtol=1e-6, atol=0)
    torch.testing.assert_close(comp_g, eager_g, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("args, kw, message", [
    ((torch.randn(3),), {}, "anchor must be \\(b, d\\)"),
    ((torch.randn(3, 4), torch.randn(10, 5)), {}, "memory must be \\(N, 4\\)"),
    ((torch.randint(0, 3, (3, 4)),), {}, "anchor must be a floating-point"),
    ((torch.randn(0, 4), None, torch.zeros(0, 3, dtype=torch.long)), {}, "empty batch"),
    ((torch.randn(3, 4), torch.randn(0, 4), torch.zeros(3, 3, dtype=torch.long)), {}, "memory has no rows"),
    ((torch.randn(3, 4), None, torch.zeros(3, 3)), {}, "index must be an integer tensor"),
    ((torch.randn(3, 4), None, torch.zeros(2, 3, dtype=torch.long)), {}, "index must be \\(3, k \\+ 1\\)"),
    ((torch.randn(3, 4), None, torch.zeros(3, 1, dtype=torch.long)), {"eps": 0.0}, "no negatives"),
    ((), {"temperature": 0.0}, "temperature"),
    ((), {"n_data": 0}, "n_data"),
    ((), {"normalizer": -1.0}, "normalizer"),
    ((), {"normalizer": 1e100}, r"normalizer must be in \[1.17549e-38, 3.40282e\+38\]"),
    ((), {"normalizer": 1e-46}, r"normalizer must be in \[1.17549e-38, 3.40282e\+38\]"),
    ((), {"normalizer": torch.ones(2)}, "normalizer"),
    ((), {"eps": -1.0}, "eps"),
    ((), {"reduction": "batchmean"}, "reduction"),
])
def test_bad_inputs(args, kw, message):
    anchor, memory, index = inputs(3, 4, 10, 2, "cpu")
    call = list(args) + [anchor, memory, index][len(args):]
    call = [d if a is None else a for a, d in zip(call, [anchor, memory, index])]
    with pytest.raises(ValueError, match=message):
        F.crd_nce_loss(*call, **kw)


def test_index_out_of_range_is_a_clear_error():
    anchor, memory, index = inputs(3, 4, 10, 2, "cpu")
    for bad in (10, -1):
        idx = index.clone()
        idx[1, 2] = bad
        with pytest.raises(RuntimeError, match="index values must be in \\[0, 10\\).*row 1, column 2"):
            F.crd_nce_loss(anchor, memory, idx)


def _module(device, n=40, k=12, seed=0, **kw):
    torch.manual_seed(seed)
    return knn.CRDLoss(6, 10, n_data=n, feat_dim=8, num_negatives=k, **kw).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_module_scores_before_the_update_then_updates_both_banks(device):
    crd = _module(device)
    g = torch.Generator().manual_seed(1)
    f_s, f_t = torch.randn(5, 6, generator=g).to(device), torch.randn(5, 10, generator=g).to(device)
    idx = torch.tensor([3, 17, 0, 39, 8], device=device)
    cidx = torch.cat([idx[:, None], torch.randint(0, 40, (5, 12), generator=g).to(device)], 1)
    mem_s, mem_t = crd.memory_student.clone(), crd.memory_teacher.clone()
    v_s, v_t = crd.embed(f_s, f_t)
    # the published loss on the banks as they were, each side with its own first-batch normaliser
    expect = R.crd_nce_loss(v_s.double(), mem_t.double(), cidx, n_data=40) + \
        R.crd_nce_loss(v_t.double(), mem_s.double(), cidx, n_data=40)
    params = list(crd.parameters())
    loss = crd(f_s, f_t, idx, cidx)
    torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=1e-5)
    x_s = torch.einsum("bkd,bd->bk", mem_t[cidx].double(), v_s.double()) / 0.07
    torch.testing.assert_close(crd.z_student.double(), x_s.exp().mean() * 40, rtol=1e-5, atol=0)
    # gradients reach both embeddings, as the reference's do (the in-place bank update did not disturb them)
    grads = torch.autograd.grad(loss, params)
    ref_leaves = [p.detach().clone().requires_grad_() for p in params]
    ws, bs, wt, bt = ref_leaves
    rv_s = torch.nn.functional.normalize(f_s @ ws.t() + bs, dim=1)
    rv_t = torch.nn.functional.normalize(f_t @ wt.t() + bt, dim=1)
    ref = R.crd_nce_loss(rv_s, mem_t, cidx, n_data=40) + R.crd_nce_loss(rv_t, mem_s, cidx, n_data=40)
    for a, b in zip(grads, torch.autograd.grad(ref, ref_leaves)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # both banks then took the published momentum step at idx, and only there
    R.contrastive._crd_memory_update(mem_s, idx, v_s, 0.5)
    R.contrastive._crd_memory_update(mem_t, idx, v_t, 0.5)
    torch.testing.assert_close(crd.memory_student, mem_s, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(crd.memory_teacher, mem_t, rtol=1e-6, atol=1e-7)
    rows = crd.memory_student.norm(dim=1)
    torch.testing.assert_close(rows[idx], torch.ones(5, device=device), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_module_normalisers_fixed_by_the_first_batch_and_checkpointed(device):
    crd = _module(device)
    assert crd.z_student.item() == 0 and crd.z_teacher.item() == 0
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 6, generator=g).to(device), torch.randn(4, 10, generator=g).to(device),
                torch.randperm(40, generator=g)[:4].to(device)) for _ in range(3)]
    crd(*batches[0])
    z = (crd.z_student.item(), crd.z_teacher.item())
    assert z[0] > 0 and z[1] > 0
    state = {k: v.clone() for k, v in crd.state_dict().items()}
    assert {"memory_student", "memory_teacher", "z_student", "z_teacher"} <= set(state)
    crd(*batches[1])
    assert (crd.z_student.item(), crd.z_teacher.item()) == z
    # a fresh module restored from the state dict continues exactly as the original does
    again = _module(device, seed=99)
    again.load_state_dict(state)
    gen_a, gen_b = torch.Generator(device).manual_seed(5), torch.Generator(device).manual_seed(5)
    crd.load_state_dict(state)
    torch.testing.assert_close(again(*batches[2], generator=gen_a), crd(*batches[2], generator=gen_b), rtol=0, atol=0)
    # eval mode scores without updating the banks
    crd.eval()
    before = crd.memory_student.clone()
    crd(*batches[0])
    torch.testing.assert_close(crd.memory_student, before, rtol=0, atol=0)


def test_module_uniform_negatives_and_bad_inputs():
    crd = _module("cpu", k=7)
    idx = torch.tensor([1, 2, 3])
    cidx = crd.sample_negatives(idx, torch.Generator().manual_seed(0))
    assert cidx.shape == (3, 8) and (cidx[:, 0] == idx).all() and cidx.min() >= 0 and cidx.max() < 40
    f_s, f_t = torch.randn(3, 6), torch.randn(3, 10)
    with pytest.raises(ValueError, match="student_dim, teacher_dim"):
        crd(torch.randn(3, 5), f_t, idx)
    with pytest.raises(ValueError, match="idx must be the \\(3,\\) integer"):
        crd(f_s, f_t, idx.float())
    with pytest.raises(ValueError, match="one b"):
        crd(f_s, torch.randn(2, 10), idx)
    with pytest.raises(ValueError, match="momentum"):
        knn.CRDLoss(6, 10, n_data=40, momentum=1.5)
    with pytest.raises(ValueError, match="n_data"):
        knn.CRDLoss(6, 10, n_data=0)
    with pytest.raises(RuntimeError, match="index values must be in"):
        crd(f_s, f_t, torch.tensor([1, 2, 40]))


@pytest.mark.parametrize("b, d, anchor_grad", [(0, 5, True), (0, 5, False), (3, 0, True)])
def test_raw_op_gradient_of_empty_shapes(b, d, anchor_grad):
    # the op below the functional checks: an empty batch or width backpropagates a gradient of the anchor's shape
    # (zeros: d = 0 scores every entry 0 and has no gradient entries)
    anchor = torch.randn(b, d, requires_grad=True)
    loss, _, _ = torch.ops.kdops.crd_nce(anchor, torch.randn(4, d), torch.zeros(b, 3, dtype=torch.long),
                                         torch.ones(()), 0.07, 4, 1e-7, anchor_grad)
    (grad,) = torch.autograd.grad(loss.sum(), anchor)
    assert grad.shape == anchor.shape and grad.dtype == anchor.dtype
