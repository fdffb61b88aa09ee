// CPU kernels of the MMD op: the passes over one Gram block that run after the ATen GEMM (the sum of the
// pairwise distances or of the kernel values, and the in-place backward weights, or both at once), one row per
// task.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <string_view>
#include <tuple>

#include "cpu/cpu_utils.h"
#include "kdops/distribution_host.h"
#include "kdops/distribution_math.h"

namespace kdops {
namespace cpu {
namespace {

using distribution::KernelParams;

int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
}

template <typename acc_t>
KernelParams<acc_t> cast_params(const KernelParams<double>& p) {
  return {p.kind, acc_t(p.gamma), acc_t(p.coef0), p.degree};
}

// diag is the column of row i's own point in a symmetric block, -1 otherwise.
template <typename acc_t, int Mode, typename K>
KDOPS_CPU_CLONES acc_t row_sum(K,const acc_t* g, acc_t a, const acc_t* b, int64_t cols, int64_t diag,
                               KernelParams<acc_t> p, acc_t inv2s2) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < cols; ++j) {
    const acc_t d2 = distribution::sq_dist(g[j], a, b[j], j == diag);
    sum += Mode == distribution::kSumDistance ? distribution::sqrt_(d2) : K::value(p, g[j], d2, inv2s2);
  }
  return sum;
}

template <typename acc_t, typename K>
KDOPS_CPU_CLONES void row_weights(K,acc_t* g, acc_t a, const acc_t* b, int64_t cols, int64_t diag,
                                  KernelParams<acc_t> p, acc_t inv2s2, acc_t coef) {
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) {
    const acc_t d2 = distribution::sq_dist(g[j], a, b[j], j == diag);
    g[j] = coef * K::beta(p, g[j], d2, inv2s2);
  }
}

template <typename acc_t, typename K>
KDOPS_CPU_CLONES acc_t row_sum_weights(K, acc_t* g, acc_t a, const acc_t* b, int64_t cols, int64_t diag,
                                       KernelParams<acc_t> p, acc_t inv2s2, acc_t coef) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < cols; ++j) {
    const acc_t d2 = distribution::sq_dist(g[j], a, b[j], j == diag);
    acc_t beta;
    sum += K::value_beta(p, g[j], d2, inv2s2, beta);
    g[j] = coef * beta;
  }
  return sum;
}

// Sum over rows of row_value(i) (an acc_t per-row sum), the rows added in double: one long fp32 sum over n^2
// terms would drift.
template <typename RowValue>
double sum_rows(int64_t rows, int64_t cols, const RowValue& row_value) {
  return at::parallel_reduce(
      int64_t(0), rows, row_grain(cols), 0.0,
      [&](int64_t r0, int64_t r1, double partial) {
        for (int64_t i = r0; i < r1; ++i) partial += double(row_value(i));
        return partial;
      },
      [](double u, double v) { return u + v; });
}

struct CpuBlocks {
  static at::Tensor block_sum(const at::Tensor& G, const at::Tensor& a, const at::Tensor& b, bool symmetric,
                              int mode, const KernelParams<double>& params, const at::Tensor& sigma) {
    const int64_t rows = G.size(0), cols = G.size(1);
    double total = 0.0;
    AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "mmd_block_sum_cpu", [&] {
      using acc_t = scalar_t;
      const KernelParams<acc_t> p = cast_params<acc_t>(params);
      const acc_t inv2s2 = (mode == distribution::kSumKernel && p.kind == distribution::kRbf)
                               ? distribution::rbf_inv_two_sigma2(sigma.item<acc_t>())
                               : acc_t(0);
      const acc_t* gp = G.const_data_ptr<acc_t>();
      const acc_t* ap = a.const_data_ptr<acc_t>();
      const acc_t* bp = b.const_data_ptr<acc_t>();
      distribution::dispatch_kernel(p, [&](auto kern) {
        total = sum_rows(rows, cols, [&](int64_t i) {
          const int64_t diag = symmetric ? i : -1;
          return mode == distribution::kSumDistance
                     ? row_sum<acc_t, distribution::kSumDistance>(kern, gp + i * cols, ap[i], bp, cols, diag, p, inv2s2)
                     : row_sum<acc_t, distribution::kSumKernel>(kern, gp + i * cols, ap[i], bp, cols, diag, p, inv2s2);
        });
      });
    });
    return at::full({}, total, G.options());
  }

  static at::Tensor block_sum_weights(at::Tensor& G, const at::Tensor& a, const at::Tensor& b, bool symmetric,
                                      const KernelParams<double>& params, const at::Tensor& sigma, double coef) {
    const int64_t rows = G.size(0), cols = G.size(1);
    double total = 0.0;
    AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "mmd_block_sum_weights_cpu", [&] {
      using acc_t = scalar_t;
      const KernelParams<acc_t> p = cast_params<acc_t>(params);
      const acc_t inv2s2 =
          p.kind == distribution::kRbf ? distribution::rbf_inv_two_sigma2(sigma.item<acc_t>()) : acc_t(0);
      acc_t* gp = G.mutable_data_ptr<acc_t>();
      const acc_t* ap = a.const_data_ptr<acc_t>();
      const acc_t* bp = b.const_data_ptr<acc_t>();
      distribution::dispatch_kernel(p, [&](auto kern) {
        total = sum_rows(rows, cols, [&](int64_t i) {
          return row_sum_weights<acc_t>(kern, gp + i * cols, ap[i], bp, cols, symmetric ? i : -1, p, inv2s2,
                                        acc_t(coef));
        });
      });
    });
    return at::full({}, total, G.options());
  }

  static void block_weights(at::Tensor& G, const at::Tensor& a, const at::Tensor& b, bool symmetric,
                            const KernelParams<double>& params, const at::Tensor& sigma, const at::Tensor& grad,
                            double coef) {
    const int64_t rows = G.size(0), cols = G.size(1);
    AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "mmd_block_weights_cpu", [&] {
      using acc_t = scalar_t;
      const KernelParams<acc_t> p = cast_params<acc_t>(params);
      const acc_t inv2s2 =
          p.kind == distribution::kRbf ? distribution::rbf_inv_two_sigma2(sigma.item<acc_t>()) : acc_t(0);
      const acc_t c = acc_t(coef * grad.item<double>());
      acc_t* gp = G.mutable_data_ptr<acc_t>();
      const acc_t* ap = a.const_data_ptr<acc_t>();
      const acc_t* bp = b.const_data_ptr<acc_t>();
      distribution::dispatch_kernel(p, [&](auto kern) {
        at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
          for (int64_t i = r0; i < r1; ++i) {
            row_weights<acc_t>(kern, gp + i * cols, ap[i], bp, cols, symmetric ? i : -1, p, inv2s2, c);
          }
        });
      });
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> mmd_cpu(const at::Tensor& x, const at::Tensor& y,
                                                       std::string_view kernel, double gamma, double coef0,
                                                       int64_t degree, double bandwidth, int64_t save_weights) {
  return distribution::mmd_forward<CpuBlocks>(x, y, std::string(kernel), gamma, coef0, degree, bandwidth,
                                              save_weights);
}

std::tuple<at::Tensor, at::Tensor> mmd_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                                    const at::Tensor& sigma, const at::Tensor& weights,
                                                    int64_t saved_weights, std::string_view kernel, double gamma,
                                                    double coef0, int64_t degree, bool x_grad, bool y_grad) {
  return distribution::mmd_backward<CpuBlocks>(grad, x, y, sigma, weights, saved_weights, std::string(kernel), gamma,
                                               coef0, degree, x_grad, y_grad);
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("mmd", &kdops::cpu::mmd_cpu);
  m.impl("mmd_backward", &kdops::cpu::mmd_backward_cpu);
}
