"""The machinery of the fuzzed parity tests (test_fuzz_*.py): hypothesis strategies for tensors of every dtype
and layout, and the comparison of a kdops loss with its reference under a tolerance budget derived from
PyTorch's own error on the same input.

A drawn call holds the *leaves* (the tensors that get gradients) and the *arguments* made from them, which may
be non-contiguous views (a transpose, every other element of a longer buffer) or expanded ones (stride 0). The
reference runs in float64 on the exact values of the arguments, and once more in the dtype the call computes
in (the promoted dtype of its inputs): the difference between those two is PyTorch's own error on this input.
Where the loss is ill-conditioned at the input (cosines of exactly opposite points, probabilities of the size of
eps), one such sample of PyTorch's error can be luckily small, so it is also sampled at two inputs perturbed by
one rounding of that dtype (relative eps): the float64 reference's change there is the error that rounding the
inputs alone causes, and the reference in that dtype against float64 there is PyTorch's own error at a
neighbouring input. kdops must stay within twice the largest of these, plus a floor of a few ulps of that dtype
times the result's scale.

Examples: derandomized (the same examples on every run), KDOPS_FUZZ_EXAMPLES per test (default 15, raise it
for long local runs: KDOPS_FUZZ_EXAMPLES=2000 pytest python_tests/test_fuzz_kd.py).
"""

import os
from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = [F32, F64, BF16, F16]
LAYOUTS = ["contiguous", "transposed", "strided", "expanded"]
EXAMPLES = int(os.environ.get("KDOPS_FUZZ_EXAMPLES", "15"))

FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


@dataclass
class Call:
    """A drawn call: `leaves` are the tensors that get gradients, `make(leaves)` gives the positional arguments
    (views of the leaves in their drawn layouts, and any non-float arguments)."""
    leaves: list
    make: object
    kwargs: dict = field(default_factory=dict)
    ours_kwargs: dict = field(default_factory=dict)  # options of the kdops function that the reference lacks
    grad_scale: float = 1.0
    # the size of a typical gradient entry for this call, a floor for the tolerance's scale where the
    # reference's own gradient is (near) 0, e.g. identical student and teacher
    grad_floor: float = 0.0
    # likewise for the value: the size of the terms the loss sums, whose rounding bounds its absolute error
    # when the value itself cancels to (near) 0
    value_floor: float = 0.0

    @property
    def args(self):
        return self.make(self.leaves)


def tensor(data, shape, dtype, scale=1.0, layout=None, label="x", values=None):
    """(leaf, view): a leaf of `dtype` that requires grad, and the function making the argument from it (or from
    a copy of it in another dtype) in a drawn layout. `values`, if given, is a float64 tensor of `shape` used
    instead of random normal values."""
    layout = layout or data.draw(st.sampled_from(LAYOUTS), label="%s layout" % label)
    seed = data.draw(st.integers(0, 2**31 - 1), label="%s seed" % label)
    g = torch.Generator().manual_seed(seed)
    base = values if values is not None else torch.randn(shape, generator=g, dtype=F64) * scale
    if layout == "expanded" and len(shape) >= 1 and shape[0] > 1:
        return base[:1].to(dtype).requires_grad_(), lambda leaf: leaf.expand(shape)
    if layout == "transposed" and len(shape) >= 2:
        return base.transpose(0, -1).contiguous().to(dtype).requires_grad_(), lambda leaf: leaf.transpose(0, -1)
    if layout == "strided" and len(shape) >= 1 and shape[0] > 0:
        other = torch.randn(shape, generator=g, dtype=F64)
        twice = torch.stack([base, other], 1).reshape(2 * shape[0], *shape[1:])
        return twice.to(dtype).requires_grad_(), lambda leaf: leaf[::2]
    return base.to(dtype).requires_grad_(), lambda leaf: leaf


def dtype_pair(data, mixed=True):
    ds = data.draw(st.sampled_from(DTYPES), label="student dtype")
    dt = data.draw(st.sampled_from(DTYPES), label="teacher dtype") if mixed else ds
    return ds, dt


def compute_dtype(call):
    """The promoted dtype of the call's differentiated inputs."""
    dtype = None
    for t in call.leaves:
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


def _weights(out, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(out.shape, generator=g, dtype=F64) + 0.5) * scale


def value_and_grads(fn, args, kwargs, wrt, scale):
    """fn(*args) and the gradients of sum(w * fn(*args)) (w random in [0.5, 1.5] times `scale`, so grad_output
    is neither 1 nor uniform) with respect to `wrt`."""
    out = fn(*args, **kwargs)
    if not wrt:
        return out.detach(), []
    total = (out.to(F64) * _weights(out, scale)).sum()
    grads = torch.autograd.grad(total, wrt, allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if g is None else g for g, x in zip(grads, wrt)]


def reference_grads(ref, call, dtype):
    """The reference on the call's values in `dtype` (leaves copied to it, the same views made of them),
    differentiated w.r.t. those leaves."""
    leaves = [leaf.detach().to(dtype).requires_grad_() for leaf in call.leaves]
    return value_and_grads(ref, call.make(leaves), call.kwargs, leaves, call.grad_scale)


def perturbed_grads(ref, call, eps, seed, dtype):
    """The reference at the call's values times (1 + eps * u), u uniform in [-1, 1]: in float64, and in `dtype`
    on the same perturbed values; returns ((value, grads) in float64, (value, grads) in dtype), or None for the
    second where the reference cannot run in that dtype."""
    g = torch.Generator().manual_seed(seed)
    base = [leaf.detach().to(F64) * (1 + eps * (2 * torch.rand(leaf.shape, generator=g, dtype=F64) - 1))
            for leaf in call.leaves]
    leaves = [b.clone().requires_grad_() for b in base]
    exact = value_and_grads(ref, call.make(leaves), call.kwargs, leaves, call.grad_scale)
    try:
        low = [b.to(dtype).requires_grad_() for b in base]
        rounded = value_and_grads(ref, call.make(low), call.kwargs, low, call.grad_scale)
    except RuntimeError:
        rounded = None
    return exact, rounded


def check(name, ours_fn, ref_fn, call, floor_eps=None, compare_grads=True):
    """kdops against the float64 reference within the budget (see the module docstring); returns the values."""
    ours, ours_grads = value_and_grads(ours_fn, call.args, dict(call.kwargs, **call.ours_kwargs), call.leaves,
                                       call.grad_scale)
    ref64, ref64_grads = reference_grads(ref_fn, call, F64)
    c = compute_dtype(call) or F32
    yard_dtype = c
    try:
        ref_c, ref_c_grads = reference_grads(ref_fn, call, c)
        if not (torch.isfinite(ref_c).all() or not torch.isfinite(ref64).all()):
            raise FloatingPointError
    except (RuntimeError, FloatingPointError):  # the reference cannot run in that dtype: measure it in fp32
        yard_dtype = F32
        ref_c, ref_c_grads = reference_grads(ref_fn, call, F32)
    eps = max(torch.finfo(c).eps, floor_eps or 0.0)
    perturbed = [perturbed_grads(ref_fn, call, torch.finfo(c).eps, seed, yard_dtype) for seed in (1, 2)]

    def errors(pick):
        """|x - ref64| for each of PyTorch's own estimates of x: in the compute dtype at the input, in float64
        at the perturbed inputs, and in the compute dtype at the perturbed inputs against float64 there."""
        out = [(pick(ref_c, ref_c_grads), pick(ref64, ref64_grads))]
        for exact, rounded in perturbed:
            out.append((pick(*exact), pick(ref64, ref64_grads)))
            if rounded is not None:
                out.append((pick(*rounded), pick(*exact)))
        return out

    _close(name, "value", ours, ref64, errors(lambda v, gs: v), eps, call.value_floor)
    for i, (g, r64, leaf) in enumerate(zip(ours_grads, ref64_grads, call.leaves)):
        assert g.dtype == leaf.dtype, "%s: gradient %d is %s, its input %s" % (name, i, g.dtype, leaf.dtype)
        if compare_grads:
            _close(name, "gradient %d (%s)" % (i, tuple(leaf.shape)), g, r64, errors(lambda v, gs, i=i: gs[i]),
                   max(eps, torch.finfo(leaf.dtype).eps), call.grad_floor)
    return ours, ref64, yard_dtype


def _close(name, what, ours, ref64, others, eps, floor=0.0):
    """ours against ref64; `others` are pairs (estimate, exact) of the reference's own results whose distance
    measures the error the dtype itself allows (see errors() in check)."""
    # a reference value beyond the range of ours' dtype rounds to +-inf there: that is the correct result
    finite = torch.isfinite(ref64.to(ours.dtype).to(F64)) if ours.is_floating_point() else torch.isfinite(ref64)
    ours, ref64 = ours.to(F64), ref64.to(F64)
    assert ours.shape == ref64.shape, "%s %s: shape %s, reference %s" % (name, what, ours.shape, ref64.shape)
    assert torch.equal(torch.isfinite(ours), finite) or not finite.all(), \
        "%s %s: non-finite where the reference is finite:\n%s\n%s" % (name, what, ours, ref64)
    if not finite.any():
        return
    yard = torch.stack([(a.to(F64) - b.to(F64)).abs().nan_to_num(nan=0.0, posinf=0.0) for a, b in others]).amax(0)
    scale = max(ref64[finite].abs().max().item(), floor)
    budget = 2 * yard + 16 * eps * (ref64.abs() + scale) + 1e-12
    err = (ours - ref64).abs()
    bad = finite & ~(err <= budget)
    assert not bad.any(), "%s %s: error %.3g over its budget %.3g (worst of %d of %d entries); value %.6g, " \
        "reference %.6g" % (name, what, (err - budget)[bad].max().item() + budget[bad][0].item(),
                            budget[bad][0].item(), int(bad.sum()), bad.numel(), ours[bad][0].item(),
                            ref64[bad][0].item())
