// Math of the Sinkhorn op: the ground cost c(x, y) = |x - y|^p / p from a Gram entry, and the log-domain
// dual update of one potential. Shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>

#include "kdops/common.h"

namespace kdops {
namespace ot {

// Cost from dot = <x, y> and the halved squared norms xh = |x|^2 / 2, yh = |y|^2 / 2:
// |x - y|^2 / 2 = xh + yh - dot (clamped at 0: the identity cancels for near points), then |x - y|^p / p.
// PK is the power as a compile-time case (2, 1, or 0 for any other p) so the p = 2 and p = 1 loops vectorise
// (a pow call anywhere in a loop body stops that).
// kCostGiven: the block already holds the cost (the tensorized backend computes it once).
enum PowerKind : int { kPowGeneral = 0, kPow1 = 1, kPow2 = 2, kCostGiven = 3 };

inline int power_kind(double p) {
  return p == 2.0 ? kPow2 : (p == 1.0 ? kPow1 : kPowGeneral);
}

template <int PK, typename T>
KDOPS_HOST_DEVICE T cost(T dot, T xh, T yh, T p) {
  if constexpr (PK == kCostGiven) return dot;
  T half_sq = xh + yh - dot;
  half_sq = half_sq > T(0) ? half_sq : T(0);
  if constexpr (PK == kPow2) {
    return half_sq;
  } else if constexpr (PK == kPow1) {
    return ::sqrt(T(2) * half_sq);
  } else {
    return ::pow(::sqrt(T(2) * half_sq), p) / p;
  }
}

// One term of the log-domain update f_i = -eps * log sum_k exp(h_k - c_ik / eps), h_k = log w_k + g_k / eps.
template <typename T>
KDOPS_HOST_DEVICE T lse_arg(T h, T c, T inv_eps) {
  return h - c * inv_eps;
}

}  // namespace ot
}  // namespace kdops
