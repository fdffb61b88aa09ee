// CUDA kernels of the fused SP epilogue: one block per row of the Gram matrices, CUB block sums for the row
// norms and dot products, then the normalised difference or its gradient. Same math as the CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <tuple>

#include "kdops/gram_host.h"
#include "kdops/sp_math.h"

namespace kdops {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Sums {
  T a, b, c;
};

template <typename T>
struct SumOp {
  __device__ Sums<T> operator()(const Sums<T>& x, const Sums<T>& y) const { return {x.a + y.a, x.b + y.b, x.c + y.c}; }
};

// Mode 0: rows[i] = |a - c|^2. Mode 1: the gradients (WS / WT select the sides), cf the unit-gradient scale.
template <typename T, int Mode>
__global__ void __launch_bounds__(kThreads)
    sp_rows_kernel(const T* __restrict__ gs, const T* __restrict__ gt, int64_t k, T cf, bool ws, bool wt,
                   T* __restrict__ rows, T* __restrict__ dgs, T* __restrict__ dgt) {
  using Reduce = cub::BlockReduce<Sums<T>, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ Sums<T> shared;
  const int64_t i = blockIdx.x;
  const T *s = gs + i * k, *t = gt + i * k;
  Sums<T> n{0, 0, 0};
  for (int64_t j = threadIdx.x; j < k; j += kThreads) n = {n.a + s[j] * s[j], n.b + t[j] * t[j], T(0)};
  n = Reduce(tmp).Reduce(n, SumOp<T>());
  if (threadIdx.x == 0) shared = n;
  __syncthreads();
  const T ss = shared.a, st = shared.b, is = inv_norm_clamped_(ss), it = inv_norm_clamped_(st);
  __syncthreads();
  Sums<T> r{0, 0, 0};
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    const T a = s[j] * is, c = t[j] * it, d = a - c;
    r = {r.a + d * d, r.b + a * d, r.c + c * d};
  }
  r = Reduce(tmp).Reduce(r, SumOp<T>());
  if (threadIdx.x == 0) shared = r;
  __syncthreads();
  if (Mode == 0) {
    if (threadIdx.x == 0) rows[i] = shared.a;
    return;
  }
  const T ydy_s = cf * shared.b, ydy_t = -cf * shared.c;
  const bool cs = ::sqrt(ss) <= T(1e-12), ct = ::sqrt(st) <= T(1e-12);
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    const T a = s[j] * is, c = t[j] * it, d = cf * (a - c);
    if (ws) dgs[i * k + j] = sp::normalize_grad(d, a, ydy_s, is, cs);
    if (wt) dgt[i * k + j] = sp::normalize_grad(-d, c, ydy_t, it, ct);
  }
}

struct CudaDev {
  static at::Tensor forward(const at::Tensor& gs, const at::Tensor& gt) {
    const int64_t b = gs.size(0), k = gs.size(1);
    at::Tensor rows = at::empty({b}, gs.options());
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "sp_gram_cuda", [&] {
      sp_rows_kernel<scalar_t, 0><<<b, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          gs.const_data_ptr<scalar_t>(), gt.const_data_ptr<scalar_t>(), k, scalar_t(0), false, false,
          rows.mutable_data_ptr<scalar_t>(), nullptr, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return rows.sum() / (double(b) * double(b));
  }

  static void backward(const at::Tensor& gs, const at::Tensor& gt, bool need_s, bool need_t, at::Tensor& dgs,
                       at::Tensor& dgt) {
    const int64_t b = gs.size(0), k = gs.size(1);
    const double cf = 2.0 / (double(b) * double(b));  // d|d|^2 = 2 d, mean over b^2
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "sp_gram_backward_cuda", [&] {
      sp_rows_kernel<scalar_t, 1><<<b, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          gs.const_data_ptr<scalar_t>(), gt.const_data_ptr<scalar_t>(), k, scalar_t(cf), need_s, need_t, nullptr,
          dgs.mutable_data_ptr<scalar_t>(), dgt.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

at::Tensor sp_gram_cuda(const at::Tensor& gs, const at::Tensor& gt) {
  const c10::cuda::CUDAGuard guard(gs.device());
  return gram::forward<CudaDev>("kdops.sp_gram", gs, gt);
}

std::tuple<at::Tensor, at::Tensor> sp_gram_backward_cuda(const at::Tensor& grad, const at::Tensor& gs,
                                                         const at::Tensor& gt, bool need_s, bool need_t) {
  const c10::cuda::CUDAGuard guard(gs.device());
  return gram::backward<CudaDev>("kdops.sp_gram_backward", grad, gs, gt, need_s, need_t);
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("sp_gram", &kdops::cuda::sp_gram_cuda);
  m.impl("sp_gram_backward", &kdops::cuda::sp_gram_backward_cuda);
}
