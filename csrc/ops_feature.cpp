// Schemas of the feature-map ops (the Overhaul's margin ReLU and partial L2, LogSum); autograd and fake kernels
// in kdops/_ops/feature.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdops, m) {
  // Overhaul of feature distillation: max(x, margin[c]) over (b, C, *spatial), and the fused partial L2
  // sum over positions where s > max(t, m) or max(t, m) > 0, per sample (b,) in the accumulation dtype.
  m.def("margin_relu(Tensor x, Tensor margin) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("margin_relu_backward(Tensor grad, Tensor x, Tensor margin) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("partial_l2(Tensor student, Tensor teacher, Tensor margin) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def(
      "partial_l2_backward(Tensor grad, Tensor student, Tensor teacher, Tensor margin, bool student_grad, "
      "bool teacher_grad) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // The forward and the gradients of scale * sum in one pass over the maps: (per-sample sums, grad of the
  // student or empty, grad of the teacher or empty). Used by the eager CPU autograd path, where a loss that
  // is backpropagated with gradient 1 then needs no second pass.
  m.def(
      "partial_l2_with_grad(Tensor student, Tensor teacher, Tensor margin, float scale, bool student_grad, "
      "bool teacher_grad) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});

  // LogSum of the projector recipe: (log(S + eps), S) with S = sum |a - b|^alpha (b optional), 0-dim,
  // in the accumulation dtype.
  m.def("logsum(Tensor a, Tensor? b, float alpha, float eps) -> (Tensor, Tensor)", {at::Tag::pt2_compliant_tag});
  m.def(
      "logsum_backward(Tensor grad, Tensor a, Tensor? b, Tensor total, float alpha, float eps, bool a_grad, "
      "bool b_grad) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}
