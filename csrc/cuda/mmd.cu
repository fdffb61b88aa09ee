// CUDA kernels of the MMD op: the passes over one Gram block that run after the ATen GEMM. One block per
// row: the row's squared norm is read once, the columns are strided over the threads and reduced with CUB
// into a per-row partial that ATen sums. sigma and grad are read from device memory (no host sync).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <string_view>
#include <tuple>

#include "kdops/distribution_host.h"
#include "kdops/distribution_math.h"

namespace kdops {
namespace cuda {
namespace {

using distribution::KernelParams;

constexpr int kThreads = 256;

template <typename acc_t>
KernelParams<acc_t> cast_params(const KernelParams<double>& p) {
  return {p.kind, acc_t(p.gamma), acc_t(p.coef0), p.degree};
}

template <typename acc_t, int Mode, typename K>
__global__ void __launch_bounds__(kThreads)
    mmd_row_sum_kernel(K, const acc_t* __restrict__ g, const acc_t* __restrict__ a, const acc_t* __restrict__ b,
                       int64_t cols, bool symmetric, KernelParams<acc_t> p, const acc_t* __restrict__ sigma,
                       acc_t* __restrict__ partials) {
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t i = blockIdx.x;
  const acc_t ai = a[i];
  const acc_t inv2s2 = (Mode == distribution::kSumKernel && p.kind == distribution::kRbf)
                           ? distribution::rbf_inv_two_sigma2(sigma[0])
                           : acc_t(0);
  const acc_t* row = g + i * cols;
  const int64_t diag = symmetric ? i : -1;
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const acc_t d2 = distribution::sq_dist(row[j], ai, b[j], j == diag);
    sum += Mode == distribution::kSumDistance ? distribution::sqrt_(d2)
                                              : K::value(p, row[j], d2, inv2s2);
  }
  sum = Reduce(tmp).Sum(sum);
  if (threadIdx.x == 0) partials[i] = sum;
}

template <typename acc_t, typename K>
__global__ void __launch_bounds__(kThreads)
    mmd_row_weights_kernel(K, acc_t* __restrict__ g, const acc_t* __restrict__ a, const acc_t* __restrict__ b,
                           int64_t cols, bool symmetric, KernelParams<acc_t> p, const acc_t* __restrict__ sigma,
                           const acc_t* __restrict__ grad, acc_t coef) {
  const int64_t i = blockIdx.x;
  const acc_t ai = a[i];
  const acc_t inv2s2 = p.kind == distribution::kRbf ? distribution::rbf_inv_two_sigma2(sigma[0]) : acc_t(0);
  const acc_t c = coef * grad[0];
  acc_t* row = g + i * cols;
  const int64_t diag = symmetric ? i : -1;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const acc_t d2 = distribution::sq_dist(row[j], ai, b[j], j == diag);
    row[j] = c * K::beta(p, row[j], d2, inv2s2);
  }
}

// The kernel sum of mmd_row_sum_kernel and the weights of mmd_row_weights_kernel (without the incoming
// gradient) in one pass: the forward that keeps the backward's weight matrices.
template <typename acc_t, typename K>
__global__ void __launch_bounds__(kThreads)
    mmd_row_sum_weights_kernel(K, acc_t* __restrict__ g, const acc_t* __restrict__ a, const acc_t* __restrict__ b,
                               int64_t cols, bool symmetric, KernelParams<acc_t> p, const acc_t* __restrict__ sigma,
                               acc_t coef, acc_t* __restrict__ partials) {
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t i = blockIdx.x;
  const acc_t ai = a[i];
  const acc_t inv2s2 = p.kind == distribution::kRbf ? distribution::rbf_inv_two_sigma2(sigma[0]) : acc_t(0);
  acc_t* row = g + i * cols;
  const int64_t diag = symmetric ? i : -1;
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const acc_t d2 = distribution::sq_dist(row[j], ai, b[j], j == diag);
    acc_t beta;
    sum += K::value_beta(p, row[j], d2, inv2s2, beta);
    row[j] = coef * beta;
  }
  sum = Reduce(tmp).Sum(sum);
  if (threadIdx.x == 0) partials[i] = sum;
}

void check_rows(int64_t rows) {
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "kdops.mmd: too many points: ", rows);
}

struct CudaBlocks {
  static at::Tensor block_sum(const at::Tensor& G, const at::Tensor& a, const at::Tensor& b, bool symmetric,
                              int mode, const KernelParams<double>& params, const at::Tensor& sigma) {
    const int64_t rows = G.size(0), cols = G.size(1);
    check_rows(rows);
    at::Tensor partials = at::empty({rows}, G.options());
    // sigma is undefined while the bandwidth itself is being computed (distance mode reads no sigma).
    const at::Tensor s = sigma.defined() ? sigma : partials;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "mmd_block_sum_cuda", [&] {
      const KernelParams<scalar_t> p = cast_params<scalar_t>(params);
      distribution::dispatch_kernel(p, [&](auto kern) {
        if (mode == distribution::kSumDistance) {
          mmd_row_sum_kernel<scalar_t, distribution::kSumDistance><<<unsigned(rows), kThreads, 0, stream>>>(
              kern, G.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), cols,
              symmetric, p, s.const_data_ptr<scalar_t>(), partials.mutable_data_ptr<scalar_t>());
        } else {
          mmd_row_sum_kernel<scalar_t, distribution::kSumKernel><<<unsigned(rows), kThreads, 0, stream>>>(
              kern, G.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), cols,
              symmetric, p, s.const_data_ptr<scalar_t>(), partials.mutable_data_ptr<scalar_t>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    return partials.sum();
  }

  static at::Tensor block_sum_weights(at::Tensor& G, const at::Tensor& a, const at::Tensor& b, bool symmetric,
                                      const KernelParams<double>& params, const at::Tensor& sigma, double coef) {
    const int64_t rows = G.size(0), cols = G.size(1);
    check_rows(rows);
    at::Tensor partials = at::empty({rows}, G.options());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "mmd_block_sum_weights_cuda", [&] {
      const KernelParams<scalar_t> p = cast_params<scalar_t>(params);
      distribution::dispatch_kernel(p, [&](auto kern) {
        mmd_row_sum_weights_kernel<scalar_t><<<unsigned(rows), kThreads, 0, stream>>>(
            kern, G.mutable_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), cols,
            symmetric, p, sigma.const_data_ptr<scalar_t>(), scalar_t(coef), partials.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    return partials.sum();
  }

  static void block_weights(at::Tensor& G, const at::Tensor& a, const at::Tensor& b, bool symmetric,
                            const KernelParams<double>& params, const at::Tensor& sigma, const at::Tensor& grad,
                            double coef) {
    const int64_t rows = G.size(0), cols = G.size(1);
    check_rows(rows);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "mmd_block_weights_cuda", [&] {
      const KernelParams<scalar_t> p = cast_params<scalar_t>(params);
      distribution::dispatch_kernel(p, [&](auto kern) {
        mmd_row_weights_kernel<scalar_t><<<unsigned(rows), kThreads, 0, stream>>>(
            kern, G.mutable_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), cols,
            symmetric, p, sigma.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), scalar_t(coef));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> mmd_cuda(const at::Tensor& x, const at::Tensor& y,
                                                        std::string_view kernel, double gamma, double coef0,
                                                        int64_t degree, double bandwidth, int64_t save_weights) {
  const c10::cuda::CUDAGuard guard(x.device());
  return distribution::mmd_forward<CudaBlocks>(x, y, std::string(kernel), gamma, coef0, degree, bandwidth,
                                               save_weights);
}

std::tuple<at::Tensor, at::Tensor> mmd_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                                     const at::Tensor& sigma, const at::Tensor& weights,
                                                     int64_t saved_weights, std::string_view kernel, double gamma,
                                                     double coef0, int64_t degree, bool x_grad, bool y_grad) {
  const c10::cuda::CUDAGuard guard(x.device());
  return distribution::mmd_backward<CudaBlocks>(grad, x, y, sigma, weights, saved_weights, std::string(kernel), gamma,
                                                coef0, degree, x_grad, y_grad);
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("mmd", &kdops::cuda::mmd_cuda);
  m.impl("mmd_backward", &kdops::cuda::mmd_backward_cuda);
}
