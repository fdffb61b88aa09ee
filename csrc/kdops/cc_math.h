// Math of the fused CC epilogue: the correlation kernel of Peng et al.'s Taylor-expanded Gaussian,
// C(g) = e^(-2 gamma) sum_{p=0..P} (2 gamma g)^p / p!, on each Gram entry, and its derivative. Shared by the
// CPU and CUDA kernels.
#pragma once

#include "kdops/common.h"

namespace kdops {
namespace cc {

// The series sum_{p<=order} (2 gamma g)^p / p! and its derivative with respect to 2 gamma g, term by term
// (term_p = term_{p-1} * 2 gamma g / p); C(g) is e^(-2 gamma) times the series and dC/dg is e^(-2 gamma) 2 gamma
// times the derivative. The factors are applied by the caller after differencing the two sides, so equal
// inputs give exactly 0. kOrder >= 0 fixes the order at compile time (an unrolled loop that vectorises); -1
// reads `order`.
template <typename T, int kOrder = -1>
KDOPS_HOST_DEVICE T series(T g, T two_gamma, int order, T& deriv) {
  if (kOrder >= 0) order = kOrder;
  const T x = two_gamma * g;
  T term = T(1), sum = T(1), dsum = T(0);
  for (int p = 1; p <= order; ++p) {
    dsum += term;  // d(x^p / p!)/dx = x^(p-1) / (p-1)!
    term = term * x / T(p);
    sum += term;
  }
  deriv = dsum;
  return sum;
}

}  // namespace cc
}  // namespace kdops
