// Host side of the MMD op, shared by the CPU and CUDA entry points: checks, the GEMMs (ATen), and the order
// of the fused per-device passes. `Dev` supplies the two fused kernels over one Gram block G (rows x cols):
//   Dev::block_sum(G, a, b, symmetric, mode, params, sigma) -> 0-dim sum over the block of
//       sqrt(d2) (mode kSumDistance) or k (mode kSumKernel), in G's dtype;
//   Dev::block_weights(G, a, b, symmetric, params, sigma, grad, coef): G <- coef * grad * beta, in place.
// a, b are the squared row norms; sigma and grad are 0-dim tensors read by the kernels (no host sync on CUDA).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <string>
#include <tuple>

#include "kdops/distribution_math.h"

namespace kdops {
namespace distribution {

enum SumMode : int { kSumDistance = 0, kSumKernel = 1 };

inline int kernel_kind(const std::string& kernel) {
  if (kernel == "linear") return kLinear;
  if (kernel == "rbf") return kRbf;
  if (kernel == "poly") return kPoly;
  TORCH_CHECK(false, "kdops.mmd: kernel must be 'linear', 'rbf' or 'poly', got '", kernel, "'");
}

struct MmdCall {
  at::Tensor x, y;  // contiguous, in the accumulation dtype
  at::ScalarType in_type;
  KernelParams<double> params;
  int64_t n, m;
};

inline MmdCall prepare_mmd(const at::Tensor& x, const at::Tensor& y, const std::string& kernel, double gamma,
                           double coef0, int64_t degree) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, "kdops.mmd: x and y must be point clouds (n, d) and (m, d), got ",
              x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.size(1) == y.size(1), "kdops.mmd: x and y must have the same feature dim d, got ", x.size(1), " and ",
              y.size(1));
  TORCH_CHECK(x.size(0) > 0 && y.size(0) > 0, "kdops.mmd: x and y must hold at least one point each, got ",
              x.sizes(), " and ", y.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && x.scalar_type() == y.scalar_type(),
              "kdops.mmd: x and y must be floating tensors of one dtype, got ", x.scalar_type(), " and ",
              y.scalar_type());
  TORCH_CHECK(x.device() == y.device(), "kdops.mmd: x and y must be on one device, got ", x.device(), " and ",
              y.device());
  MmdCall c;
  c.params = {kernel_kind(kernel), gamma, coef0, int(degree)};
  TORCH_CHECK(c.params.kind != kPoly || degree >= 1, "kdops.mmd: degree must be an integer >= 1, got ", degree);
  c.in_type = x.scalar_type();
  // The Gram entries feed |x|^2 + |y|^2 - 2 <x, y>, which a 16-bit GEMM output would cancel away: the
  // (n, d) clouds are small next to the Gram blocks, so they are upcast once.
  const at::ScalarType acc = at::toOpMathType(c.in_type);
  c.x = x.to(acc).contiguous();
  c.y = y.to(acc).contiguous();
  c.n = x.size(0);
  c.m = y.size(0);
  return c;
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor> mmd_forward(const at::Tensor& x_in, const at::Tensor& y_in,
                                               const std::string& kernel, double gamma, double coef0, int64_t degree,
                                               double bandwidth) {
  const MmdCall c = prepare_mmd(x_in, y_in, kernel, gamma, coef0, degree);
  const at::Tensor &x = c.x, &y = c.y;
  if (c.params.kind == kLinear) {
    // The linear-kernel MMD is |mean x - mean y|^2 exactly: O((n + m) d), and without the cancellation of
    // summing Gram blocks.
    const at::Tensor diff = x.mean(0) - y.mean(0);
    return {diff.dot(diff), at::zeros({}, x.options())};
  }
  const at::Tensor a = (x * x).sum(1), b = (y * y).sum(1);
  const double n = double(c.n), m = double(c.m);
  at::Tensor sigma;
  if (c.params.kind != kRbf) {
    sigma = at::zeros({}, x.options());
  } else if (bandwidth > 0) {
    sigma = at::full({}, bandwidth, x.options());
  }
  if (sigma.defined()) {
    // One Gram block alive at a time: each is reduced and freed before the next GEMM.
    const auto block = [&](const at::Tensor& p, const at::Tensor& q, const at::Tensor& np, const at::Tensor& nq,
                           bool sym) {
      return Dev::block_sum(at::mm(p, q.t()), np, nq, sym, kSumKernel, c.params, sigma);
    };
    at::Tensor loss = block(x, x, a, a, true) / (n * n);
    loss = loss + block(y, y, b, b, true) / (m * m);
    return {loss - block(x, y, a, b, false) * (2.0 / (n * m)), sigma};
  }
  // The automatic bandwidth needs every distance before any kernel value: the three blocks are kept.
  const at::Tensor gxx = at::mm(x, x.t()), gyy = at::mm(y, y.t()), gxy = at::mm(x, y.t());
  const double N = n + m;
  const at::Tensor s = Dev::block_sum(gxx, a, a, true, kSumDistance, c.params, sigma) +
                       Dev::block_sum(gyy, b, b, true, kSumDistance, c.params, sigma) +
                       2.0 * Dev::block_sum(gxy, a, b, false, kSumDistance, c.params, sigma);
  sigma = s / (N * N - N);
  const at::Tensor loss = Dev::block_sum(gxx, a, a, true, kSumKernel, c.params, sigma) / (n * n) +
                          Dev::block_sum(gyy, b, b, true, kSumKernel, c.params, sigma) / (m * m) -
                          Dev::block_sum(gxy, a, b, false, kSumKernel, c.params, sigma) * (2.0 / (n * m));
  return {loss, sigma};
}

// grad_x = (r_xx + r_xy) * x + W_xx x + W_xy y and grad_y = (r_yy + c_xy) * y + W_yy y + W_xy^T x, with W the
// per-block weight matrices coef * grad * beta (written over the recomputed Gram blocks) and r / c their
// negated row / column sums for rbf (alpha = -beta), 0 for the dot-product kernels.
template <class Dev>
std::tuple<at::Tensor, at::Tensor> mmd_backward(const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& y_in,
                                                const at::Tensor& sigma_in, const std::string& kernel, double gamma,
                                                double coef0, int64_t degree, bool x_grad, bool y_grad) {
  const MmdCall c = prepare_mmd(x_in, y_in, kernel, gamma, coef0, degree);
  const at::Tensor &x = c.x, &y = c.y;
  TORCH_CHECK(grad.numel() == 1 && sigma_in.numel() == 1, "kdops.mmd_backward: grad and sigma must be scalars");
  const at::Tensor g = grad.to(x.scalar_type()).reshape({}).contiguous();
  const at::Tensor sigma = sigma_in.to(x.scalar_type()).reshape({}).contiguous();
  const double n = double(c.n), m = double(c.m);
  at::Tensor gx, gy;
  if (c.params.kind == kLinear) {
    const at::Tensor diff = (x.mean(0) - y.mean(0)).unsqueeze(0) * (g * 2.0);
    if (x_grad) gx = (diff / n).expand({c.n, x.size(1)}).to(c.in_type);
    if (y_grad) gy = (diff / -m).expand({c.m, y.size(1)}).to(c.in_type);
  } else {
    const bool rbf = c.params.kind == kRbf;
    const at::Tensor a = (x * x).sum(1), b = (y * y).sum(1);
    at::Tensor wxy = at::mm(x, y.t());
    Dev::block_weights(wxy, a, b, false, c.params, sigma, g, -2.0 / (n * m));
    if (x_grad) {
      at::Tensor wxx = at::mm(x, x.t());
      Dev::block_weights(wxx, a, a, true, c.params, sigma, g, 2.0 / (n * n));
      gx = at::mm(wxx, x).addmm_(wxy, y);
      if (rbf) gx.sub_((wxx.sum(1) + wxy.sum(1)).unsqueeze(1) * x);
      gx = gx.to(c.in_type);
    }
    if (y_grad) {
      at::Tensor wyy = at::mm(y, y.t());
      Dev::block_weights(wyy, b, b, true, c.params, sigma, g, 2.0 / (m * m));
      gy = at::mm(wyy, y).addmm_(wxy.t(), x);
      if (rbf) gy.sub_((wyy.sum(1) + wxy.sum(0)).unsqueeze(1) * y);
      gy = gy.to(c.in_type);
    }
  }
  if (!x_grad) gx = at::zeros({0}, x_in.options());
  if (!y_grad) gy = at::zeros({0}, y_in.options());
  return {gx.contiguous(), gy.contiguous()};
}

}  // namespace distribution
}  // namespace kdops
