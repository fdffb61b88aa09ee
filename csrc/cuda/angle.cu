// CUDA kernels of the angle-tensor primitive psi[a, j, k] (see kdops/rkd_math.h) from a (batched) Gram matrix:
// one thread per entry forward; backward one thread per (a, j) for the row sums and one per (j, k) for the
// column sums (the incoming gradient symmetrised in (j, k) where psi's dependence is), then rkd_host.h's
// assembly. Same math as the CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cuda/launch.h"
#include "kdops/gram_host.h"
#include "kdops/rkd_host.h"
#include "kdops/rkd_math.h"

namespace kdops {
namespace cuda {
namespace {

// e = ((bi * n + a) * n + j) * n + k
template <typename T>
__global__ void __launch_bounds__(kThreads) angle_forward_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                                                 int64_t n, int64_t total, T* __restrict__ out) {
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += int64_t(gridDim.x) * kThreads) {
    const int64_t k = e % n, j = (e / n) % n, a = (e / (n * n)) % n, base = (e / (n * n * n)) * n * n;
    const T *gb = g + base, *ub = u + base;
    out[e] = rkd::psi(gb[j * n + k], gb[a * n + j], gb[a * n + k], gb[a * n + a], ub[a * n + j], ub[a * n + k]);
  }
}

// r = (W[a, j, k] + W[a, k, j]) / 2
template <typename T>
__device__ T sym_weight(const T* w, int64_t n, int64_t a, int64_t j, int64_t k) {
  return T(0.5) * (w[(a * n + j) * n + k] + w[(a * n + k) * n + j]);
}

// one thread per (bi, a, j): rw = u_aj sum_k r u_ak, rq = sum_k psi r
template <typename T>
__global__ void __launch_bounds__(kThreads)
    angle_rows_kernel(const T* __restrict__ g, const T* __restrict__ u, const T* __restrict__ w, int64_t n,
                      int64_t total, T* __restrict__ rw, T* __restrict__ rq) {
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += int64_t(gridDim.x) * kThreads) {
    const int64_t j = e % n, a = (e / n) % n, base = (e / (n * n)) * n * n;
    const T *gb = g + base, *ub = u + base, *wb = w + base * n;
    const T g_aj = gb[a * n + j], g_aa = gb[a * n + a], u_aj = ub[a * n + j];
    T x = 0, y = 0;
    for (int64_t k = 0; k < n; ++k) {
      const T r = sym_weight(wb, n, a, j, k);
      x += r * ub[a * n + k];
      y += r * rkd::psi(gb[j * n + k], g_aj, gb[a * n + k], g_aa, u_aj, ub[a * n + k]);
    }
    rw[e] = x * u_aj;
    rq[e] = y;
  }
}

// one thread per (bi, j, k): dg[j, k] = sum_a W[a, j, k] u_aj u_ak (G_jk enters psi[a, j, k] only)
template <typename T>
__global__ void __launch_bounds__(kThreads) angle_cols_kernel(const T* __restrict__ u, const T* __restrict__ w,
                                                              int64_t n, int64_t total, T* __restrict__ dg) {
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += int64_t(gridDim.x) * kThreads) {
    const int64_t k = e % n, j = (e / n) % n, base = (e / (n * n)) * n * n;
    const T *ub = u + base, *wb = w + base * n;
    T acc = 0;
    for (int64_t a = 0; a < n; ++a) acc += wb[(a * n + j) * n + k] * ub[a * n + j] * ub[a * n + k];
    dg[e] = acc;
  }
}

at::Tensor angle_tensor_gram_cuda(const at::Tensor& gram_in) {
  const c10::cuda::CUDAGuard guard(gram_in.device());
  gram::check_gram_transform("kdops.angle_tensor_gram", gram_in, 0);
  const at::Tensor g = gram_in.contiguous(), u = rkd::inverse_distances(g);
  const int64_t n = g.size(-1);
  std::vector<int64_t> shape(g.sizes().begin(), g.sizes().end());
  shape.push_back(n);
  at::Tensor out = at::empty(shape, g.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "angle_tensor_gram_cuda", [&] {
    angle_forward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), n, total, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor angle_tensor_gram_backward_cuda(const at::Tensor& grad_in, const at::Tensor& gram_in) {
  const c10::cuda::CUDAGuard guard(gram_in.device());
  gram::check_gram_transform("kdops.angle_tensor_gram_backward", gram_in, 0);
  const at::Tensor g = gram_in.contiguous(), u = rkd::inverse_distances(g);
  const int64_t n = g.size(-1), batches = g.dim() == 3 ? g.size(0) : 1;
  TORCH_CHECK(grad_in.dim() == g.dim() + 1 && grad_in.size(-1) == n && grad_in.numel() == batches * n * n * n,
              "kdops.angle_tensor_gram_backward: grad must be the angle tensor's shape, got ", grad_in.sizes());
  TORCH_CHECK(grad_in.device() == gram_in.device(), "kdops.angle_tensor_gram_backward: grad must be on ",
              gram_in.device(), ", got ", grad_in.device());
  if (g.numel() == 0) return at::zeros_like(g);
  const at::Tensor w = grad_in.to(g.scalar_type()).contiguous();
  at::Tensor rw = at::empty_like(g), rq = at::empty_like(g), dg = at::empty_like(g);
  const int64_t total = g.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "angle_tensor_gram_backward_cuda", [&] {
    using T = scalar_t;
    angle_rows_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
        g.const_data_ptr<T>(), u.const_data_ptr<T>(), w.const_data_ptr<T>(), n, total, rw.mutable_data_ptr<T>(),
        rq.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    angle_cols_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(u.const_data_ptr<T>(), w.const_data_ptr<T>(), n,
                                                                     total, dg.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return rkd::assemble(u, rw, rq, dg);
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("angle_tensor_gram", &kdops::cuda::angle_tensor_gram_cuda);
  m.impl("angle_tensor_gram_backward", &kdops::cuda::angle_tensor_gram_backward_cuda);
}
