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

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) partial_l2_forward_kernel(const scalar_t* __restrict__ s,
                                                                      const scalar_t* __restrict__ t,
                                                                      const at::opmath_type<scalar_t>* __restrict__ m,
                                                                      int64_t per_sample, int64_t hw, int64_t C,
                                                                      at::opmath_type<scalar_t>* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t b = blockIdx.y;
  const int64_t begin = int64_t(blockIdx.x) * kChunk;
  const int64_t end = std::min(per_sample, begin + kChunk);
  const scalar_t* sb = s + b * per_sample;
  const scalar_t* tb = t + b * per_sample;
  acc_t sum = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    sum += feature::partial_l2_term(acc_t(sb[i]), acc_t(tb[i]), m[(i / hw) % C]);
  }
  sum = Reduce(tmp).Sum(sum);
  if (threadIdx.x == 0) partials[b * gridDim.x + blockIdx.x] = sum;
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
      out[i] = acc_t(x[i]) > mc ? grad[i] : scalar_t(0);
    } else {
      out[i] = static_cast<scalar_t>(feature::margin_relu(acc_t(x[i]), mc));
    }
  }
}

at::Tensor partial_l2_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& margin) {
  feature::check_pair("kdops.partial_l2", student, teacher);
  const int64_t C = feature::check_map_and_margin("kdops.partial_l2", student, margin);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous(), t = teacher.contiguous(), m = feature::kernel_margin(margin, student);
  const int64_t B = s.size(0), per_sample = B > 0 ? s.numel() / B : 0, hw = C > 0 ? per_sample / C : 0;
  const int64_t chunks = std::max<int64_t>(1, (per_sample + kChunk - 1) / kChunk);
  at::Tensor partials = at::empty({B, chunks}, m.options());
  if (B == 0 || per_sample == 0) return partials.zero_().sum(1);
  TORCH_CHECK(B <= 65535 && chunks <= std::numeric_limits<int32_t>::max(), "kdops.partial_l2: too large a map: ",
              s.sizes());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "partial_l2_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    partial_l2_forward_kernel<scalar_t><<<dim3(unsigned(chunks), unsigned(B)), kThreads, 0, stream>>>(
        s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), m.const_data_ptr<acc_t>(), per_sample, hw, C,
        partials.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partials.sum(1);
}

std::tuple<at::Tensor, at::Tensor> partial_l2_backward_cuda(const at::Tensor& grad, const at::Tensor& student,
                                                            const at::Tensor& teacher, const at::Tensor& margin,
                                                            bool student_grad, bool teacher_grad) {
  feature::check_pair("kdops.partial_l2_backward", student, teacher);
  const int64_t C = feature::check_map_and_margin("kdops.partial_l2_backward", student, margin);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == student.size(0), "kdops.partial_l2_backward: grad must have shape (",
              student.size(0), ",), got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous(), t = teacher.contiguous(), m = feature::kernel_margin(margin, student);
  const at::Tensor g = grad.to(m.scalar_type()).contiguous();
  at::Tensor gs = student_grad ? at::empty(s.sizes(), s.options()) : at::empty({0}, s.options());
  at::Tensor gt = teacher_grad ? at::empty(t.sizes(), t.options()) : at::empty({0}, t.options());
  const int64_t n = s.numel(), B = s.size(0), per_sample = B > 0 ? n / B : 0, hw = C > 0 ? per_sample / C : 0;
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
  const int64_t C = feature::check_map_and_margin("kdops.margin_relu", x_in, margin);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), m = feature::kernel_margin(margin, x_in);
  const at::Tensor g = Backward ? grad->contiguous() : at::Tensor();
  if (Backward) {
    TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(),
                "kdops.margin_relu_backward: grad must match x in shape and dtype");
  }
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel(), hw = n > 0 ? n / (x.size(0) * C) : 0;
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
  m.impl("margin_relu", &kdops::cuda::margin_relu_cuda);
  m.impl("margin_relu_backward", &kdops::cuda::margin_relu_backward_cuda);
}
