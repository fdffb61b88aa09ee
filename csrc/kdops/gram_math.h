// Math of the primitives built on a (batched) Gram matrix G = X X^T: the cosine kernel G_ij c_i c_j with
// c_i = 1 / max(n_i, 1e-12), n_i = sqrt(G_ii); the Euclidean distance sqrt(max(G_ii + G_jj - 2 G_ij, 1e-12))
// and its square max(., 0), both exactly 0 on the diagonal. Backward: each entry's direct gradient dL/dG_ij,
// plus a term on the diagonal from the row and column sums of a per-entry contribution (the row norms, or
// |x_i|^2 in the distances). Shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "kdops/common.h"

namespace kdops {
namespace gram_ops {

enum Kind : int { kCosine = 0, kDistance = 1, kSquaredDistance = 2 };

constexpr double kTiny = 1e-12;

template <typename T>
KDOPS_HOST_DEVICE T cosine_scale(T g_ii) {
  return inv_norm_clamped_(g_ii);
}

template <typename T>
KDOPS_HOST_DEVICE T forward(int kind, T g, T gii, T gjj, T ci, T cj, bool diagonal) {
  if (kind == kCosine) return g * ci * cj;
  if (diagonal) return T(0);
  const T q = gii + gjj - T(2) * g;
  if (kind == kSquaredDistance) return q > T(0) ? q : T(0);
  return ::sqrt(q > T(kTiny) ? q : T(kTiny));
}

// dL/dG_ij's direct part from dO_ij (O the forward's output); `contrib` is what the entry adds to the
// diagonal sums (row i and column j).
template <typename T>
KDOPS_HOST_DEVICE T direct_grad(int kind, T dout, T out, T g, T gii, T gjj, T ci, T cj, bool diagonal, T& contrib) {
  if (kind == kCosine) {
    const T d = dout * ci * cj;
    contrib = d * g;
    return d;
  }
  if (diagonal) {
    contrib = T(0);
    return T(0);
  }
  const T q = gii + gjj - T(2) * g;
  // clamp_min passes the gradient where its input is >= the bound
  const T a = kind == kSquaredDistance ? (q >= T(0) ? dout : T(0)) : (q >= T(kTiny) ? dout / (T(2) * out) : T(0));
  contrib = a;
  return T(-2) * a;
}

// The factor of (row sum + column sum of contrib) added to dL/dG_ii: the norm's derivative -c_i / (2 n_i)
// for the cosine kernel (0 where the norm is clamped), 1 for the distances.
template <typename T>
KDOPS_HOST_DEVICE T diag_factor(int kind, T g_ii) {
  if (kind != kCosine) return T(1);
  const T n = sqrt_pos_(g_ii);
  return n > T(kTiny) ? T(-1) / (T(2) * n * n) : T(0);
}

// ---- The CUDA backward's decomposition (csrc/cuda/gram.cu), written once for its two kernels and for their
// host emulation (csrc/cpu/gram_emulate.cpp). The CPU kernel instead gathers each row's and column's sums in
// one pass over the matrix. Here, first one block per global row r (batch r / n, row i = r % n): thread `tid`
// of `threads` writes the direct gradients of its strided share of the row and returns its part of the row
// sum rho_r, which the block reduces; then one thread per global row r, as column j = r % n of its batch, sums
// the column (kappa) and adds the diagonal term diag_factor * (rho_r + kappa) to dG_jj.

// G_rr of global row r
template <typename T>
KDOPS_HOST_DEVICE T diag_of(const T* g, int64_t n, int64_t r) {
  return g[r * n + r % n];
}

template <typename T>
KDOPS_HOST_DEVICE T backward_row_share(const T* dout, const T* out, const T* g, int64_t n, int kind, int64_t r,
                                       int64_t tid, int64_t threads, T* dg) {
  const int64_t b0 = (r / n) * n, i = r % n;
  const T gii = diag_of(g, n, r), ci = cosine_scale(gii);
  T acc = 0;
  for (int64_t j = tid; j < n; j += threads) {
    const int64_t e = r * n + j;
    const T gjj = diag_of(g, n, b0 + j);
    T contrib;
    dg[e] = direct_grad(kind, dout[e], out[e], g[e], gii, gjj, ci, cosine_scale(gjj), j == i, contrib);
    acc += contrib;
  }
  return acc;
}

template <typename T>
KDOPS_HOST_DEVICE void backward_diag(const T* dout, const T* out, const T* g, int64_t n, int kind, int64_t r,
                                     const T* rho, T* dg) {
  const int64_t b0 = (r / n) * n, j = r % n;
  const T gjj = diag_of(g, n, r), cj = cosine_scale(gjj);
  T kappa = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = (b0 + i) * n + j;
    const T gii = diag_of(g, n, b0 + i);
    T contrib;
    (void)direct_grad(kind, dout[e], out[e], g[e], gii, gjj, cosine_scale(gii), cj, i == j, contrib);
    kappa += contrib;
  }
  dg[r * n + j] += diag_factor(kind, gjj) * (rho[r] + kappa);
}

}  // namespace gram_ops
}  // namespace kdops
