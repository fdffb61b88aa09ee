// CUDA kernels of the LogSum loss: per-block CUB sums of |a - b|^alpha in fp32 (fp64 for fp64), summed
// by ATen; the backward reads the 0-dim grad and total from device memory (no host sync).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include "kdops/feature_host.h"
#include "kdops/feature_math.h"
#include "kdops/host_common.h"

namespace kdops {
namespace cuda {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads * 4 - 1) / (kThreads * 4), 1024)));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) logsum_forward_kernel(const scalar_t* __restrict__ a,
                                                                  const scalar_t* __restrict__ b, int64_t n,
                                                                  at::opmath_type<scalar_t> alpha, int k,
                                                                  at::opmath_type<scalar_t>* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  acc_t sum = 0;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const acc_t d = b != nullptr ? acc_t(a[i]) - acc_t(b[i]) : acc_t(a[i]);
    sum += feature::abs_pow(d, alpha, k);
  }
  sum = Reduce(tmp).Sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

template <typename scalar_t, bool WA, bool WB>
__global__ void __launch_bounds__(kThreads) logsum_backward_kernel(
    const at::opmath_type<scalar_t>* __restrict__ grad, const at::opmath_type<scalar_t>* __restrict__ total,
    const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t n, at::opmath_type<scalar_t> alpha, int k,
    at::opmath_type<scalar_t> eps, scalar_t* __restrict__ ga, scalar_t* __restrict__ gb) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t coef = grad[0] / (total[0] + eps);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const acc_t d = b != nullptr ? acc_t(a[i]) - acc_t(b[i]) : acc_t(a[i]);
    const acc_t g = coef * feature::abs_pow_grad(d, alpha, k);
    if (WA) ga[i] = static_cast<scalar_t>(g);
    if (WB) gb[i] = static_cast<scalar_t>(-g);
  }
}

std::tuple<at::Tensor, at::Tensor> logsum_cuda(const at::Tensor& a_in, const std::optional<at::Tensor>& b_in,
                                               double alpha, double eps) {
  const c10::cuda::CUDAGuard guard(a_in.device());
  const feature::LogsumCall c = feature::prepare_logsum(a_in, b_in, alpha, eps);
  const at::Tensor &a = c.a, &b = c.b;
  const int64_t n = a.numel();
  const unsigned blocks = grid_for(n);
  at::Tensor partials = at::empty({int64_t(blocks)}, a.options().dtype(c.acc_type));
  if (n == 0) {
    at::Tensor total = partials.zero_().sum();
    return {total.add(eps).log(), total};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "logsum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    logsum_forward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, n, acc_t(alpha),
        feature::integer_power(alpha), partials.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor total = partials.sum();
  return {total.add(eps).log(), total};
}

std::tuple<at::Tensor, at::Tensor> logsum_backward_cuda(const at::Tensor& grad, const at::Tensor& a_in,
                                                        const std::optional<at::Tensor>& b_in, const at::Tensor& total,
                                                        double alpha, double eps, bool a_grad, bool b_grad) {
  const c10::cuda::CUDAGuard guard(a_in.device());
  const feature::LogsumCall c =
      feature::prepare_logsum_backward(grad, a_in, b_in, total, alpha, eps, a_grad, b_grad);
  const at::Tensor &a = c.a, &b = c.b, &ga = c.ga, &gb = c.gb;
  const int64_t n = a.numel();
  if (n == 0 || !(a_grad || b_grad)) return {ga, gb};
  const at::Tensor g = grad.to(c.acc_type).contiguous(), tot = total.to(c.acc_type).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "logsum_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_grad_flags(a_grad, b_grad, [&](auto wa, auto wb) {
      logsum_backward_kernel<scalar_t, decltype(wa)::value, decltype(wb)::value>
          <<<static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)), kThreads, 0, stream>>>(
              g.const_data_ptr<acc_t>(), tot.const_data_ptr<acc_t>(), a.const_data_ptr<scalar_t>(),
              b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, n, acc_t(alpha), feature::integer_power(alpha),
              acc_t(eps), a_grad ? ga.mutable_data_ptr<scalar_t>() : nullptr,
              b_grad ? gb.mutable_data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {ga, gb};
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("logsum", &kdops::cuda::logsum_cuda);
  m.impl("logsum_backward", &kdops::cuda::logsum_backward_cuda);
}
