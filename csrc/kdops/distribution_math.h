// Per-pair math of the MMD kernels, written in terms of the Gram entry g = <x_i, y_j> and the squared norms
// a = |x_i|^2, b = |y_j|^2 so that the GEMM does the O(d) work and these functions run in its epilogue.
// Shared by the CPU and CUDA kernels.
#pragma once

#include "kdops/common.h"

namespace kdops {
namespace distribution {

enum KernelKind : int { kLinear = 0, kRbf = 1, kPoly = 2 };

template <typename acc_t>
struct KernelParams {
  int kind;
  acc_t gamma, coef0;  // poly
  int degree;          // poly, >= 1
};

KDOPS_HOST_DEVICE float sqrt_(float x) {
  return ::sqrtf(x);
}

KDOPS_HOST_DEVICE double sqrt_(double x) {
  return ::sqrt(x);
}

// |x_i - y_j|^2 from the Gram entry, clamped at 0 (cancellation can make it slightly negative); exactly 0 on
// the diagonal of a cloud against itself, where the expansion would leave rounding noise.
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t sq_dist(acc_t g, acc_t a, acc_t b, bool diagonal) {
  const acc_t d = a + b - acc_t(2) * g;
  return (diagonal || !(d > acc_t(0))) ? acc_t(0) : d;
}

// 1 / (2 sigma^2); 0 for sigma = 0 (every point equal: every distance is 0 and the kernel is 1, not NaN).
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t rbf_inv_two_sigma2(acc_t sigma) {
  return sigma > acc_t(0) ? acc_t(1) / (acc_t(2) * sigma * sigma) : acc_t(0);
}

// x^p for 0 <= p < 2^Bits by binary exponentiation over a fixed number of bits: no data-dependent trip count,
// so the loops that call it still vectorise. Bits = 3 covers the usual degrees (<= 7), 31 any int.
template <int Bits, typename acc_t>
KDOPS_HOST_DEVICE acc_t int_pow(acc_t x, int p) {
  acc_t r = acc_t(1);
  for (int k = 0; k < Bits; ++k) {
    r = ((p >> k) & 1) ? r * x : r;
    x *= x;
  }
  return r;
}

// The kernel kind and the poly degree (Degree >= 1; 0: read p.degree, with an exponent of Bits bits) are
// template parameters so that the per-pair loops compile to one branch-free body each. A run-time degree
// leaves GCC to unswitch the loop on its bits, and some of those copies stay scalar.
template <int Kind, int Bits = 3, int Degree = 0>
struct Kernel {
  template <typename acc_t>
  static KDOPS_HOST_DEVICE acc_t pow_(acc_t x, int p) {
    if (Degree > 0) return int_pow<3>(x, p);  // folded: p is Degree or Degree - 1, both known here
    return int_pow<Bits>(x, p);
  }
  static KDOPS_HOST_DEVICE int degree(int p) {
    return Degree > 0 ? Degree : p;
  }

  // k(x_i, y_j).
  template <typename acc_t>
  static KDOPS_HOST_DEVICE acc_t value(const KernelParams<acc_t>& p, acc_t g, acc_t d2, acc_t inv2s2) {
    if (Kind == kRbf) return exp_(-d2 * inv2s2);
    if (Kind == kPoly) return pow_(p.gamma * g + p.coef0, degree(p.degree));
    return g;
  }

  // dk(x_i, y_j)/dx_i = alpha * x_i + beta * y_j (and symmetrically for y_j). Returns beta; alpha is -beta
  // for rbf and 0 for the dot-product kernels, so the backward needs one matrix and its row / column sums.
  template <typename acc_t>
  static KDOPS_HOST_DEVICE acc_t beta(const KernelParams<acc_t>& p, acc_t g, acc_t d2, acc_t inv2s2) {
    if (Kind == kRbf) return acc_t(2) * inv2s2 * exp_(-d2 * inv2s2);
    if (Kind == kPoly) return acc_t(degree(p.degree)) * p.gamma * pow_(p.gamma * g + p.coef0, degree(p.degree) - 1);
    return acc_t(1);
  }

  // value() and beta() together, for the forward pass that also keeps the backward's weights; the results
  // are bit for bit those of the two calls (rbf shares its exponential).
  template <typename acc_t>
  static KDOPS_HOST_DEVICE acc_t value_beta(const KernelParams<acc_t>& p, acc_t g, acc_t d2, acc_t inv2s2,
                                            acc_t& beta_out) {
    if (Kind == kRbf) {
      const acc_t e = exp_(-d2 * inv2s2);
      beta_out = acc_t(2) * inv2s2 * e;
      return e;
    }
    beta_out = beta(p, g, d2, inv2s2);
    return value(p, g, d2, inv2s2);
  }
};

// Calls fn(Kernel<...>{}) for the kernel kind and degree of p: degrees 1-4 as constants, up to 7 with a 3-bit
// exponent, beyond with a 31-bit one.
template <typename acc_t, typename F>
void dispatch_kernel(const KernelParams<acc_t>& p, F&& fn) {
  if (p.kind == kRbf) {
    fn(Kernel<kRbf>{});
  } else if (p.kind == kPoly && p.degree == 1) {
    fn(Kernel<kPoly, 3, 1>{});
  } else if (p.kind == kPoly && p.degree == 2) {
    fn(Kernel<kPoly, 3, 2>{});
  } else if (p.kind == kPoly && p.degree == 3) {
    fn(Kernel<kPoly, 3, 3>{});
  } else if (p.kind == kPoly && p.degree == 4) {
    fn(Kernel<kPoly, 3, 4>{});
  } else if (p.kind == kPoly && p.degree < 8) {
    fn(Kernel<kPoly, 3>{});
  } else if (p.kind == kPoly) {
    fn(Kernel<kPoly, 31>{});
  } else {
    fn(Kernel<kLinear>{});
  }
}

}  // namespace distribution
}  // namespace kdops
