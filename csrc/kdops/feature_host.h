// Host-side glue shared by the CPU and CUDA entry points of the feature-map ops: checks, contiguous
// inputs and output allocation.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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

// Checked, contiguous (b, C, *spatial) maps of partial_l2 and the margin as the kernels read it.
struct MapCall {
  at::Tensor s, t, m;
  int64_t C, B, planes, hw;  // planes = B * C, each of hw contiguous elements
};

inline MapCall prepare_maps(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                            const at::Tensor& margin) {
  check_pair(op, student, teacher);
  MapCall c;
  c.C = check_map_and_margin(op, student, margin);
  c.s = student.contiguous();
  c.t = teacher.contiguous();
  c.m = kernel_margin(margin, student);
  c.B = c.s.size(0);
  c.planes = c.B * c.C;
  c.hw = c.planes > 0 ? c.s.numel() / c.planes : 0;
  return c;
}

// ... plus the per-sample gradient in the accumulation type and the allocated gradients.
struct MapGradCall : MapCall {
  at::Tensor g, gs, gt;
};

// The gradient buffers of one call: (b, C, *spatial) where wanted, else empty.
inline void allocate_map_grads(MapGradCall& c, bool student_grad, bool teacher_grad) {
  c.gs = student_grad ? at::empty(c.s.sizes(), c.s.options()) : at::empty({0}, c.s.options());
  c.gt = teacher_grad ? at::empty(c.t.sizes(), c.t.options()) : at::empty({0}, c.t.options());
}

// partial_l2_with_grad: the forward's checked inputs plus the gradient buffers it fills.
inline MapGradCall prepare_maps_with_grad(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& margin, bool student_grad, bool teacher_grad) {
  MapGradCall c;
  static_cast<MapCall&>(c) = prepare_maps(op, student, teacher, margin);
  allocate_map_grads(c, student_grad, teacher_grad);
  return c;
}

inline MapGradCall prepare_maps_backward(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                         const at::Tensor& margin, bool student_grad, bool teacher_grad) {
  MapGradCall c;
  static_cast<MapCall&>(c) = prepare_maps("kdops.partial_l2_backward", student, teacher, margin);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == student.size(0), "kdops.partial_l2_backward: grad must have shape (",
              student.size(0), ",), got ", grad.sizes());
  TORCH_CHECK(grad.device() == student.device(), "kdops.partial_l2_backward: grad must be on ", student.device(),
              ", got ", grad.device());
  c.g = grad.to(c.m.scalar_type()).contiguous();
  allocate_map_grads(c, student_grad, teacher_grad);
  return c;
}

// margin_relu (grad == nullptr) or its backward: checked inputs and the allocated output.
struct MarginReluCall {
  at::Tensor x, m, g, out;
  int64_t C, planes, hw;
};

inline MarginReluCall prepare_margin_relu(const at::Tensor* grad, const at::Tensor& x, const at::Tensor& margin) {
  MarginReluCall c;
  c.C = check_map_and_margin("kdops.margin_relu", x, margin);
  c.x = x.contiguous();
  c.m = kernel_margin(margin, x);
  if (grad != nullptr) {
    TORCH_CHECK(grad->sizes() == x.sizes() && grad->scalar_type() == x.scalar_type(),
                "kdops.margin_relu_backward: grad must match x in shape and dtype");
    TORCH_CHECK(grad->device() == x.device(), "kdops.margin_relu_backward: grad must be on ", x.device(), ", got ",
                grad->device());
    c.g = grad->contiguous();
  }
  c.out = at::empty(c.x.sizes(), c.x.options());
  c.planes = c.x.size(0) * c.C;
  c.hw = c.planes > 0 ? c.x.numel() / c.planes : 0;
  return c;
}

// logsum and its backward: checked contiguous inputs (b undefined when absent) and allocated gradients.
struct LogsumCall {
  at::Tensor a, b, ga, gb;
  at::ScalarType acc_type;
};

inline LogsumCall prepare_logsum(const at::Tensor& a, const std::optional<at::Tensor>& b, double alpha, double eps) {
  check_logsum(a, b, alpha, eps);
  LogsumCall c;
  c.a = a.contiguous();
  if (b.has_value()) c.b = b->contiguous();
  c.acc_type = at::toOpMathType(a.scalar_type());
  return c;
}

inline LogsumCall prepare_logsum_backward(const at::Tensor& grad, const at::Tensor& a,
                                          const std::optional<at::Tensor>& b, const at::Tensor& total, double alpha,
                                          double eps, bool a_grad, bool b_grad) {
  LogsumCall c = prepare_logsum(a, b, alpha, eps);
  TORCH_CHECK(grad.numel() == 1 && total.numel() == 1, "kdops.logsum_backward: grad and total must be scalars");
  TORCH_CHECK(grad.device() == a.device() && total.device() == a.device(),
              "kdops.logsum_backward: grad and total must be on ", a.device(), ", got ", grad.device(), " and ",
              total.device());
  TORCH_CHECK(!b_grad || b.has_value(), "kdops.logsum_backward: b_grad needs b");
  c.ga = a_grad ? at::empty(c.a.sizes(), c.a.options()) : at::empty({0}, c.a.options());
  c.gb = b_grad ? at::empty(c.a.sizes(), c.a.options()) : at::empty({0}, c.a.options());
  return c;
}

}  // namespace feature
}  // namespace kdops
