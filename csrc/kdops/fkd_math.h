// Math of the fused FKD epilogue: the student's raw Gram matrix G = H H^T and the teacher kernel K (b, b).
// The student kernel is G_ij c_i c_j with c_i = 1 / max(n_i, 1e-12), n_i = sqrt(G_ii) (correlation), or G
// itself (linear); the loss is sum over i != j of (rho_ij - K_ij)^2 / (b (b - 1)) plus the feature
// regularisation fr_weight * mean_i n_i^p, both from the same rows. Shared by the CPU and CUDA kernels.
#pragma once

#include "kdops/common.h"
#include "kdops/gram_math.h"

namespace kdops {
namespace fkd {

// c_i: the cosine kernel's 1 / max(n_i, 1e-12) (kdops/gram_math.h) for the correlation kernel, 1 for the linear
// one.
template <typename T>
KDOPS_HOST_DEVICE T scale_of(T g_ii, bool cosine) {
  return cosine ? gram_ops::cosine_scale(g_ii) : T(1);
}

// (rho_ij - K_ij) off the diagonal, 0 on it.
template <typename T>
KDOPS_HOST_DEVICE T kernel_diff(T g, T k, T ci, T cj, bool diagonal) {
  return diagonal ? T(0) : g * ci * cj - k;
}

// The feature regularisation's term and its derivative with respect to G_ii.
template <typename T>
KDOPS_HOST_DEVICE T fr_term(T n, T g_ii, int power) {
  return power == 2 ? (g_ii > T(0) ? g_ii : T(0)) : n;
}

template <typename T>
KDOPS_HOST_DEVICE T fr_grad(T n, int power) {
  return power == 2 ? T(1) : (n > T(0) ? T(1) / (T(2) * n) : T(0));
}

// dL/dG_ii through c_i (correlation kernel): the cosine kernel's diagonal term for row sum + column sum of
// dG o G over the direct part, which is symmetric here, so both sums are rho_i.
template <typename T>
KDOPS_HOST_DEVICE T norm_grad(T rho, T g_ii) {
  return gram_ops::diag_factor(gram_ops::kCosine, g_ii) * T(2) * rho;
}

}  // namespace fkd
}  // namespace kdops
