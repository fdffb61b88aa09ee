// Math of the feature-map losses: the Overhaul's margin ReLU and partial L2, and the LogSum of the
// projector recipe. Shared by the CPU and CUDA kernels.
#pragma once

#include "kdops/common.h"

namespace kdops {
namespace feature {

// Teacher transform of the Overhaul: max(t, m), NaN passed on (m > NaN is false). Written so that it maps
// onto one max instruction.
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t margin_relu(acc_t t, acc_t m) {
  return m > t ? m : t;
}

// d max(t, m) / dt as torch.maximum (the released code's torch.max) defines it: 1 above the margin, 1/2 at a
// tie, 0 below (and for NaN).
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t margin_relu_slope(acc_t t, acc_t m) {
  return t > m ? acc_t(1) : (t == m ? acc_t(0.5) : acc_t(0));
}

// The gradient through max(t, m): g times the slope, exactly 0 (even for a non-finite g) below the margin.
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t margin_relu_grad(acc_t g, acc_t t, acc_t m) {
  const acc_t slope = margin_relu_slope(t, m);
  return slope > acc_t(0) ? g * slope : acc_t(0);
}

// Partial-L2 mask: false only where s <= t^ <= 0; NaN keeps the position, so NaN reaches the sum.
template <typename acc_t>
KDOPS_HOST_DEVICE bool partial_l2_keep(acc_t s, acc_t th) {
  return !(s <= th && th <= acc_t(0));
}

// Partial L2 term: (s - t^)^2 where s > t^ or t^ > 0; positions with s <= t^ <= 0 are skipped.
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t partial_l2_term(acc_t s, acc_t t, acc_t m) {
  const acc_t th = margin_relu(t, m);
  const acc_t d = s - th;
  return partial_l2_keep(s, th) ? d * d : acc_t(0);
}

// The term and, in the same evaluation, the gradients of g * term w.r.t. s and t (t^ = max(t, m) passes
// the gradient where t > m, half of it at a tie t == m: margin_relu_slope).
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t partial_l2_term_grad(acc_t s, acc_t t, acc_t m, acc_t g, acc_t& gs, acc_t& gt) {
  const acc_t th = margin_relu(t, m);
  const acc_t d = s - th;
  const bool keep = partial_l2_keep(s, th);
  gs = keep ? acc_t(2) * d * g : acc_t(0);
  const acc_t slope = margin_relu_slope(t, m);
  gt = (keep && slope > acc_t(0)) ? -gs * slope : acc_t(0);
  return keep ? d * d : acc_t(0);
}

template <typename acc_t>
KDOPS_HOST_DEVICE void partial_l2_grad(acc_t s, acc_t t, acc_t m, acc_t g, acc_t& gs, acc_t& gt) {
  (void)partial_l2_term_grad(s, t, m, g, gs, gt);
}

// |x|^alpha, exact for the integer powers the recipe uses, pow otherwise (alpha > 0).
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t abs_pow(acc_t x, acc_t alpha, int int_alpha) {
  const acc_t a = x < acc_t(0) ? -x : x;
  if (int_alpha == 4) {
    const acc_t a2 = a * a;
    return a2 * a2;
  }
  if (int_alpha == 2) return a * a;
  if (int_alpha == 1) return a;
  if (int_alpha == 3) return a * a * a;
  return ::pow(a, alpha);
}

// d|x|^alpha / dx = alpha |x|^(alpha - 1) sign(x); 0 at x = 0 (a subgradient, also for alpha < 1).
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t abs_pow_grad(acc_t x, acc_t alpha, int int_alpha) {
  if (x == acc_t(0)) return acc_t(0);
  const acc_t sign = x < acc_t(0) ? acc_t(-1) : acc_t(1);
  if (int_alpha == 4) return acc_t(4) * x * x * x;
  if (int_alpha == 2) return acc_t(2) * x;
  if (int_alpha == 1) return sign;
  if (int_alpha == 3) return acc_t(3) * x * x * sign;
  const acc_t a = x * sign;
  return alpha * ::pow(a, alpha - acc_t(1)) * sign;
}

// alpha as an int when it is one of the exact cases above, else 0.
inline int integer_power(double alpha) {
  for (int k = 1; k <= 4; ++k) {
    if (alpha == double(k)) return k;
  }
  return 0;
}

}  // namespace feature
}  // namespace kdops
