// Host side of the fused epilogues over a pair of (b, b) matrices (SP, PKT, FKD), shared by the CPU and CUDA
// entry points: checks, contiguous inputs, allocated gradients, and the incoming gradient applied with ATen
// (no host sync). `Dev` supplies the passes, with any extra scalar arguments passed through:
//   Dev::forward(gs, gt, args...) -> the 0-dim loss (b >= 1);
//   Dev::backward(gs, gt, need_s, need_t, dgs, dgt, args...): its gradients for an incoming gradient of 1.
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <tuple>

namespace kdops {
namespace gram {

inline void check_grams(const char* op, const at::Tensor& gs, const at::Tensor& gt) {
  TORCH_CHECK(gs.dim() == 2 && gs.size(0) == gs.size(1) && gt.sizes() == gs.sizes(), op,
              ": student and teacher Gram matrices must both be (b, b), got ", gs.sizes(), " and ", gt.sizes());
  TORCH_CHECK(gs.scalar_type() == gt.scalar_type() &&
                  (gs.scalar_type() == at::kFloat || gs.scalar_type() == at::kDouble),
              op, ": Gram matrices must be float32 or float64 and of one dtype");
  TORCH_CHECK(gs.device() == gt.device(), op, ": Gram matrices must be on one device");
}

inline void check_nonnegative(const char* op, const char* name, double v) {
  TORCH_CHECK(v >= 0.0 && v < std::numeric_limits<double>::infinity(), op, ": ", name,
              " must be finite and >= 0, got ", v);
}

inline void check_fkd_args(const char* op, const at::Tensor& gs, double fr_weight, int64_t fr_power) {
  TORCH_CHECK(gs.dim() != 2 || gs.size(0) >= 2, op, ": FKD needs a batch of at least 2, got ", gs.size(0));
  check_nonnegative(op, "fr_weight", fr_weight);
  TORCH_CHECK(fr_power == 1 || fr_power == 2, op, ": fr_power must be 1 or 2, got ", fr_power);
}

inline void check_cc_args(const char* op, double gamma, int64_t order) {
  TORCH_CHECK(std::isfinite(gamma), op, ": gamma must be finite, got ", gamma);
  TORCH_CHECK(order >= 0, op, ": order must be >= 0, got ", order);
}

// A feature map flattened to (b, C, HW) for the attention-transfer map, and its exponent.
inline void check_at_map(const char* op, const at::Tensor& f, double p) {
  TORCH_CHECK(f.dim() == 3, op, ": the map must be (b, C, HW), got ", f.sizes());
  TORCH_CHECK(f.scalar_type() == at::kFloat || f.scalar_type() == at::kDouble, op,
              ": the map must be float32 or float64, got ", f.scalar_type());
  TORCH_CHECK(p > 0.0 && std::isfinite(p), op, ": p must be finite and > 0, got ", p);
}

// A Gram matrix (n, n) or batch of them (B, n, n) for the primitives, and the kind of transform.
inline void check_gram_transform(const char* op, const at::Tensor& g, int64_t kind) {
  TORCH_CHECK((g.dim() == 2 || g.dim() == 3) && g.size(-1) == g.size(-2), op,
              ": gram must be (n, n) or (B, n, n), got ", g.sizes());
  TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble, op,
              ": gram must be float32 or float64, got ", g.scalar_type());
  TORCH_CHECK(kind >= 0 && kind <= 2, op, ": kind must be 0 (cosine), 1 (distance) or 2 (squared distance), got ",
              kind);
}

template <class Dev, class... Args>
at::Tensor forward(const char* op, const at::Tensor& gs_in, const at::Tensor& gt_in, Args... args) {
  check_grams(op, gs_in, gt_in);
  const int64_t b = gs_in.size(0);
  if (b == 0) return at::zeros({}, gs_in.options());
  return Dev::forward(gs_in.contiguous(), gt_in.contiguous(), args...);
}

template <class Dev, class... Args>
std::tuple<at::Tensor, at::Tensor> backward(const char* op, const at::Tensor& grad, const at::Tensor& gs_in,
                                            const at::Tensor& gt_in, bool need_s, bool need_t, Args... args) {
  check_grams(op, gs_in, gt_in);
  const at::Tensor gs = gs_in.contiguous(), gt = gt_in.contiguous();
  const int64_t b = gs.size(0);
  at::Tensor dgs = need_s ? at::empty_like(gs) : at::zeros_like(gs);
  at::Tensor dgt = need_t ? at::empty_like(gt) : at::zeros_like(gt);
  if (b == 0 || !(need_s || need_t)) return {dgs, dgt};
  Dev::backward(gs, gt, need_s, need_t, dgs, dgt, args...);
  const at::Tensor g = grad.to(gs.scalar_type());
  if (need_s) dgs.mul_(g);
  if (need_t) dgt.mul_(g);
  return {dgs, dgt};
}

}  // namespace gram
}  // namespace kdops
