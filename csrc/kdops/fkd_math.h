// Math of the fused FKD epilogue: the student's raw Gram matrix G = H H^T and the teacher kernel K (b, b).
// The student kernel is G_ij c_i c_j with c_i = 1 / max(n_i, 1e-12), n_i = sqrt(G_ii) (correlation), or G
// itself (linear); the loss is sum over i != j of (rho_ij - K_ij)^2 / (b (b - 1)) plus the feature
// regularisation fr_weight * mean_i n_i^p, both from the same rows. Shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

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

// ---- The CUDA kernels' decomposition (csrc/cuda/fkd.cu), written once for the kernels and for their host
// emulation (csrc/cpu/fkd_emulate.cpp); the CPU kernel folds the diagonal's terms into its row pass instead.
// One block per row i: thread `tid` of `threads` takes its strided share of the row and returns its part of
// the row's sum (Mode 0: the squared kernel differences; Mode 1: sum_j dG_ij G_ij, writing dG's direct part
// times cf and dK), which the block reduces; Mode 0's thread 0 adds the row's regularisation term. Then, for
// the student, one thread per row adds the regularisation's and the norms' terms to dG_ii.
template <typename T>
KDOPS_HOST_DEVICE T scale_at(const T* g, int64_t b, int64_t j, bool cosine) {
  return scale_of(g[j * b + j], cosine);
}

template <int Mode, typename T>
KDOPS_HOST_DEVICE T row_share(const T* g, const T* k, int64_t b, bool cosine, T cf, bool want_s, bool want_t,
                              int64_t i, int64_t tid, int64_t threads, T* dg, T* dk) {
  const T ci = scale_at(g, b, i, cosine);
  T acc = 0;
  for (int64_t j = tid; j < b; j += threads) {
    const T cj = scale_at(g, b, j, cosine);
    const T d = kernel_diff(g[i * b + j], k[i * b + j], ci, cj, j == i);
    if (Mode == 0) {
      acc += d * d;
    } else {
      const T dd = T(2) * cf * d;
      if (want_s) {
        dg[i * b + j] = dd * ci * cj;
        acc += dd * ci * cj * g[i * b + j];
      }
      if (want_t) dk[i * b + j] = -dd;
    }
  }
  return acc;
}

template <typename T>
KDOPS_HOST_DEVICE T row_fr(const T* g, int64_t b, int power, int64_t i) {
  return fr_term(sqrt_pos_(g[i * b + i]), g[i * b + i], power);
}

template <typename T>
KDOPS_HOST_DEVICE void diag_entry(const T* g, int64_t b, bool cosine, int power, T fr_w, const T* rho, T* dg,
                                  int64_t i) {
  const T n = sqrt_pos_(g[i * b + i]);
  T extra = fr_w * fr_grad(n, power);
  if (cosine) extra += norm_grad(rho[i], g[i * b + i]);
  dg[i * b + i] += extra;
}

}  // namespace fkd
}  // namespace kdops
