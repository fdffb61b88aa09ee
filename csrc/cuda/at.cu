// CUDA kernels of the attention-transfer map (see csrc/cpu/at.cpp): one thread per (b, hw) summing over the
// channels (coalesced across hw), and one thread per element for the backward. Same math as the CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "kdops/feature_math.h"
#include "cuda/launch.h"
#include "kdops/gram_host.h"

namespace kdops {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) at_map_kernel(const T* __restrict__ f, int64_t C, int64_t hw,
                                                          int64_t total, T p, int ip, T scale, T* __restrict__ out) {
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += int64_t(gridDim.x) * kThreads) {
    const int64_t bi = e / hw, h = e % hw;
    const T* fb = f + bi * C * hw + h;
    T acc = 0;
    for (int64_t c = 0; c < C; ++c) acc += feature::abs_pow(fb[c * hw], p, ip);
    out[e] = acc * scale;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) at_map_backward_kernel(const T* __restrict__ f, const T* __restrict__ g,
                                                                   int64_t C, int64_t hw, int64_t total, T p, int ip,
                                                                   T scale, T* __restrict__ out) {
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += int64_t(gridDim.x) * kThreads) {
    const int64_t bi = e / (C * hw), h = e % hw;
    out[e] = feature::abs_pow_grad(f[e], p, ip) * g[bi * hw + h] * scale;
  }
}

at::Tensor at_map_cuda(const at::Tensor& f_in, double p, bool mean) {
  const c10::cuda::CUDAGuard guard(f_in.device());
  gram::check_at_map("kdops.at_map", f_in, p);
  const at::Tensor f = f_in.contiguous();
  const int64_t B = f.size(0), C = f.size(1), hw = f.size(2), total = B * hw;
  at::Tensor out = at::empty({B, hw}, f.options());
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "at_map_cuda", [&] {
    using T = scalar_t;
    at_map_kernel<T><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        f.const_data_ptr<T>(), C, hw, total, T(p), feature::integer_power(p),
        mean && C > 0 ? T(1.0 / double(C)) : T(1), out.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor at_map_backward_cuda(const at::Tensor& grad_in, const at::Tensor& f_in, double p, bool mean) {
  const c10::cuda::CUDAGuard guard(f_in.device());
  gram::check_at_map("kdops.at_map_backward", f_in, p);
  const at::Tensor f = f_in.contiguous();
  const int64_t B = f.size(0), C = f.size(1), hw = f.size(2), total = f.numel();
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == B && grad_in.size(1) == hw,
              "kdops.at_map_backward: grad must be (b, HW) = (", B, ", ", hw, "), got ", grad_in.sizes());
  TORCH_CHECK(grad_in.device() == f_in.device(), "kdops.at_map_backward: grad must be on ", f_in.device(), ", got ",
              grad_in.device());
  const at::Tensor g = grad_in.to(f.scalar_type()).contiguous();
  at::Tensor out = at::empty(f.sizes(), f.options());
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "at_map_backward_cuda", [&] {
    using T = scalar_t;
    at_map_backward_kernel<T><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        f.const_data_ptr<T>(), g.const_data_ptr<T>(), C, hw, total, T(p), feature::integer_power(p),
        mean ? T(1.0 / double(C)) : T(1), out.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("at_map", &kdops::cuda::at_map_cuda);
  m.impl("at_map_backward", &kdops::cuda::at_map_backward_cuda);
}
