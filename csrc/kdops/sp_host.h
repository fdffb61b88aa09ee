// Host side of the fused SP epilogue, shared by the CPU and CUDA entry points: checks, the 1 / b^2 scale, and
// the incoming gradient applied with ATen (no host sync). `Dev` supplies the row passes:
//   Dev::forward(gs, gt) -> 0-dim sum over rows of |normalize(gs_i) - normalize(gt_i)|^2;
//   Dev::backward(gs, gt, cf, need_s, need_t, dgs, dgt): the gradients of cf times that sum.
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <tuple>

#include "kdops/host_common.h"

namespace kdops {
namespace sp {

inline void check_grams(const at::Tensor& gs, const at::Tensor& gt) {
  TORCH_CHECK(gs.dim() == 2 && gs.size(0) == gs.size(1) && gt.sizes() == gs.sizes(),
              "kdops.sp_gram: student and teacher Gram matrices must both be (b, b), got ", gs.sizes(), " and ",
              gt.sizes());
  TORCH_CHECK(gs.scalar_type() == gt.scalar_type() &&
                  (gs.scalar_type() == at::kFloat || gs.scalar_type() == at::kDouble),
              "kdops.sp_gram: Gram matrices must be float32 or float64 and of one dtype");
  TORCH_CHECK(gs.device() == gt.device(), "kdops.sp_gram: Gram matrices must be on one device");
}

template <class Dev>
at::Tensor gram_forward(const at::Tensor& gs_in, const at::Tensor& gt_in) {
  check_grams(gs_in, gt_in);
  const int64_t b = gs_in.size(0);
  if (b == 0) return at::zeros({}, gs_in.options());
  return Dev::forward(gs_in.contiguous(), gt_in.contiguous()) / (double(b) * double(b));
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor> gram_backward(const at::Tensor& grad, const at::Tensor& gs_in,
                                                 const at::Tensor& gt_in, bool need_s, bool need_t) {
  check_grams(gs_in, gt_in);
  const at::Tensor gs = gs_in.contiguous(), gt = gt_in.contiguous();
  const int64_t b = gs.size(0);
  at::Tensor dgs = need_s ? at::empty_like(gs) : at::zeros_like(gs);
  at::Tensor dgt = need_t ? at::empty_like(gt) : at::zeros_like(gt);
  if (b == 0 || !(need_s || need_t)) return {dgs, dgt};
  Dev::backward(gs, gt, 2.0 / (double(b) * double(b)), need_s, need_t, dgs, dgt);
  const at::Tensor g = grad.to(gs.scalar_type());
  if (need_s) dgs.mul_(g);
  if (need_t) dgt.mul_(g);
  return {dgs, dgt};
}

}  // namespace sp
}  // namespace kdops
