// Every kdops schema, forward and backward, in one place. Kernels register per device in csrc/cpu and
// csrc/cuda; autograd and fake (meta) kernels are registered from Python (kdops/_ops.py).
#include <torch/library.h>

TORCH_LIBRARY(kdops, m) {
  // Row-wise divergence between softmax(student / T) and softmax(teacher / T) over the last dim.
  // Returns (scale * per-row value, per-row stats for the backward). divergence: kl | reverse_kl | jsd | dkd.
  // `scale` folds a reduction's constant factor (T^2 / rows for batchmean) into the kernel.
  m.def(
      "kd_div(Tensor student, Tensor teacher, Tensor? target, float temperature, str divergence, float alpha, "
      "float beta, int ignore_index, float scale=1.0) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "kd_div_backward(Tensor grad, Tensor student, Tensor teacher, Tensor? target, Tensor stats, "
      "float temperature, str divergence, float alpha, float beta, int ignore_index, bool student_grad, "
      "bool teacher_grad, float scale=1.0) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Test only: the CUDA forward algorithm of kd_div (per-thread online updates, tree merge) run on the host.
  m.def(
      "_kd_div_emulate_device(Tensor student, Tensor teacher, Tensor? target, float temperature, str divergence, "
      "float alpha, float beta, int ignore_index, int threads) -> (Tensor, Tensor)");

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
