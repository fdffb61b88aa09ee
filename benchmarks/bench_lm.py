"""Language-model distillation benchmark: the student's lm_head fused with the divergence to the teacher's
(``fused_linear_kd_loss``), forward + backward (the gradients of the student's hidden states and lm_head
weight; the teacher is frozen: its tensors need no gradient), fp32 and bf16, divergence JSD with beta = 0.5
(the headline) and forward KL, reduction mean over the tokens, no target (no hard term), temperature 1.

Shapes (tokens, Hs, Ht, V): student hidden states (tokens, Hs), student weight (V, Hs), teacher hidden states
(tokens, Ht), teacher weight (V, Ht); (1024, 256, 512, 32000) and (4096, 256, 512, 32000). The two token counts
show how peak memory grows with the tokens: the fused providers hold one chunk of logits at a time, so theirs
stays flat while eager's grows with tokens x V (the report's "peak memory against tokens" table). Hidden states
are N(0, 1) and the weights N(0, (2 / sqrt(H))^2), so that the logits have a standard deviation of about 2.

Providers (each takes the four tensors and returns the mean loss):

- ``kdops``: ``kdops.functional.fused_linear_kd_loss(sh, sw, th, tw, divergence=..., beta=0.5)`` (default
  chunk_size: a power of two, 64 MiB of fp32 student + teacher logits per chunk on the CPU, 256 tokens at V =
  32000). On a CPU with AVX512-BF16, bf16 inputs go to kdops' bf16 GEMMs (``csrc/cpu/bf16_gemm.h``, measured
  here inside the op, against the ``gemm_bf16`` column; fp32 accumulators and results, the
  logits' gradients split into two bf16 terms for the gradient GEMMs); elsewhere they are read through fp32
  copies. Either way logits, softmax and gradients are fp32.
- ``eager``: the reference ``kdops.reference.fused_linear_kd_loss``, the whole (tokens, V) logits formed and the
  formulas written term by term, autograd for the backward. For bf16 inputs it computes in bf16 (the logits,
  log-softmaxes and divergence terms are bf16 tensors), as eager PyTorch code does.
- ``compiled``: ``torch.compile`` of that reference (static shapes).
- ``liger`` / ``liger_nocompile``: Liger-Kernel's chunked loss ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(
  weight_hard_loss=0.0, weight_soft_loss=1.0, beta=b, temperature=1.0, compiled=True / False)`` (its default
  chunk_size, 1024 tokens), called as ``loss(sh, sw, th, tw, target)`` with ``target`` all zeros (no token
  ignored). It is plain PyTorch (no Triton kernel), so it runs on the CPU: per chunk ``torch.func.grad_and_value``
  of the chunk's loss, which ``compiled=True`` (its default, ``liger``) wraps in ``torch.compile`` (run here with
  dynamo's automatic dynamic shapes off: static shapes, as the ``compiled`` provider, see liger_loss). Its convention
  is kdops': JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q (P teacher, Q student),
  beta = 0 forward KL(P || Q) (it switches to ``F.kl_div`` there), so the forward-KL rows call it with beta = 0;
  its soft loss is the sum over the chunk's tokens divided by the number of targets != ignore_index over the
  whole batch, i.e. the mean over the tokens here, as kdops' reduction="mean"; temperature divides the logits
  with no T^2 factor (1 here); weight_hard_loss = 0 skips its cross-entropy (and the fp32 log-softmax it needs),
  so it times the soft term alone. It computes in the inputs' dtype: bf16 logits, log-softmaxes and JSD terms for
  bf16 inputs (its weight gradient is also accumulated over chunks in bf16), with the loss in fp32. Skipped, with
  the reason, where liger-kernel cannot be imported.
- ``gemm_floor`` (the family's floor, ``mode=floor``): the four GEMMs any fused implementation needs, chunked
  over tokens with kdops' default chunk size, into preallocated fp32 buffers (torch.mm(out=), addmm_): student
  logits chunk ``hs_c @ Ws.T``, teacher logits chunk ``ht_c @ Wt.T``, hidden-state gradient ``G_c @ Ws`` and weight
  gradient ``Ws_grad += G_c.T @ hs_c``, with G_c the student logits buffer itself (kdops overwrites the logits with
  their gradient in place), in fp32, the accumulation dtype. For bf16 inputs the floor upcasts as kdops does: both
  weights once per call, the hidden states per chunk, into preallocated fp32 buffers; it skips the downcast of
  the gradients to bf16 that kdops returns. No softmax, no divergence: kdops / floor is what the row kernel and
  the glue add to the GEMMs.
- ``gemm_bf16`` (bf16 rows only, a column beside the providers): the same four chunked GEMMs on the bf16 inputs
  through ``torch.mm`` (oneDNN), with bf16 outputs. It rounds the logits to bf16, so it is no implementation of
  the loss; it is the speed of torch's GEMMs on bf16 inputs here, below which no GEMM-based loss can go. "vs
  gemm_bf16" below 1 is kdops' time over it inverted.

Before timing, every ``kdops`` and ``liger*`` benchmark checks its loss and both student gradients against the
reference in float64 on the first CHECK_TOKENS tokens of the same (dtype-rounded) inputs, and the ``liger*``
ones record |kdops - liger| on the full inputs in extra_info["value_diff"] (the report's "|value diff|"
column). Peak memory is that of one call (benchmarks/common.py), in extra_info["peak_mib"].

    pytest benchmarks/bench_lm.py --benchmark-only --benchmark-json=build/bench_lm.json
    python -m benchmarks.report build/bench_lm.json
    KDOPS_BENCH_QUICK=1 pytest benchmarks/bench_lm.py --benchmark-only     # tiny shapes, each provider once
"""

import pytest
import torch

import kdops  # noqa: F401
from benchmarks.common import DEVICES, HEADLINE, compiled, dtypes, forward_backward, run, shape_id, sizes
from kdops import functional as F
from kdops import reference as R
from kdops.functional.lm import _chunk

# (tokens, Hs, Ht, V)
SHAPES = sizes([(1024, 256, 512, 32000), (4096, 256, 512, 32000)], quick=[(64, 16, 32, 500), (128, 16, 32, 500)],
               headline=[(4096, 256, 512, 32000)])
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DIVERGENCES = ["jsd"] if HEADLINE else ["jsd", "kl"]
BETA = 0.5
CHECK_TOKENS = 512  # the float64 reference check runs on this many tokens (2 kdops chunks at V = 32000)
LOGIT_STD = 2.0


def kdops_loss(divergence):
    def loss(sh, sw, th, tw):
        return F.fused_linear_kd_loss(sh, sw, th, tw, divergence=divergence, beta=BETA)
    return loss


def reference_lm(sh, sw, th, tw, divergence):
    return R.fused_linear_kd_loss(sh, sw, th, tw, divergence=divergence, beta=BETA)


def eager_loss(divergence):
    return lambda sh, sw, th, tw: reference_lm(sh, sw, th, tw, divergence)


def compiled_loss(divergence):
    fn = compiled(reference_lm)
    return lambda sh, sw, th, tw: fn(sh, sw, th, tw, divergence)


def liger_missing(device):
    """Why the Liger providers cannot run here, or None."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: F401
    except Exception as e:  # ImportError, or a Triton / CUDA import failing on this machine
        return "liger-kernel cannot be imported (%s: %s); `pip install liger-kernel`" % (type(e).__name__, e)
    return None


_targets = {}


def liger_loss(divergence, compile_chunks):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    # Liger's torch.compile of its chunk function recompiles per chunk shape / dtype / beta: past dynamo's default
    # limit (8) it would silently run eager while reported as compiled, so the limit is raised (as
    # benchmarks.common.compiled does for the reference). Static shapes, as for the compiled reference: with
    # dynamo's automatic dynamic shapes the check's CHECK_TOKENS-token chunk followed by the benchmark's
    # 1024-token chunks would recompile the chunk function with a dynamic token dimension, which a training run
    # of fixed-shape chunks never sees.
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 256)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)
    if compile_chunks:
        cfg.automatic_dynamic_shapes = False
    module = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA if divergence == "jsd"
                                     else 0.0, temperature=1.0, compiled=compile_chunks)

    def loss(sh, sw, th, tw):
        key = (sh.shape[0], sh.device)
        if key not in _targets:  # all zeros: no token is ignore_index, so Liger's count is the token count
            _targets[key] = torch.zeros(sh.shape[0], dtype=torch.long, device=sh.device)
        return module(sh, sw, th, tw, _targets[key])
    return loss


PROVIDERS = {"kdops": kdops_loss, "eager": eager_loss, "compiled": compiled_loss,
             "liger": lambda d: liger_loss(d, True), "liger_nocompile": lambda d: liger_loss(d, False)}


def make_inputs(shape, dtype, device):
    """(student hidden, student weight, teacher hidden, teacher weight), logits of standard deviation ~2."""
    g = torch.Generator().manual_seed(0)
    n, hs, ht, v = shape
    sh = torch.randn(n, hs, generator=g)
    sw = torch.randn(v, hs, generator=g) * (LOGIT_STD / hs ** 0.5)
    th = torch.randn(n, ht, generator=g)
    tw = torch.randn(v, ht, generator=g) * (LOGIT_STD / ht ** 0.5)
    return [t.to(device=device, dtype=dtype) for t in (sh, sw, th, tw)]


# (loss rtol, gradient tolerance relative to the gradient's largest entry)
TOLERANCES = {
    # fp32 logits and softmax over 32000 columns: fp32 rounding of the sums, ~1e-6 relative
    ("kdops", torch.float32): (1e-4, 1e-4),
    # kdops reads bf16 values and computes in fp32 (near fp32 accuracy on them); the gradients are returned in
    # bf16 (2^-8 relative rounding)
    ("kdops", torch.bfloat16): (1e-3, 1e-2),
    ("liger", torch.float32): (1e-4, 1e-4),
    # Liger computes in bf16: each logit rounded to 2^-8 relative (~0.01 absolute at |z| ~ 4), the log-softmaxes,
    # the mixture's log and the JSD terms rounded again (log(q / m) loses its leading bits to cancellation), the
    # weight gradient summed over chunks in bf16. Measured on these inputs (512 tokens, V = 32000): loss 1e-3 (JSD)
    # to 4e-3 (KL) relative, gradients up to 5e-2 of their largest entry (JSD), 1e-2 (KL)
    ("liger", torch.bfloat16): (2e-2, 1e-1),
}


def check_against_reference(provider, loss_fn, inputs, divergence):
    """provider's loss and student gradients vs the float64 reference on the first CHECK_TOKENS tokens."""
    sh, sw, th, tw = inputs
    n = min(CHECK_TOKENS, sh.shape[0])
    ours_in = [sh[:n].detach().clone().requires_grad_(), sw.detach().clone().requires_grad_(), th[:n], tw]
    ref_in = [ours_in[0].detach().double().requires_grad_(), sw.detach().double().requires_grad_(),
              th[:n].double(), tw.double()]
    ours = loss_fn(*ours_in)
    ours_g = torch.autograd.grad(ours, ours_in[:2])
    ref = reference_lm(*ref_in, divergence)
    ref_g = torch.autograd.grad(ref, ref_in[:2])
    assert ours.dtype == torch.float32 and [g.dtype for g in ours_g] == [sh.dtype, sw.dtype]
    rtol, gtol = TOLERANCES[("liger" if provider.startswith("liger") else provider, sh.dtype)]
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=rtol, atol=1e-6)
    # a gradient entry sums terms of either sign over the vocabulary (hidden states) or the tokens (weight): an
    # absolute tolerance relative to the largest entry
    for a, b in zip(ours_g, ref_g):
        torch.testing.assert_close(a.double(), b, rtol=gtol, atol=gtol * b.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", dtypes(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_fused_linear_kd_loss(benchmark, provider, shape, dtype, divergence, device):
    if provider.startswith("liger") and liger_missing(device):
        pytest.skip(liger_missing(device))
    inputs = make_inputs(shape, DTYPES[dtype], device)
    loss_fn = PROVIDERS[provider](divergence)
    if provider == "kdops" or provider.startswith("liger"):
        check_against_reference(provider, loss_fn, inputs, divergence)
    if provider.startswith("liger"):
        ours = kdops_loss(divergence)(*inputs)
        theirs = loss_fn(*inputs)
        benchmark.extra_info["value_diff"] = abs(ours.item() - theirs.item())
    inputs[0].requires_grad_()
    inputs[1].requires_grad_()
    fn = forward_backward(loss_fn, inputs, wrt=[0, 1])
    run(benchmark, "lm", fn, device, shape=shape_id(shape), dtype=dtype, divergence=divergence, mode="fwd+bwd")


def gemm_floor(sh, sw, th, tw):
    """The four chunked GEMMs of the fused op, into buffers allocated here (outside the timed call)."""
    n, hs = sh.shape
    v, ht = tw.shape
    acc = torch.float32
    chunk = _chunk("gemm_floor", None, n, 4 * v * 2, sh.device)  # kdops' default for fp32 accumulation
    new = lambda *size: torch.empty(size, dtype=acc, device=sh.device)  # noqa: E731
    zs, zt, gh, gw = new(chunk, v), new(chunk, v), new(n, hs), new(v, hs)
    upcast = sh.dtype != acc
    if upcast:
        sw32, tw32, hs32, ht32 = new(v, hs), new(v, ht), new(chunk, hs), new(chunk, ht)
    else:
        sw32, tw32 = sw, tw

    @torch.no_grad()  # out= GEMMs: no autograd, whether or not the inputs require grad
    def call():
        if upcast:
            sw32.copy_(sw)
            tw32.copy_(tw)
        for i, s in enumerate(range(0, n, chunk)):
            e = min(s + chunk, n)
            hs_c, ht_c = sh[s:e], th[s:e]
            if upcast:
                hs_c, ht_c = hs32[:e - s].copy_(hs_c), ht32[:e - s].copy_(ht_c)
            g = torch.mm(hs_c, sw32.T, out=zs[:e - s])  # student logits; G overwrites them in kdops
            torch.mm(ht_c, tw32.T, out=zt[:e - s])     # teacher logits
            torch.mm(g, sw32, out=gh[s:e])              # grad of the student hidden states
            gw.addmm_(g.T, hs_c, beta=0.0 if i == 0 else 1.0)  # grad of the student weight
        return gh, gw
    return call


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", dtypes(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_floor_gemm(benchmark, shape, dtype, device):
    """The floor: the four chunked GEMMs (student and teacher logits, both student gradients) in fp32."""
    inputs = make_inputs(shape, DTYPES[dtype], device)
    benchmark.extra_info["provider"] = "gemm_floor"
    run(benchmark, "lm", gemm_floor(*inputs), device, shape=shape_id(shape), dtype=dtype, mode="floor")


def gemm_bf16(sh, sw, th, tw):
    """The same four chunked GEMMs on the bf16 inputs as torch.mm runs them (oneDNN on CPU): bf16 outputs, so the
    logits and their gradients rounded to bf16. Not an implementation of the loss (that rounding is the accuracy
    fault kdops avoids), but the speed of these GEMMs on bf16 inputs on this machine."""
    n, hs = sh.shape
    v, ht = tw.shape
    chunk = _chunk("gemm_bf16", None, n, 4 * v * 2, sh.device)  # the chunks of gemm_floor
    new = lambda *size: torch.empty(size, dtype=sh.dtype, device=sh.device)  # noqa: E731
    zs, zt, gh, gw = new(chunk, v), new(chunk, v), new(n, hs), new(v, hs)

    @torch.no_grad()
    def call():
        for i, s in enumerate(range(0, n, chunk)):
            e = min(s + chunk, n)
            hs_c, ht_c = sh[s:e], th[s:e]
            g = torch.mm(hs_c, sw.T, out=zs[:e - s])
            torch.mm(ht_c, tw.T, out=zt[:e - s])
            torch.mm(g, sw, out=gh[s:e])
            gw.addmm_(g.T, hs_c, beta=0.0 if i == 0 else 1.0)
        return gh, gw
    return call


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [d for d in dtypes(DTYPES) if d == "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gemm_bf16(benchmark, shape, dtype, divergence, device):
    """The four chunked GEMMs in bf16 (bf16 outputs), a column of the bf16 rows: kdops' time against it is what
    the fp32 results (the extra pair of gradient GEMMs of the hi / lo split, the fp32 logits) and the row kernel
    cost on top of torch's fastest GEMMs. The divergence is only the row it joins."""
    inputs = make_inputs(shape, DTYPES[dtype], device)
    benchmark.extra_info["provider"] = "gemm_bf16"
    run(benchmark, "lm", gemm_bf16(*inputs), device, shape=shape_id(shape), dtype=dtype, divergence=divergence,
        mode="fwd+bwd")
