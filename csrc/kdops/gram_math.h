// Math of the primitives built on a (batched) Gram matrix G = X X^T: the cosine kernel G_ij c_i c_j with
// c_i = 1 / max(n_i, 1e-12), n_i = sqrt(G_ii); the Euclidean distance sqrt(max(G_ii + G_jj - 2 G_ij, 1e-12))
// and its square max(., 0), both exactly 0 on the diagonal. Backward: each entry's direct gradient dL/dG_ij,
// plus a term on the diagonal from the row and column sums of a per-entry contribution (the row norms, or
// |x_i|^2 in the distances). Shared by the CPU and CUDA kernels.
#pragma once

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

}  // namespace gram_ops
}  // namespace kdops
