// CUDA kernels of the Gram-matrix primitives (see kdops/gram_math.h): the forward one thread per entry; the
// backward one block per row (direct gradients and the row sum, CUB) then one thread per column for the
// column sum and the diagonal's term. Same math as the CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>

#include "cuda/launch.h"
#include "kdops/gram_host.h"
#include "kdops/gram_math.h"

namespace kdops {
namespace cuda {
namespace {

// G_rr of global row r (batch r / n, row r % n)
template <typename T>
__device__ T diag_of(const T* g, int64_t n, int64_t r) {
  return g[r * n + r % n];
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gram_forward_kernel(const T* __restrict__ g, int64_t n, int64_t total,
                                                                int kind, T* __restrict__ out) {
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += int64_t(gridDim.x) * kThreads) {
    const int64_t r = e / n, j = e % n, rj = (r / n) * n + j;
    const T gii = diag_of(g, n, r), gjj = diag_of(g, n, rj);
    out[e] = gram_ops::forward(kind, g[e], gii, gjj, gram_ops::cosine_scale(gii), gram_ops::cosine_scale(gjj),
                               j == r % n);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gram_backward_rows_kernel(const T* __restrict__ dout, const T* __restrict__ out, const T* __restrict__ g,
                              int64_t n, int kind, T* __restrict__ dg, T* __restrict__ rho) {
  using Reduce = cub::BlockReduce<T, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t r = blockIdx.x, b0 = (r / n) * n, i = r % n;
  const T gii = diag_of(g, n, r), ci = gram_ops::cosine_scale(gii);
  T acc = 0;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const int64_t e = r * n + j;
    const T gjj = diag_of(g, n, b0 + j);
    T contrib;
    dg[e] = gram_ops::direct_grad(kind, dout[e], out[e], g[e], gii, gjj, ci, gram_ops::cosine_scale(gjj), j == i,
                                  contrib);
    acc += contrib;
  }
  acc = Reduce(tmp).Sum(acc);
  if (threadIdx.x == 0) rho[r] = acc;
}

// One thread per global row r, as column j = r % n of its batch: the column sum and the diagonal's term.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gram_backward_diag_kernel(const T* __restrict__ dout, const T* __restrict__ out, const T* __restrict__ g,
                              int64_t n, int64_t rows, int kind, const T* __restrict__ rho, T* __restrict__ dg) {
  const int64_t r = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (r >= rows) return;
  const int64_t b0 = (r / n) * n, j = r % n;
  const T gjj = diag_of(g, n, r), cj = gram_ops::cosine_scale(gjj);
  T kappa = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = (b0 + i) * n + j;
    const T gii = diag_of(g, n, b0 + i);
    T contrib;
    (void)gram_ops::direct_grad(kind, dout[e], out[e], g[e], gii, gjj, gram_ops::cosine_scale(gii), cj, i == j,
                                contrib);
    kappa += contrib;
  }
  dg[r * n + j] += gram_ops::diag_factor(kind, gjj) * (rho[r] + kappa);
}

at::Tensor gram_transform_cuda(const at::Tensor& gram_in, int64_t kind) {
  const c10::cuda::CUDAGuard guard(gram_in.device());
  gram::check_gram_transform("kdops.gram_transform", gram_in, kind);
  const at::Tensor g = gram_in.contiguous();
  at::Tensor out = at::empty(g.sizes(), g.options());
  const int64_t n = g.size(-1), total = g.numel();
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gram_transform_cuda", [&] {
    gram_forward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<scalar_t>(), n, total, int(kind), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gram_transform_backward_cuda(const at::Tensor& grad_in, const at::Tensor& gram_in,
                                        const at::Tensor& out_in, int64_t kind) {
  const c10::cuda::CUDAGuard guard(gram_in.device());
  gram::check_gram_transform("kdops.gram_transform_backward", gram_in, kind);
  TORCH_CHECK(grad_in.sizes() == gram_in.sizes() && out_in.sizes() == gram_in.sizes(),
              "kdops.gram_transform_backward: grad and out must match gram's shape ", gram_in.sizes());
  const at::Tensor g = gram_in.contiguous(), out = out_in.contiguous();
  const at::Tensor dout = grad_in.to(g.scalar_type()).contiguous();
  at::Tensor dg = at::empty(g.sizes(), g.options());
  const int64_t n = g.size(-1), rows = n == 0 ? 0 : g.numel() / n;
  if (rows == 0) return dg;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "kdops.gram_transform_backward: too many rows");
  at::Tensor rho = at::empty({rows}, g.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gram_transform_backward_cuda", [&] {
    using T = scalar_t;
    gram_backward_rows_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        dout.const_data_ptr<T>(), out.const_data_ptr<T>(), g.const_data_ptr<T>(), n, int(kind),
        dg.mutable_data_ptr<T>(), rho.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gram_backward_diag_kernel<T><<<static_cast<unsigned>((rows + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        dout.const_data_ptr<T>(), out.const_data_ptr<T>(), g.const_data_ptr<T>(), n, rows, int(kind),
        rho.const_data_ptr<T>(), dg.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dg;
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("gram_transform", &kdops::cuda::gram_transform_cuda);
  m.impl("gram_transform_backward", &kdops::cuda::gram_transform_backward_cuda);
}
