// Math of the fused CC epilogue: the correlation kernel of Peng et al.'s Taylor-expanded Gaussian,
// C(g) = e^(-2 gamma) sum_{p=0..P} (2 gamma g)^p / p!, on each Gram entry, and its derivative. Shared by the
// CPU and CUDA kernels.
#pragma once

#include "kdops/common.h"

namespace kdops {
namespace cc {

// C(g) and dC/dg, the series summed term by term (term_p = term_{p-1} * 2 gamma g / p).
template <typename T>
KDOPS_HOST_DEVICE T kernel(T g, T two_gamma, int order, T scale, T& deriv) {
  const T x = two_gamma * g;
  T term = T(1), sum = T(1), dsum = T(0);
  for (int p = 1; p <= order; ++p) {
    dsum += term;  // d(x^p / p!)/dx = x^(p-1) / (p-1)!
    term = term * x / T(p);
    sum += term;
  }
  deriv = scale * two_gamma * dsum;
  return scale * sum;
}

}  // namespace cc
}  // namespace kdops
