// Math of the fused SP epilogue: per row of the Gram matrices, the L2-normalised rows (F.normalize, eps 1e-12)
// and the gradient of a normalisation. Shared by the CPU and CUDA kernels.
#pragma once

#include "kdops/common.h"

namespace kdops {
namespace sp {

// d/dx of y = x / max(|x|, eps) applied to dy: (dy - y (y.dy)) / |x| when |x| > eps, else dy / eps
template <typename T>
KDOPS_HOST_DEVICE T normalize_grad(T dy, T y, T y_dot_dy, T inv_n, bool clamped) {
  return clamped ? dy * inv_n : (dy - y * y_dot_dy) * inv_n;
}

}  // namespace sp
}  // namespace kdops
