// Schemas of the relational ops.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdops, m) {
  // RKD angle loss from the Gram matrices G = X X^T (b, b) of student and teacher: the mean over the b^3
  // triplets (a, j, k) of smooth-L1(psi_s - psi_t), psi the cosine of the angle at vertex a, in O(b^2) memory.
  // The backward returns dL/dG per side (the caller's GEMM carries it to X).
  m.def("rkd_angle(Tensor gram_s, Tensor gram_t) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def(
      "rkd_angle_backward(Tensor grad, Tensor gram_s, Tensor gram_t, bool student_grad, bool teacher_grad) "
      "-> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_FRAGMENT(kdops, m) {
  // SP's epilogue on the Gram matrices G = F F^T (b, b): sum over rows of |normalize(G_s,i) - normalize(G_t,i)|^2
  // / b^2, rows L2-normalised with eps 1e-12. The backward returns dL/dG per side.
  m.def("sp_gram(Tensor gram_s, Tensor gram_t) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def(
      "sp_gram_backward(Tensor grad, Tensor gram_s, Tensor gram_t, bool student_grad, bool teacher_grad) "
      "-> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_FRAGMENT(kdops, m) {
  // PKT's epilogue on the raw Gram matrices G = X X^T (b, b): the rows' cosines G_ij c_i c_j with
  // c_i = 1 / (sqrt(G_ii) + eps), P = ((S + 1) / 2) / rowsum, and the mean over b^2 entries of
  // P_t log((P_t + eps) / (P_s + eps)). The backward returns dL/dG per side, the row norms' term included.
  m.def("pkt_gram(Tensor gram_s, Tensor gram_t, float eps) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def(
      "pkt_gram_backward(Tensor grad, Tensor gram_s, Tensor gram_t, float eps, bool student_grad, "
      "bool teacher_grad) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_FRAGMENT(kdops, m) {
  // FKD's epilogue on the student's raw Gram matrix G = H H^T and the teacher kernel K (b, b): the student
  // kernel (correlation: G_ij c_i c_j, c_i = 1 / max(sqrt(G_ii), 1e-12); else G), the mean over i != j of
  // (rho_ij - K_ij)^2 and fr_weight * mean_i |h_i|^fr_power from the diagonal. The backward returns dL/dG and
  // dL/dK.
  m.def("fkd_gram(Tensor gram_s, Tensor kernel_t, bool cosine, float fr_weight, int fr_power) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "fkd_gram_backward(Tensor grad, Tensor gram_s, Tensor kernel_t, bool cosine, float fr_weight, int fr_power, "
      "bool student_grad, bool teacher_grad) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}
