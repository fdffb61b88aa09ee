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

TORCH_LIBRARY_FRAGMENT(kdops, m) {
  // The primitives over a Gram matrix G = X X^T, (n, n) or (B, n, n): kind 0 the cosine kernel G_ij c_i c_j
  // (c_i = 1 / max(sqrt(G_ii), 1e-12)), 1 the distances sqrt(max(G_ii + G_jj - 2 G_ij, 1e-12)), 2 their
  // squares max(., 0), distances exactly 0 on the diagonal. The backward returns dL/dG (the diagonal's terms
  // included) from the incoming gradient and the forward's output.
  m.def("gram_transform(Tensor gram, int kind) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("gram_transform_backward(Tensor grad, Tensor gram, Tensor out, int kind) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Test only: gram_transform_backward by the CUDA kernels' decomposition (row blocks of `threads` virtual
  // threads with CUB-order reductions, then the column pass) run on the host.
  m.def("_gram_transform_backward_emulate_device(Tensor grad, Tensor gram, Tensor out, int kind, int threads) -> Tensor");
  // Test only, likewise: fkd_gram, pkt_gram and rkd_angle and their backward by the CUDA kernels' decomposition.
  m.def("_fkd_gram_emulate_device(Tensor gram_s, Tensor kernel_t, bool cosine, float fr_weight, int fr_power, "
        "int threads) -> Tensor");
  m.def("_fkd_gram_backward_emulate_device(Tensor grad, Tensor gram_s, Tensor kernel_t, bool cosine, "
        "float fr_weight, int fr_power, bool student_grad, bool teacher_grad, int threads) -> (Tensor, Tensor)");
  m.def("_pkt_gram_emulate_device(Tensor gram_s, Tensor gram_t, float eps, int threads) -> Tensor");
  m.def("_pkt_gram_backward_emulate_device(Tensor grad, Tensor gram_s, Tensor gram_t, float eps, "
        "bool student_grad, bool teacher_grad, int threads) -> (Tensor, Tensor)");
  m.def("_rkd_angle_emulate_device(Tensor gram_s, Tensor gram_t, int threads) -> Tensor");
  m.def("_rkd_angle_backward_emulate_device(Tensor grad, Tensor gram_s, Tensor gram_t, bool student_grad, "
        "bool teacher_grad, int threads) -> (Tensor, Tensor)");
  // The angle tensor psi[..., a, j, k] = <n_aj, n_ak>, n_aj the unit vector from x_a to x_j (0 for coincident
  // points), from the Gram matrix (n, n) -> (n, n, n) or (B, n, n) -> (B, n, n, n). The backward returns dL/dG.
  m.def("angle_tensor_gram(Tensor gram) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("angle_tensor_gram_backward(Tensor grad, Tensor gram) -> Tensor", {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_FRAGMENT(kdops, m) {
  // CC's epilogue on the Gram matrices (b, b): the correlation kernels C = e^(-2 gamma) sum_{p<=order}
  // (2 gamma G)^p / p! of both sides, |C_s - C_t|_F / b^2. The backward returns dL/dG per side.
  m.def("cc_gram(Tensor gram_s, Tensor gram_t, float gamma, int order) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def(
      "cc_gram_backward(Tensor grad, Tensor gram_s, Tensor gram_t, float gamma, int order, bool student_grad, "
      "bool teacher_grad) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_FRAGMENT(kdops, m) {
  // Attention transfer's map: e[b, hw] = sum over channels (mean if `mean`) of |f[b, c, hw]|^p for f
  // (b, C, HW), in one read of the map. The backward returns dL/df.
  m.def("at_map(Tensor f, float p, bool mean) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("at_map_backward(Tensor grad, Tensor f, float p, bool mean) -> Tensor", {at::Tag::pt2_compliant_tag});
}
