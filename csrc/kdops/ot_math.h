// Math of the Sinkhorn op: the ground cost c(x, y) = |x - y|^p / p from a Gram entry, and the log-domain
// dual update of one potential. Shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

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

// Calls f(std::integral_constant<int, PK>()) with the PowerKind of the call: kCostGiven for a block that holds
// the cost, else the case of p. Host code: picks the kernel instantiation.
template <class F>
inline void dispatch_power_kind(bool given, double p, F&& f) {
  switch (given ? int(kCostGiven) : power_kind(p)) {
    case kCostGiven: f(std::integral_constant<int, kCostGiven>()); break;
    case kPow2: f(std::integral_constant<int, kPow2>()); break;
    case kPow1: f(std::integral_constant<int, kPow1>()); break;
    default: f(std::integral_constant<int, kPowGeneral>());
  }
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

// ---- The CUDA row kernel's block algorithm, written once for the kernel (csrc/cuda/sinkhorn.cu) and for its
// host emulation (csrc/cpu/sinkhorn_emulate.cpp). Thread `tid` of `threads` folds its strided share of row i:
// first the maximum of the LSE arguments; the block reduces those maxima and shares the result; then the sum
// of the arguments' exponentials shifted by it; the block sums those, and lse_block_finish gives the potential.
// (The CPU kernel instead shifts by the row's previous potential in a single pass; see csrc/cpu/sinkhorn.cpp.)
template <int PK, typename T>
KDOPS_HOST_DEVICE T lse_thread_max(const T* row, T xi, const T* yh, const T* h, int64_t k, T inv_eps, T p,
                                   int64_t tid, int64_t threads) {
  T mx = neg_inf<T>();
  for (int64_t j = tid; j < k; j += threads) {
    const T v = lse_arg(h[j], cost<PK>(row[j], xi, yh[j], p), inv_eps);
    mx = v > mx ? v : mx;
  }
  return mx;
}

template <int PK, typename T>
KDOPS_HOST_DEVICE T lse_thread_sum(const T* row, T xi, const T* yh, const T* h, int64_t k, T inv_eps, T p, T mx,
                                   int64_t tid, int64_t threads) {
  T sum = 0;
  for (int64_t j = tid; j < k; j += threads) sum += exp_(lse_arg(h[j], cost<PK>(row[j], xi, yh[j], p), inv_eps) - mx);
  return sum;
}

// Whether the sum pass is needed: a row whose maximum is -inf (every weight 0) or NaN passes it on.
template <typename T>
KDOPS_HOST_DEVICE bool lse_needs_sum(T mx) {
  return mx > neg_inf<T>();
}

// The new potential -eps * LSE from the block-wide maximum and sum (sum unused where lse_needs_sum is false).
template <typename T>
KDOPS_HOST_DEVICE T lse_block_finish(T mx, T sum, T eps) {
  return lse_needs_sum(mx) ? -eps * (mx + log_(sum)) : -eps * mx;
}

}  // namespace ot
}  // namespace kdops
