// Schemas of the KD family's op (KD, reverse KL, JSD, DKD), forward and backward. Kernels register per device in
// csrc/cpu and csrc/cuda; autograd and fake (meta) kernels are registered from Python (kdops/_ops/kd.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdops, m) {
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
  // The KL case of kd_div for training, CPU only: also returns the student gradient of the summed outputs
  // (grad_loss = 1 per row), formed from the forward's exps. Its autograd scales that gradient by grad_loss, or
  // runs kd_div_backward where scaling a rounded 16-bit gradient would round it twice (kdops/_ops/kd.py).
  m.def(
      "kd_div_with_grad(Tensor student, Tensor teacher, Tensor? target, float temperature, int ignore_index, "
      "float scale=1.0) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Mutual learning over N peers (a list of N logits tensors (R, C), R rows): per peer and row
  // scale * sum_{j != i} KL(p_j || p_i), p = softmax(z / T), as (N, R), and the peers' row stats (N, R, 2: max
  // logit, log-normaliser) for the backward, which gives each peer the gradient of its own value with the other
  // peers held fixed (DML's detached peers).
  m.def("mutual_kd(Tensor[] logits, float temperature, float scale=1.0) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("mutual_kd_backward(Tensor grad, Tensor[] logits, Tensor stats, float temperature, float scale=1.0) -> "
        "Tensor[]",
        {at::Tag::pt2_compliant_tag});
  // Test only: the CUDA forward algorithm of kd_div (per-thread online updates, tree merge) run on the host.
  m.def(
      "_kd_div_emulate_device(Tensor student, Tensor teacher, Tensor? target, float temperature, str divergence, "
      "float alpha, float beta, int ignore_index, int threads) -> (Tensor, Tensor)");
}
