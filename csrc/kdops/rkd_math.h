// Math of the fused RKD angle loss: the angle cosine of a triplet from Gram entries and its smooth-L1 term.
// Shared by the CPU and CUDA kernels.
//
// For vertex a and points j, k: psi[a,j,k] = <x_j - x_a, x_k - x_a> * u[a,j] * u[a,k] with
// <x_j - x_a, x_k - x_a> = G_jk - G_aj - G_ak + G_aa and u[a,j] = 1 / |x_j - x_a| (0 for a degenerate pair,
// where normalize() would give the zero vector). Memory O(b^2), work O(b^3).
#pragma once

#include <cstdint>

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

// ---- The CUDA kernels' decomposition (csrc/cuda/rkd.cu), written once for the kernels and for their host
// emulation (csrc/cpu/rkd_emulate.cpp); the CPU kernel instead runs one task per vertex a over all (j, k).
// One block per pair (a, j): thread `tid` of `threads` sums its strided share of the k terms, into sums[0]
// (Mode 0: the smooth-L1 terms) or sums[0..3] (Mode 1: the four row sums of rkd_host.h); the block reduces
// each, and pair_outputs scales them for storage. The G_jk part: one thread per entry (j, k), summing over a.
template <int Mode, typename T>
KDOPS_HOST_DEVICE void pair_share(const T* gs, const T* gt, const T* us, const T* ut, int64_t b, T c, int64_t a,
                                  int64_t j, int64_t tid, int64_t threads, T* sums) {
  const T *gsj = gs + j * b, *gtj = gt + j * b, *gsa = gs + a * b, *gta = gt + a * b;
  const T *usa = us + a * b, *uta = ut + a * b;
  const T gs_aj = gsa[j], gs_aa = gsa[a], us_aj = usa[j], gt_aj = gta[j], gt_aa = gta[a], ut_aj = uta[j];
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (int64_t k = tid; k < b; k += threads) {
    const T ps = psi(gsj[k], gs_aj, gsa[k], gs_aa, us_aj, usa[k]);
    const T pt = psi(gtj[k], gt_aj, gta[k], gt_aa, ut_aj, uta[k]);
    if (Mode == 0) {
      s0 += huber(ps - pt);
    } else {
      const T r = c * huber_grad(ps - pt);
      s0 += r * usa[k];
      s1 += r * ps;
      s2 -= r * uta[k];
      s3 -= r * pt;
    }
  }
  sums[0] = s0;
  sums[1] = s1;
  sums[2] = s2;
  sums[3] = s3;
}

// The stored values of pair (a, j) from its block-reduced sums (Mode 0 uses sums[0] only).
template <int Mode, typename T>
KDOPS_HOST_DEVICE void pair_outputs(const T* us, const T* ut, int64_t b, int64_t a, int64_t j, T* sums) {
  if (Mode == 1) {
    sums[0] *= us[a * b + j];
    sums[2] *= ut[a * b + j];
  }
}

template <typename T>
KDOPS_HOST_DEVICE void cols_entry(const T* gs, const T* gt, const T* us, const T* ut, int64_t b, T c, int64_t j,
                                  int64_t k, T* dgs, T* dgt) {
  const T *gsj = gs + j * b, *gtj = gt + j * b;
  T acc_s = 0, acc_t = 0;
  for (int64_t a = 0; a < b; ++a) {
    const T *gsa = gs + a * b, *gta = gt + a * b, *usa = us + a * b, *uta = ut + a * b;
    const T ps = psi(gsj[k], gsa[j], gsa[k], gsa[a], usa[j], usa[k]);
    const T pt = psi(gtj[k], gta[j], gta[k], gta[a], uta[j], uta[k]);
    const T r = c * huber_grad(ps - pt);
    acc_s += r * usa[j] * usa[k];
    acc_t -= r * uta[j] * uta[k];
  }
  dgs[j * b + k] = acc_s;
  dgt[j * b + k] = acc_t;
}

}  // namespace rkd
}  // namespace kdops
