// Math of the Sinkhorn op: the ground cost c(x, y) = |x - y|^p / p from a Gram entry, and the log-domain
// dual update of one potential. Shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>

#include "kdops/common.h"

namespace kdops {
namespace ot {

// Cost from dot = <x, y> and the halved squared norms xh = |x|^2 / 2, yh = |y|^2 / 2:
// |x - y|^2 / 2 = xh + yh - dot (clamped at 0: the identity cancels for near points), then |x - y|^p / p.
template <typename T>
KDOPS_HOST_DEVICE T cost(T dot, T xh, T yh, T p) {
  T half_sq = xh + yh - dot;
  half_sq = half_sq > T(0) ? half_sq : T(0);
  if (p == T(2)) return half_sq;
  const T dist = ::sqrt(T(2) * half_sq);
  if (p == T(1)) return dist;
  return ::pow(dist, p) / p;
}

// One term of the log-domain update f_i = -eps * log sum_k exp(h_k - c_ik / eps), h_k = log w_k + g_k / eps.
template <typename T>
KDOPS_HOST_DEVICE T lse_arg(T h, T c, T inv_eps) {
  return h - c * inv_eps;
}

}  // namespace ot
}  // namespace kdops
