// Math of the fused PKT epilogue on the raw Gram matrices G = X X^T. With n_i = sqrt(G_ii) and
// c_i = 1 / (n_i + eps), the cosine matrix of PKT's normalised rows is S_ij = G_ij c_i c_j, its affinities
// A = (S + 1) / 2, P = A / rowsum(A), and the loss sums P_t log((P_t + eps) / (P_s + eps)).
// Shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

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

// ---- The CUDA kernels' block program (csrc/cuda/pkt.cu), written once for the kernels and for their host
// emulation (csrc/cpu/pkt_emulate.cpp). One block per row i, three strided passes by thread `tid` of
// `threads`, each followed by a block reduction (pair_sum) whose result every thread reads: the affinities'
// row sums (student, teacher); then Mode 0 the row's loss terms, or Mode 1 the weights w_i = sum_j q_ij P_ij;
// then (Mode 1) dG's direct part, written, and the row sums rho of dG o G. Finally one thread per column j of
// a side adds the norms' term from rho_j and the column sum kappa_j. The CPU kernel runs the same three
// passes per row but takes the column sums in its row loop.
template <typename T>
struct Pair {
  T a, b;
};

template <typename T>
KDOPS_HOST_DEVICE Pair<T> pair_sum(const Pair<T>& x, const Pair<T>& y) {
  return {x.a + y.a, x.b + y.b};
}

template <typename T>
KDOPS_HOST_DEVICE T scale_at(const T* g, int64_t b, int64_t j, T eps) {
  return T(1) / (sqrt_pos_(g[j * b + j]) + eps);
}

template <typename T>
KDOPS_HOST_DEVICE Pair<T> affinity_share(const T* gs, const T* gt, int64_t b, T eps, int64_t i, int64_t tid,
                                         int64_t threads) {
  const T *s = gs + i * b, *t = gt + i * b;
  const T cis = scale_at(gs, b, i, eps), cit = scale_at(gt, b, i, eps);
  Pair<T> r{0, 0};
  for (int64_t j = tid; j < b; j += threads) {
    r = {r.a + affinity(s[j], cis, scale_at(gs, b, j, eps)), r.b + affinity(t[j], cit, scale_at(gt, b, j, eps))};
  }
  return r;
}

// irs, irt: 1 / the reduced affinity sums of the row.
template <int Mode, typename T>
KDOPS_HOST_DEVICE Pair<T> term_share(const T* gs, const T* gt, int64_t b, T eps, int64_t i, T irs, T irt,
                                     int64_t tid, int64_t threads) {
  const T *s = gs + i * b, *t = gt + i * b;
  const T cis = scale_at(gs, b, i, eps), cit = scale_at(gt, b, i, eps);
  Pair<T> acc{0, 0};
  for (int64_t j = tid; j < b; j += threads) {
    const T ps = affinity(s[j], cis, scale_at(gs, b, j, eps)) * irs;
    const T pt = affinity(t[j], cit, scale_at(gt, b, j, eps)) * irt;
    if (Mode == 0) {
      acc.a += kl_term(pt, ps, eps);
    } else {
      acc = {acc.a + kl_grad_s(pt, ps, eps) * ps, acc.b + kl_grad_t(pt, ps, eps) * pt};
    }
  }
  return acc;
}

// ws, wt: the reduced weights of the row; cf the loss's scale.
template <typename T>
KDOPS_HOST_DEVICE Pair<T> grad_share(const T* gs, const T* gt, int64_t b, T eps, T cf, bool want_s, bool want_t,
                                     int64_t i, T irs, T irt, T ws, T wt, int64_t tid, int64_t threads, T* dgs,
                                     T* dgt) {
  const T *s = gs + i * b, *t = gt + i * b;
  const T cis = scale_at(gs, b, i, eps), cit = scale_at(gt, b, i, eps);
  Pair<T> rho{0, 0};
  for (int64_t j = tid; j < b; j += threads) {
    const T cjs = scale_at(gs, b, j, eps), cjt = scale_at(gt, b, j, eps);
    const T ps = affinity(s[j], cis, cjs) * irs, pt = affinity(t[j], cit, cjt) * irt;
    if (want_s) {
      const T d = cf * gram_grad(kl_grad_s(pt, ps, eps), ws, irs, cis, cjs);
      dgs[i * b + j] = d;
      rho.a += d * s[j];
    }
    if (want_t) {
      const T d = cf * gram_grad(kl_grad_t(pt, ps, eps), wt, irt, cit, cjt);
      dgt[i * b + j] = d;
      rho.b += d * t[j];
    }
  }
  return rho;
}

// Column j of one side's dG (its direct part complete): kappa_j = sum_i dG_ij G_ij, then the norms' term.
template <typename T>
KDOPS_HOST_DEVICE void diag_column(const T* g, int64_t b, T eps, const T* rho, T* dg, int64_t j) {
  T kappa = 0;
  for (int64_t i = 0; i < b; ++i) kappa += dg[i * b + j] * g[i * b + j];
  const T n = sqrt_pos_(g[j * b + j]);
  dg[j * b + j] += diag_grad(rho[j] + kappa, T(1) / (n + eps), n);
}

}  // namespace pkt
}  // namespace kdops
