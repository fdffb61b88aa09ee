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

using gram_ops::diag_of;

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
  const int64_t r = blockIdx.x;
  T acc = gram_ops::backward_row_share(dout, out, g, n, kind, r, threadIdx.x, kThreads, dg);
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
  gram_ops::backward_diag(dout, out, g, n, kind, r, rho, dg);
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
  TORCH_CHECK(grad_in.device() == gram_in.device() && out_in.device() == gram_in.device(),
              "kdops.gram_transform_backward: grad and out must be on ", gram_in.device(), ", got ", grad_in.device(),
              " and ", out_in.device());
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
