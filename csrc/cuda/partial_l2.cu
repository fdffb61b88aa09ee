// CUDA kernels of the Overhaul's margin ReLU and fused partial L2. The forward reduces each chunk of a
// sample's C*HW elements with CUB into a partial sum, and ATen sums the partials per sample.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>

#include "kdops/feature_host.h"
#include "kdops/feature_math.h"
#include "kdops/host_common.h"

namespace kdops {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;  // elements per thread per forward block
constexpr int64_t kChunk = int64_t(kThreads) * kItems;

unsigned elementwise_blocks(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

// With WS / WT the same pass also writes the gradients of scale * sum (partial_l2_with_grad).
template <typename scalar_t, bool WS, bool WT>
__global__ void __launch_bounds__(kThreads) partial_l2_forward_kernel(const scalar_t* __restrict__ s,
                                                                      const scalar_t* __restrict__ t,
                                                                      const at::opmath_type<scalar_t>* __restrict__ m,
                                                                      int64_t per_sample, int64_t hw, int64_t C,
                                                                      int64_t chunks, int64_t n_items,
                                                                      at::opmath_type<scalar_t> scale,
                                                                      at::opmath_type<scalar_t>* __restrict__ partials,
                                                                      scalar_t* __restrict__ gs,
                                                                      scalar_t* __restrict__ gt) {
  using acc_t = at::opmath_type<scalar_t>;
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  // One (sample, chunk) work item per block, grid-stride over the B * chunks items: no grid dimension limits
  // the batch. The loop bound is the same for every thread of a block, so each barrier is reached by all.
  for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x) {
    const int64_t b = item / chunks;
    const int64_t begin = (item % chunks) * kChunk;
    const int64_t end = std::min(per_sample, begin + kChunk);
    const int64_t base = b * per_sample;
    acc_t sum = 0;
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      const acc_t si = acc_t(s[base + i]), ti = acc_t(t[base + i]), mi = m[(i / hw) % C];
      if (WS || WT) {
        acc_t a, g;
        sum += feature::partial_l2_term_grad(si, ti, mi, scale, a, g);
        if (WS) gs[base + i] = static_cast<scalar_t>(a);
        if (WT) gt[base + i] = static_cast<scalar_t>(g);
      } else {
        sum += feature::partial_l2_term(si, ti, mi);
      }
    }
    sum = Reduce(tmp).Sum(sum);
    if (threadIdx.x == 0) partials[item] = sum;
    __syncthreads();  // tmp is reused by the next item's reduction
  }
}

template <typename scalar_t, bool WS, bool WT>
__global__ void __launch_bounds__(kThreads) partial_l2_backward_kernel(
    const at::opmath_type<scalar_t>* __restrict__ grad, const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
    const at::opmath_type<scalar_t>* __restrict__ m, int64_t n, int64_t per_sample, int64_t hw, int64_t C,
    scalar_t* __restrict__ gs, scalar_t* __restrict__ gt) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    acc_t a, b;
    feature::partial_l2_grad(acc_t(s[i]), acc_t(t[i]), m[(i / hw) % C], grad[i / per_sample], a, b);
    if (WS) gs[i] = static_cast<scalar_t>(a);
    if (WT) gt[i] = static_cast<scalar_t>(b);
  }
}

template <typename scalar_t, bool Backward>
__global__ void __launch_bounds__(kThreads) margin_relu_kernel(const scalar_t* __restrict__ grad,
                                                               const scalar_t* __restrict__ x,
                                                               const at::opmath_type<scalar_t>* __restrict__ m,
                                                               int64_t n, int64_t hw, int64_t C,
                                                               scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const acc_t mc = m[(i / hw) % C];
    if (Backward) {
      out[i] = static_cast<scalar_t>(feature::margin_relu_grad(acc_t(grad[i]), acc_t(x[i]), mc));
    } else {
      out[i] = static_cast<scalar_t>(feature::margin_relu(acc_t(x[i]), mc));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_l2_impl(const char* op, const at::Tensor& student,
                                                               const at::Tensor& teacher, const at::Tensor& margin,
                                                               double scale, bool student_grad, bool teacher_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  const feature::MapGradCall c =
      feature::prepare_maps_with_grad(op, student, teacher, margin, student_grad, teacher_grad);
  const at::Tensor &s = c.s, &t = c.t, &m = c.m, &gs = c.gs, &gt = c.gt;
  const int64_t C = c.C, B = c.B, hw = c.hw, per_sample = C * hw;
  const int64_t chunks = std::max<int64_t>(1, (per_sample + kChunk - 1) / kChunk);
  at::Tensor partials = at::empty({B, chunks}, m.options());
  if (B == 0 || per_sample == 0) return {partials.zero_().sum(1), gs, gt};
  const int64_t n_items = B * chunks;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(n_items, std::numeric_limits<int32_t>::max()));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "partial_l2_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto ws, auto wt) {
      partial_l2_forward_kernel<scalar_t, decltype(ws)::value, decltype(wt)::value>
          <<<blocks, kThreads, 0, stream>>>(
              s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), m.const_data_ptr<acc_t>(), per_sample, hw,
              C, chunks, n_items, acc_t(scale), partials.mutable_data_ptr<acc_t>(),
              student_grad ? gs.mutable_data_ptr<scalar_t>() : nullptr,
              teacher_grad ? gt.mutable_data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (student_grad || teacher_grad) {
      dispatch_grad_flags(student_grad, teacher_grad, launch);
    } else {
      launch(std::false_type{}, std::false_type{});
    }
  });
  return {partials.sum(1), gs, gt};
}

at::Tensor partial_l2_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& margin) {
  return std::get<0>(partial_l2_impl("kdops.partial_l2", student, teacher, margin, 1.0, false, false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_l2_with_grad_cuda(const at::Tensor& student,
                                                                         const at::Tensor& teacher,
                                                                         const at::Tensor& margin, double scale,
                                                                         bool student_grad, bool teacher_grad) {
  return partial_l2_impl("kdops.partial_l2_with_grad", student, teacher, margin, scale, student_grad, teacher_grad);
}

std::tuple<at::Tensor, at::Tensor> partial_l2_backward_cuda(const at::Tensor& grad, const at::Tensor& student,
                                                            const at::Tensor& teacher, const at::Tensor& margin,
                                                            bool student_grad, bool teacher_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  const feature::MapGradCall c =
      feature::prepare_maps_backward(grad, student, teacher, margin, student_grad, teacher_grad);
  const at::Tensor &s = c.s, &t = c.t, &m = c.m, &g = c.g;
  const at::Tensor &gs = c.gs, &gt = c.gt;
  const int64_t n = s.numel(), C = c.C, hw = c.hw, per_sample = C * hw;
  if (n == 0 || !(student_grad || teacher_grad)) return {gs, gt};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "partial_l2_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_grad_flags(student_grad, teacher_grad, [&](auto ws, auto wt) {
      partial_l2_backward_kernel<scalar_t, decltype(ws)::value, decltype(wt)::value>
          <<<elementwise_blocks(n), kThreads, 0, stream>>>(
              g.const_data_ptr<acc_t>(), s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
              m.const_data_ptr<acc_t>(), n, per_sample, hw, C,
              student_grad ? gs.mutable_data_ptr<scalar_t>() : nullptr,
              teacher_grad ? gt.mutable_data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {gs, gt};
}

template <bool Backward>
at::Tensor margin_relu_cuda_impl(const at::Tensor* grad, const at::Tensor& x_in, const at::Tensor& margin) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const feature::MarginReluCall c = feature::prepare_margin_relu(grad, x_in, margin);
  const at::Tensor &x = c.x, &m = c.m, &g = c.g, &out = c.out;
  const int64_t n = x.numel(), C = c.C, hw = c.hw;
  if (n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "margin_relu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    margin_relu_kernel<scalar_t, Backward><<<elementwise_blocks(n), kThreads, 0, stream>>>(
        Backward ? g.const_data_ptr<scalar_t>() : nullptr, x.const_data_ptr<scalar_t>(), m.const_data_ptr<acc_t>(), n,
        hw, C, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor margin_relu_cuda(const at::Tensor& x, const at::Tensor& margin) {
  return margin_relu_cuda_impl<false>(nullptr, x, margin);
}

at::Tensor margin_relu_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& margin) {
  return margin_relu_cuda_impl<true>(&grad, x, margin);
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("partial_l2", &kdops::cuda::partial_l2_cuda);
  m.impl("partial_l2_backward", &kdops::cuda::partial_l2_backward_cuda);
  m.impl("partial_l2_with_grad", &kdops::cuda::partial_l2_with_grad_cuda);
  m.impl("margin_relu", &kdops::cuda::margin_relu_cuda);
  m.impl("margin_relu_backward", &kdops::cuda::margin_relu_backward_cuda);
}
