// Host-side checks shared by the CPU and CUDA entry points of the feature-map ops.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace kdops {
namespace feature {

// A feature map (b, C, *spatial) and its per-channel margin (C,). Returns C.
inline int64_t check_map_and_margin(const char* op, const at::Tensor& x, const at::Tensor& margin) {
  TORCH_CHECK(x.dim() >= 2, op, ": feature maps must have shape (b, C, *spatial), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": feature maps must be floating, got ", x.scalar_type());
  TORCH_CHECK(margin.dim() == 1 && margin.size(0) == x.size(1), op, ": margin must have shape (C,) = (", x.size(1),
              ",), got ", margin.sizes());
  TORCH_CHECK(at::isFloatingType(margin.scalar_type()), op, ": margin must be floating, got ", margin.scalar_type());
  TORCH_CHECK(margin.device() == x.device(), op, ": margin must be on ", x.device(), ", got ", margin.device());
  return x.size(1);
}

inline void check_pair(const char* op, const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK(student.sizes() == teacher.sizes(), op, ": student and teacher must have the same shape, got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), op, ": student and teacher must have the same dtype, got ",
              student.scalar_type(), " and ", teacher.scalar_type());
  TORCH_CHECK(student.device() == teacher.device(), op, ": student and teacher must be on the same device, got ",
              student.device(), " and ", teacher.device());
}

// The margin as the kernels read it: contiguous, in the accumulation type of x.
inline at::Tensor kernel_margin(const at::Tensor& margin, const at::Tensor& x) {
  return margin.to(at::toOpMathType(x.scalar_type())).contiguous();
}

inline void check_logsum(const at::Tensor& a, const std::optional<at::Tensor>& b, double alpha, double eps) {
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), "kdops.logsum: input must be floating, got ", a.scalar_type());
  if (b.has_value()) check_pair("kdops.logsum", a, *b);
  TORCH_CHECK(alpha > 0.0, "kdops.logsum: alpha must be > 0, got ", alpha);
  TORCH_CHECK(eps >= 0.0, "kdops.logsum: eps must be >= 0, got ", eps);
}

}  // namespace feature
}  // namespace kdops
