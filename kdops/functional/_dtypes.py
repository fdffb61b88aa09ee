"""The dtype rules of every kdops loss, applied in this one place.

1. **Promotion.** The tensors a loss compares (student and teacher, the clouds x and y, the two maps of a pair,
   the teachers of an ensemble) may have different float dtypes. They are promoted as torch's binary ops do
   (``torch.promote_types``): bf16 with fp32 computes in fp32, bf16 with fp16 in fp32, anything with fp64 in
   fp64. Only a tensor whose dtype differs is cast, and autograd returns each input's gradient in that input's
   own dtype. Integer tensors (targets, labels, indices) are not promoted.
2. **16-bit inputs** (fp16, bf16) are accepted by every loss. Kernels that read 16-bit data accumulate in fp32
   (``at::opmath_type``) and take the 16-bit tensors as they are, without an fp32 copy. Losses built on Gram,
   kernel or distance matrices (the relational family, MMD, the Gaussian and exact W2, Sinkhorn) and LogSum
   compute in fp32 for 16-bit inputs: their inputs are upcast before the GEMM (the features are small next to
   the matrices made from them), so no Gram matrix is ever rounded to 16 bits.
3. **Autocast.** Inside ``torch.autocast`` (CPU or CUDA) every loss runs with autocast disabled for its inputs'
   device, on the promoted inputs: the value and gradients are the same as outside the autocast region, and
   the GEMMs inside a loss are not lowered to 16 bits. (torch's autocast treats its own losses the same way:
   they are on its fp32 list.) The model's layers before the loss keep running under autocast. As with any
   torch code, call ``backward()`` outside the autocast region: autograd runs the backward under the autocast
   state of its caller, and inside the region that would lower the backward's GEMMs.
4. **Result dtype**, per family:
   - ``kd``: the promoted input dtype (the per-row values are computed in fp32 for 16-bit inputs and stored
     in the input dtype, as ``F.kl_div`` does);
   - ``feature``: ``partial_l2_loss`` and ``logsum_loss`` fp32 for 16-bit maps (their sums of squares or powers
     overflow fp16), fp64 for fp64; ``margin_relu`` and ``hint_loss`` the promoted input dtype;
   - ``relational``, ``distribution``, ``ot``, ``contrastive``: fp32 for 16-bit or fp32 inputs, fp64 when fp64
     is involved (CRD's exp(s / 0.07) exceeds the fp16 range).
"""

import functools

import torch

AUTOCAST_DEVICES = ("cpu", "cuda")  # the devices kdops has kernels for


def promote(*tensors):
    """The tensors cast to their common float dtype (``None`` passes through); each is cast only if it differs."""
    dtype = None
    for t in tensors:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)


def acc_of(*tensors):
    """The dtype a Gram / kernel / distance computation over these tensors runs in: fp64 if any is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _first_device_type(args, kwargs):
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v.device.type
        if isinstance(v, (list, tuple)):
            for w in v:
                if isinstance(w, torch.Tensor):
                    return w.device.type
                if isinstance(w, (list, tuple)) and w and isinstance(w[0], torch.Tensor):
                    return w[0].device.type
    return None


def loss(fn):
    """Runs the loss with autocast disabled for the device of its first tensor argument (rule 3). Outside an
    autocast region this costs one check of the autocast state."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = _first_device_type(args, kwargs)
        if device_type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    # A code object of its own per loss: torch.compile caches and counts recompilations per code object, so
    # one wrapper code shared by every loss would make compiling the ninth different loss (torch.compile(loss)
    # directly) hit dynamo's recompile limit.
    names = {"co_name": fn.__name__}
    if hasattr(wrapper.__code__, "co_qualname"):  # Python >= 3.11
        names["co_qualname"] = fn.__qualname__
    wrapper.__code__ = wrapper.__code__.replace(**names)
    return wrapper
