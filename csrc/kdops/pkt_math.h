// Math of the fused PKT epilogue on the raw Gram matrices G = X X^T. With n_i = sqrt(G_ii) and
// c_i = 1 / (n_i + eps), the cosine matrix of PKT's normalised rows is S_ij = G_ij c_i c_j, its affinities
// A = (S + 1) / 2, P = A / rowsum(A), and the loss sums P_t log((P_t + eps) / (P_s + eps)).
// Shared by the CPU and CUDA kernels.
#pragma once

#include "kdops/common.h"

namespace kdops {
namespace pkt {

template <typename T>
KDOPS_HOST_DEVICE T affinity(T g, T ci, T cj) {
  return (g * ci * cj + T(1)) * T(0.5);
}

template <typename T>
KDOPS_HOST_DEVICE T kl_term(T pt, T ps, T eps) {
  return pt * log_pos_((pt + eps) / (ps + eps));
}

// dL/dP_s and dL/dP_t of one term (unit scale).
template <typename T>
KDOPS_HOST_DEVICE T kl_grad_s(T pt, T ps, T eps) {
  return -pt / (ps + eps);
}

template <typename T>
KDOPS_HOST_DEVICE T kl_grad_t(T pt, T ps, T eps) {
  return log_pos_((pt + eps) / (ps + eps)) + pt / (pt + eps);
}

// The gradient through the row normalisation P = A / r and A = (S + 1) / 2 to the Gram entry:
// dL/dG_ij (direct part) = (q_ij - w_i) / r_i / 2 * c_i c_j, with q = dL/dP and w_i = sum_j q_ij P_ij.
template <typename T>
KDOPS_HOST_DEVICE T gram_grad(T q, T w, T inv_r, T ci, T cj) {
  return (q - w) * inv_r * T(0.5) * ci * cj;
}

// The diagonal's extra term through c_i: -(rho_i + kappa_i) c_i / (2 n_i), rho / kappa the row / column sums
// of dG o G (direct part); 0 for a zero row (the norm's subgradient).
template <typename T>
KDOPS_HOST_DEVICE T diag_grad(T rho_plus_kappa, T ci, T ni) {
  return ni > T(0) ? -rho_plus_kappa * ci / (T(2) * ni) : T(0);
}

}  // namespace pkt
}  // namespace kdops
