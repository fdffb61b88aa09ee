"""Fake kernels and autograd for the distribution-matching ops.

``kdops::mmd`` is a C++ op (csrc/ops_distribution.cpp). The exact-OT pieces are Python custom ops: the solver
is POT's network simplex on the host, which no kernel of ours would improve on; registering it as an op keeps
``torch.compile`` graphs whole (the solver is an opaque node with a fake kernel) and lets opcheck test it.
"""

import numpy as np
import torch
from torch import Tensor

from kdops._ops._common import acc_dtype, import_pot


# ---- MMD (C++ kernels) ----

def _mmd_weight_numel(n, m, kernel, save_weights):
    """Elements of kdops::mmd's saved weights [W_xy | W_xx (bit 1) | W_yy (bit 2)]."""
    if kernel == "linear" or not save_weights:
        return 0
    return n * m + (n * n if save_weights & 1 else 0) + (m * m if save_weights & 2 else 0)


@torch.library.register_fake("kdops::mmd")
def _mmd_fake(x, y, kernel, gamma, coef0, degree, bandwidth, save_weights):
    acc = acc_dtype(x.dtype)
    numel = _mmd_weight_numel(x.shape[0], y.shape[0], kernel, save_weights)
    return x.new_empty((), dtype=acc), x.new_empty((), dtype=acc), x.new_empty((numel,), dtype=acc)


@torch.library.register_fake("kdops::mmd_backward")
def _mmd_backward_fake(grad, x, y, sigma, weights, saved_weights, kernel, gamma, coef0, degree, x_grad, y_grad):
    gx = x.new_empty(x.shape) if x_grad else x.new_empty((0,))
    gy = y.new_empty(y.shape) if y_grad else y.new_empty((0,))
    return gx, gy


def _mmd_setup_context(ctx, inputs, output):
    x, y, kernel, gamma, coef0, degree, _bandwidth, save = inputs
    _, sigma, weights = output
    ctx.save_for_backward(x, y, sigma, weights)
    ctx.args = (save, kernel, gamma, coef0, degree)
    ctx.mark_non_differentiable(sigma, weights)
    # sigma and the weights never get a gradient: without this, autograd would fill a zero tensor the size of
    # the weights on every backward.
    ctx.set_materialize_grads(False)


def _mmd_backward(ctx, grad, _grad_sigma, _grad_weights):
    x, y, sigma, weights = ctx.saved_tensors
    need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad is None or not (need_x or need_y):
        return (None,) * 8
    gx, gy = torch.ops.kdops.mmd_backward(grad, x, y, sigma, weights, *ctx.args, need_x, need_y)
    return (gx if need_x else None, gy if need_y else None) + (None,) * 6


torch.library.register_autograd("kdops::mmd", _mmd_backward, setup_context=_mmd_setup_context)


# ---- exact OT (POT on the host) ----

def _finite_cost(op, cost):
    """The cost as a float64 host array; NaN / inf entries (non-finite features) are refused with a clear error
    rather than handed to the network simplex, whose failure on them reads as an unrelated solver message."""
    c = cost.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(c).all():
        raise ValueError("kdops::%s: the cost matrix has NaN or inf entries: the features it compares are not "
                         "finite" % op)
    return c


def _uniform(k):
    return np.full(k, 1.0 / k)


@torch.library.custom_op("kdops::emd_plan", mutates_args=())
def emd_plan(cost: Tensor) -> Tensor:
    """Exact OT plan (n, m) between uniform marginals for the cost matrix (n, m), by ot.emd in float64."""
    c = _finite_cost("emd_plan", cost)
    plan = import_pot().emd(_uniform(c.shape[0]), _uniform(c.shape[1]), c)
    return torch.from_numpy(np.ascontiguousarray(plan)).to(device=cost.device, dtype=cost.dtype)


@emd_plan.register_fake
def _emd_plan_fake(cost):
    return cost.new_empty(cost.shape)


@torch.library.custom_op("kdops::emd_permutation", mutates_args=())
def emd_permutation(cost: Tensor) -> Tensor:
    """For a square cost (n, n) and uniform marginals the exact plan is a permutation matrix / n (a vertex
    of the Birkhoff polytope, which the network simplex returns): the permutation sigma, int64 (n,)."""
    c = _finite_cost("emd_permutation", cost)
    n = c.shape[0]
    plan = import_pot().emd(_uniform(n), _uniform(n), c)
    perm = plan.argmax(1)
    if not (np.all(plan[np.arange(n), perm] > 0.5 / n) and len(np.unique(perm)) == n):
        # Not reached with a converged simplex; an assignment solver gives an optimal permutation anyway.
        import scipy.optimize  # POT depends on scipy
        perm = scipy.optimize.linear_sum_assignment(c)[1]
    return torch.from_numpy(np.ascontiguousarray(perm, dtype=np.int64)).to(cost.device)


@emd_permutation.register_fake
def _emd_permutation_fake(cost):
    return cost.new_empty((cost.shape[0],), dtype=torch.int64)


@torch.library.custom_op("kdops::permuted_sq_dist", mutates_args=())
def permuted_sq_dist(x: Tensor, y: Tensor, perm: Tensor) -> Tensor:
    """(1/n) sum_i |x_i - y_perm(i)|^2, 0-dim in the accumulation dtype."""
    acc = acc_dtype(x.dtype)
    diff = x.to(acc) - y.index_select(0, perm).to(acc)
    return (diff * diff).sum() / x.shape[0]


@permuted_sq_dist.register_fake
def _permuted_sq_dist_fake(x, y, perm):
    return x.new_empty((), dtype=acc_dtype(x.dtype))


@torch.library.custom_op("kdops::permuted_sq_dist_backward", mutates_args=())
def permuted_sq_dist_backward(grad: Tensor, x: Tensor, y: Tensor, perm: Tensor, x_grad: bool,
                              y_grad: bool) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(x.dtype)
    gx = (x.to(acc) - y.index_select(0, perm).to(acc)) * (grad.to(acc) * (2.0 / x.shape[0]))
    gy = torch.empty_like(y) if y_grad else y.new_empty((0,))
    if y_grad:
        gy.index_copy_(0, perm, (-gx).to(y.dtype))
    return (gx.to(x.dtype) if x_grad else x.new_empty((0,))), gy


@permuted_sq_dist_backward.register_fake
def _permuted_sq_dist_backward_fake(grad, x, y, perm, x_grad, y_grad):
    gx = x.new_empty(x.shape) if x_grad else x.new_empty((0,))
    return gx, (y.new_empty(y.shape) if y_grad else y.new_empty((0,)))


def _permuted_setup_context(ctx, inputs, output):
    # x and y are the inputs (alive anyway) and perm is n integers: no (n, d) difference is kept.
    ctx.save_for_backward(*inputs)


def _permuted_backward(ctx, grad):
    x, y, perm = ctx.saved_tensors
    need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_x or need_y):
        return None, None, None
    gx, gy = torch.ops.kdops.permuted_sq_dist_backward(grad, x, y, perm, need_x, need_y)
    return (gx if need_x else None), (gy if need_y else None), None


permuted_sq_dist.register_autograd(_permuted_backward, setup_context=_permuted_setup_context)
