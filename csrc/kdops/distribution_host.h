// Host side of the MMD op, shared by the CPU and CUDA entry points: checks, the GEMMs (ATen), and the order
// of the fused per-device passes. `Dev` supplies the two fused kernels over one Gram block G (rows x cols):
//   Dev::block_sum(G, a, b, symmetric, mode, params, sigma) -> 0-dim sum over the block of
//       sqrt(d2) (mode kSumDistance) or k (mode kSumKernel), in G's dtype;
//   Dev::block_weights(G, a, b, symmetric, params, sigma, grad, coef): G <- coef * grad * beta, in place;
//   Dev::block_sum_weights(G, a, b, symmetric, params, sigma, coef) -> the kernel sum, and G <- coef * beta in
//       place: the forward that keeps the backward's weight matrices instead of leaving them to be recomputed.
// a, b are the squared row norms; sigma and grad are 0-dim tensors read by the kernels (no host sync on CUDA).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
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

// For rbf, a self pair's weight W_ii meets x_i - x_i in the backward, as W_ii x_i - W_ii x_i in W x - rowsum(W) x:
// exactly 0, but W_ii is the block's largest weight, and the rounding of that cancellation was the gradient's
// error for far-apart clouds (1e-5 against a gradient of 6e-6 in fp32). The diagonal of a symmetric block's W
// is zeroed before the backward uses it.
inline void drop_self_pairs(at::Tensor& W, bool sym, const KernelParams<double>& params) {
  if (sym && params.kind == kRbf) W.diagonal().zero_();
}

// What the forward keeps for the backward (save_weights, a bit set): the weight matrices for x's gradient
// (W_xx and W_xy) and / or for y's (W_yy and W_xy). They are one buffer [W_xy | W_xx | W_yy], row-major
// blocks of coef * beta without the incoming gradient, holding only the blocks asked for.
enum SaveWeights : int64_t { kSaveNone = 0, kSaveForX = 1, kSaveForY = 2 };

inline int64_t weight_numel(int64_t n, int64_t m, int64_t save) {
  if (save == kSaveNone) return 0;
  return n * m + ((save & kSaveForX) ? n * n : 0) + ((save & kSaveForY) ? m * m : 0);
}

// The blocks (W_xx, W_yy, W_xy) of the buffer; undefined where not kept.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_blocks(const at::Tensor& w, int64_t n, int64_t m,
                                                                    int64_t save) {
  at::Tensor wxx, wyy, wxy;
  if (save == kSaveNone) return {wxx, wyy, wxy};
  int64_t at = 0;
  wxy = w.narrow(0, at, n * m).view({n, m});
  at += n * m;
  if (save & kSaveForX) {
    wxx = w.narrow(0, at, n * n).view({n, n});
    at += n * n;
  }
  if (save & kSaveForY) wyy = w.narrow(0, at, m * m).view({m, m});
  return {wxx, wyy, wxy};
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mmd_forward(const at::Tensor& x_in, const at::Tensor& y_in,
                                                           const std::string& kernel, double gamma, double coef0,
                                                           int64_t degree, double bandwidth, int64_t save_weights) {
  const MmdCall c = prepare_mmd(x_in, y_in, kernel, gamma, coef0, degree);
  TORCH_CHECK(save_weights >= kSaveNone && save_weights <= (kSaveForX | kSaveForY),
              "kdops.mmd: save_weights must be 0 (none), 1 (for x), 2 (for y) or 3 (both), got ", save_weights);
  const at::Tensor &x = c.x, &y = c.y;
  if (c.params.kind == kLinear) {
    // The linear-kernel MMD is |mean x - mean y|^2 exactly: O((n + m) d), and without the cancellation of
    // summing Gram blocks. Its gradient needs no weights.
    const at::Tensor diff = x.mean(0) - y.mean(0);
    return {diff.dot(diff), at::zeros({}, x.options()), at::empty({0}, x.options())};
  }
  const at::Tensor a = (x * x).sum(1), b = (y * y).sum(1);
  const double n = double(c.n), m = double(c.m);
  // Each block's weight in the loss. A point of x meets W_xx's row and column, so W_xx = 2 sxx beta; W_xy =
  // sxy beta.
  const double sxx = 1.0 / (n * n), syy = 1.0 / (m * m), sxy = -2.0 / (n * m);
  const at::Tensor w = at::empty({weight_numel(c.n, c.m, save_weights)}, x.options());
  at::Tensor wxx, wyy, wxy;
  std::tie(wxx, wyy, wxy) = weight_blocks(w, c.n, c.m, save_weights);
  // p q^T, into its block of the saved weights when that block is kept.
  const auto gram = [&](const at::Tensor& p, const at::Tensor& q, at::Tensor& dest) {
    return dest.defined() ? at::mm_out(dest, p, q.t()) : at::mm(p, q.t());
  };
  // Kernel sum of one Gram block times its weight; a kept block becomes its W in the same pass.
  const auto reduce = [&](at::Tensor G, const at::Tensor& np, const at::Tensor& nq, bool sym, double scale,
                          const at::Tensor& sigma, bool keep) {
    if (!keep) return Dev::block_sum(G, np, nq, sym, kSumKernel, c.params, sigma) * scale;
    at::Tensor total = Dev::block_sum_weights(G, np, nq, sym, c.params, sigma, sym ? 2.0 * scale : scale) * scale;
    drop_self_pairs(G, sym, c.params);
    return total;
  };
  const bool kxx = wxx.defined(), kyy = wyy.defined(), kxy = wxy.defined();
  at::Tensor sigma;
  if (c.params.kind != kRbf) {
    sigma = at::zeros({}, x.options());
  } else if (bandwidth > 0) {
    sigma = at::full({}, bandwidth, x.options());
  }
  if (sigma.defined()) {
    // Of the blocks not kept, one is alive at a time: each is reduced and freed before the next GEMM.
    at::Tensor loss = reduce(gram(x, x, wxx), a, a, true, sxx, sigma, kxx);
    loss = loss + reduce(gram(y, y, wyy), b, b, true, syy, sigma, kyy);
    return {loss + reduce(gram(x, y, wxy), a, b, false, sxy, sigma, kxy), sigma, w};
  }
  // The automatic bandwidth needs every distance before any kernel value: the three blocks are kept.
  const at::Tensor gxx = gram(x, x, wxx), gyy = gram(y, y, wyy), gxy = gram(x, y, wxy);
  const double N = n + m;
  const at::Tensor s = Dev::block_sum(gxx, a, a, true, kSumDistance, c.params, sigma) +
                       Dev::block_sum(gyy, b, b, true, kSumDistance, c.params, sigma) +
                       2.0 * Dev::block_sum(gxy, a, b, false, kSumDistance, c.params, sigma);
  sigma = s / (N * N - N);
  const at::Tensor loss = reduce(gxx, a, a, true, sxx, sigma, kxx) + reduce(gyy, b, b, true, syy, sigma, kyy) +
                          reduce(gxy, a, b, false, sxy, sigma, kxy);
  return {loss, sigma, w};
}

// grad_x = (r_xx + r_xy) * x + W_xx x + W_xy y and grad_y = (r_yy + c_xy) * y + W_yy y + W_xy^T x, with W the
// per-block weight matrices coef * grad * beta and r / c their negated row / column sums for rbf
// (alpha = -beta), 0 for the dot-product kernels. W comes from the forward's saved weights (times grad, applied
// to the products) or, for the blocks not saved (all of them with saved_weights 0), from Gram blocks
// recomputed here.
template <class Dev>
std::tuple<at::Tensor, at::Tensor> mmd_backward(const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& y_in,
                                                const at::Tensor& sigma_in, const at::Tensor& weights,
                                                int64_t saved_weights, const std::string& kernel, double gamma,
                                                double coef0, int64_t degree, bool x_grad, bool y_grad) {
  const MmdCall c = prepare_mmd(x_in, y_in, kernel, gamma, coef0, degree);
  const at::Tensor &x = c.x, &y = c.y;
  TORCH_CHECK(grad.numel() == 1 && sigma_in.numel() == 1, "kdops.mmd_backward: grad and sigma must be scalars");
  TORCH_CHECK(grad.device() == x.device() && sigma_in.device() == x.device(),
              "kdops.mmd_backward: grad and sigma must be on x's device ", x.device(), ", got ", grad.device(),
              " and ", sigma_in.device());
  const int64_t save = c.params.kind == kLinear ? kSaveNone : saved_weights;
  TORCH_CHECK(save >= kSaveNone && save <= (kSaveForX | kSaveForY),
              "kdops.mmd_backward: saved_weights must be 0, 1, 2 or 3 (the forward's save_weights), got ", save);
  const bool saved = save != kSaveNone;
  TORCH_CHECK(weights.dim() == 1 && weights.numel() == weight_numel(c.n, c.m, save) &&
                  (!saved || (weights.scalar_type() == x.scalar_type() && weights.device() == x.device())),
              "kdops.mmd_backward: weights must be the forward's ", x.scalar_type(), " buffer of ",
              weight_numel(c.n, c.m, save), " elements for saved_weights = ", save, ", got ", weights.scalar_type(),
              " ", weights.sizes());
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
    // Saved weights carry no grad: it scales the products. A block that was not saved is recomputed, carrying
    // grad itself when nothing was saved, else a unit grad so that it matches the saved ones.
    // The squared norms and that grad are made only if a block is recomputed.
    at::Tensor a, b, block_grad;
    const auto recompute = [&](bool px, bool qx, bool sym, double coef) {
      if (!a.defined()) {
        a = (x * x).sum(1);
        b = (y * y).sum(1);
        block_grad = saved ? at::ones({}, x.options()) : g;
      }
      at::Tensor w = at::mm(px ? x : y, (qx ? x : y).t());
      Dev::block_weights(w, px ? a : b, qx ? a : b, sym, c.params, sigma, block_grad, coef);
      drop_self_pairs(w, sym, c.params);
      return w;
    };
    at::Tensor wxx, wyy, wxy;
    std::tie(wxx, wyy, wxy) = weight_blocks(weights.contiguous(), c.n, c.m, save);
    if (!wxy.defined()) wxy = recompute(true, false, false, -2.0 / (n * m));
    if (x_grad) {
      if (!wxx.defined()) wxx = recompute(true, true, true, 2.0 / (n * n));
      gx = at::mm(wxx, x).addmm_(wxy, y);
      if (rbf) gx.sub_((wxx.sum(1) + wxy.sum(1)).unsqueeze(1) * x);
      if (saved) gx.mul_(g);
      wxx.reset();  // a recomputed W_xx is freed before W_yy is made
      gx = gx.to(c.in_type);
    }
    if (y_grad) {
      if (!wyy.defined()) wyy = recompute(false, false, true, 2.0 / (m * m));
      gy = at::mm(wyy, y).addmm_(wxy.t(), x);
      if (rbf) gy.sub_((wyy.sum(1) + wxy.sum(0)).unsqueeze(1) * y);
      if (saved) gy.mul_(g);
      gy = gy.to(c.in_type);
    }
  }
  if (!x_grad) gx = at::zeros({0}, x_in.options());
  if (!y_grad) gy = at::zeros({0}, y_in.options());
  return {gx.contiguous(), gy.contiguous()};
}

}  // namespace distribution
}  // namespace kdops
