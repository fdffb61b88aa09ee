// Schemas of the language-model distillation family (fused lm_head + divergence). Kernels register per device in
// csrc/cpu/lm.cpp and csrc/cuda/lm.cu around the shared chunk loop of csrc/kdops/lm_host.h; autograd and fake
// kernels are registered from Python (kdops/_ops/lm.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdops, m) {
  // Per token (row of the hidden states): the divergence (code: 0 kl, 1 reverse_kl, 2 jsd, 3 skew_kl,
  // 4 skew_reverse_kl, 5 tvd; `mix` is JSD's beta or the skew's lambda) between the teacher's and the
  // student's tempered softmax over the first vocab_size columns, times soft_coef, plus hard_weight times the
  // student's untempered CE against target; rows whose target is ignore_index give 0. Logits are formed chunk by
  // chunk (chunk_size tokens) and never held whole. The teacher is teacher_hidden @ teacher_weight^T (+ bias) or
  // the given teacher_logits. Returns (total = sum_r row_weight_r * row_r (), rows (tokens,), then the gradients
  // of total named by grad_mask (1 student_hidden, 2 student_weight, 4 student_bias, 8 teacher_hidden,
  // 16 teacher_weight, 32 teacher_bias, 64 teacher_logits), each (0,) when not asked for); all in the
  // accumulation dtype.
  m.def(
      "fused_linear_kd(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor? teacher_hidden, "
      "Tensor? teacher_weight, Tensor? teacher_bias, Tensor? teacher_logits, Tensor? target, Tensor? row_weight, "
      "int divergence, float mix, float temperature, float soft_coef, float hard_weight, int ignore_index, "
      "int vocab_size, float student_softcap, float teacher_softcap, float student_scale, float teacher_scale, "
      "int chunk_size, int grad_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Top-k teachers: teacher_ids (tokens, K) and their log-probabilities, re-tempered by p^retemper / Z over the K
  // ids when retemper (= teacher_temperature / temperature) != 1; tail 0 renormalize, 1 zero, 2 bucket. Returns
  // (total, rows, then the gradients of student_hidden, student_weight, student_bias named by grad_mask).
  m.def(
      "topk_kd(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor teacher_ids, "
      "Tensor teacher_logprobs, Tensor? target, Tensor? row_weight, int tail, float retemper, float temperature, "
      "float soft_coef, float hard_weight, int ignore_index, int vocab_size, float student_softcap, "
      "float student_scale, int chunk_size, int grad_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}
