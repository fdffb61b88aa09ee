// Helpers shared by every kdops kernel, host and device. Nothing here may depend on ATen so that the
// same code compiles in .cpp and .cu translation units.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define KDOPS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KDOPS_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace kdops {

template <typename T>
KDOPS_HOST_DEVICE T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
KDOPS_HOST_DEVICE T max_of(T a, T b) {
  return a > b ? a : b;
}

// sqrt(max(x, 0)): a row norm from a Gram diagonal that rounding may have left slightly negative.
template <typename T>
KDOPS_HOST_DEVICE T sqrt_pos_(T x) {
  return ::sqrt(x > T(0) ? x : T(0));
}

// 1 / max(sqrt(sq), 1e-12) from a squared norm: F.normalize's scale, shared by the kernels that normalise rows
// of a Gram matrix (SP) or take row norms from its diagonal (cosine kernel, FKD).
template <typename T>
KDOPS_HOST_DEVICE T inv_norm_clamped_(T sq) {
  const T n = sqrt_pos_(sq);
  return T(1) / (n > T(1e-12) ? n : T(1e-12));
}

// exp for float. On the device this is the CUDA library expf. On the host it is a branch-free Cody-Waite
// reduction with the degree-5 minimax polynomial of Cephes' expf (max relative error 8e-8 on [-87, 88])
// that the compiler can vectorise inside `omp simd` loops, which libm's expf prevents. Arguments below
// -87.3 give exactly 0 (also -inf), which the divergence code relies on to drop zero-probability terms;
// NaN gives NaN.
KDOPS_HOST_DEVICE float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  float xc = x < -87.3f ? -87.3f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  // round(xc / ln2) by the 1.5 * 2^23 trick: exact for |v| < 2^22, vectorisable, no libm call.
  const float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = e_r * scale;
  // The clamps above may be compiled to min/max instructions that drop NaN, so NaN is passed on here.
  return x < -87.3f ? 0.0f : (x > 88.0f ? std::numeric_limits<float>::infinity() : (x == x ? y : x));
#endif
}

KDOPS_HOST_DEVICE double exp_(double x) {
  return ::exp(x);
}

KDOPS_HOST_DEVICE float log_(float x) {
  return ::logf(x);
}

KDOPS_HOST_DEVICE double log_(double x) {
  return ::log(x);
}

// e ln 2 + log(1 + f) for f in [sqrt(1/2) - 1, sqrt(2) - 1]: Cephes' logf polynomial (~1e-7 relative),
// branch-free; the host side of log1p_unit_ and log_pos_.
inline __attribute__((always_inline)) float log_reduced_(float f, float e) {
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z - 0.5f * z + e * -2.12194440e-4f;
  return f + y + e * 0.693359375f;
}

// log(1 + u) for u in [0, 1]. On the host a branch-free Cephes-style polynomial (vectorisable, ~1e-7
// relative error); on the device the CUDA library log1pf. The range is all that logaddexp_ needs.
KDOPS_HOST_DEVICE float log1p_unit_(float u) {
#if defined(__CUDA_ARCH__)
  return log1pf(u);
#else
  // 1 + u = 2^e (1 + f) with f in [sqrt(1/2) - 1, sqrt(2) - 1], formed without rounding 1 + u.
  const bool hi = u > 0.41421356f;
  return log_reduced_(hi ? (u - 1.0f) * 0.5f : u, hi ? 1.0f : 0.0f);
#endif
}

KDOPS_HOST_DEVICE double log1p_unit_(double u) {
  return ::log1p(u);
}

// log x for float. On the device the CUDA library logf. On the host x = 2^e m with m in [sqrt(1/2), sqrt(2)),
// log x = e ln 2 + log m with Cephes' logf polynomial (~1e-7 relative), branch-free so that it vectorises;
// subnormals are scaled up first; 0 gives -inf, inf gives inf, negative numbers and NaN give NaN.
KDOPS_HOST_DEVICE float log_pos_(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  const bool sub = x < 1.17549435e-38f;
  const float xs = sub ? x * 8388608.0f : x;  // 2^23
  uint32_t bits;
  std::memcpy(&bits, &xs, sizeof(bits));
  float e = float(int32_t(bits >> 23) - 127) - (sub ? 23.0f : 0.0f);
  const uint32_t mbits = (bits & 0x007fffffu) | 0x3f800000u;
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const bool hi = m > 1.41421356f;
  m = hi ? m * 0.5f : m;
  e = hi ? e + 1.0f : e;
  const float r = log_reduced_(m - 1.0f, e);
  const float inf = std::numeric_limits<float>::infinity();
  return x > 0.0f ? (x < inf ? r : inf) : (x == 0.0f ? -inf : std::numeric_limits<float>::quiet_NaN());
#endif
}

KDOPS_HOST_DEVICE double log_pos_(double x) {
  return ::log(x);
}

// log(exp(a) + exp(b)) without overflow; either argument may be -inf. Branch-free so that it vectorises.
template <typename T>
KDOPS_HOST_DEVICE T logaddexp_(T a, T b) {
  const T m = max_of(a, b);
  const T lo = a > b ? b : a;
  const T r = m + log1p_unit_(exp_(lo - m));
  return m == neg_inf<T>() ? m : r;
}

}  // namespace kdops
