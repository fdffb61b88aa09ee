// Every kdops schema, forward and backward, in one place. Kernels register per device in csrc/cpu and
// csrc/cuda; autograd and fake (meta) kernels are registered from Python (kdops/_ops.py).
#include <torch/library.h>

TORCH_LIBRARY(kdops, m) {
  // Row-wise divergence between softmax(student / T) and softmax(teacher / T) over the last dim.
  // Returns (per-row value, per-row stats for the backward). divergence: kl | reverse_kl | jsd | dkd.
  m.def(
      "kd_div(Tensor student, Tensor teacher, Tensor? target, float temperature, str divergence, float alpha, "
      "float beta, int ignore_index) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "kd_div_backward(Tensor grad, Tensor student, Tensor teacher, Tensor? target, Tensor stats, "
      "float temperature, str divergence, float alpha, float beta, int ignore_index, bool student_grad, "
      "bool teacher_grad) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}
