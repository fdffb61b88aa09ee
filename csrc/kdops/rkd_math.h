// Math of the fused RKD angle loss: the angle cosine of a triplet from Gram entries and its smooth-L1 term.
// Shared by the CPU and CUDA kernels.
//
// For vertex a and points j, k: psi[a,j,k] = <x_j - x_a, x_k - x_a> * u[a,j] * u[a,k] with
// <x_j - x_a, x_k - x_a> = G_jk - G_aj - G_ak + G_aa and u[a,j] = 1 / |x_j - x_a| (0 for a degenerate pair,
// where normalize() would give the zero vector). Memory O(b^2), work O(b^3).
#pragma once

#include "kdops/common.h"

namespace kdops {
namespace rkd {

template <typename T>
KDOPS_HOST_DEVICE T psi(T g_jk, T g_aj, T g_ak, T g_aa, T u_aj, T u_ak) {
  return (g_jk - g_aj - g_ak + g_aa) * u_aj * u_ak;
}

// smooth-L1 with beta = 1 and its derivative
template <typename T>
KDOPS_HOST_DEVICE T huber(T z) {
  const T az = z < T(0) ? -z : z;
  return az < T(1) ? T(0.5) * z * z : az - T(0.5);
}

template <typename T>
KDOPS_HOST_DEVICE T huber_grad(T z) {
  return z > T(1) ? T(1) : (z < T(-1) ? T(-1) : z);
}

}  // namespace rkd
}  // namespace kdops
