// CUDA kernel of the Sinkhorn solver: the log-domain potential update over one Gram block, one block per row,
// a CUB max then a CUB sum of exponentials over the columns (the cost is recomputed from the Gram entry); the
// per-thread passes are kdops/ot_math.h's lse_thread_*, emulated on the host by csrc/cpu/sinkhorn_emulate.cpp.
// The iteration loop itself is the host code of kdops/ot_host.h, which syncs only at convergence checks.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>

#include "kdops/ot_host.h"
#include "kdops/ot_math.h"

namespace kdops {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};

template <int PK, typename T>
__global__ void __launch_bounds__(kThreads)
    lse_rows_kernel(const T* __restrict__ d, const T* __restrict__ xh, const T* __restrict__ yh,
                    const T* __restrict__ h, int64_t r, int64_t k, T inv_eps, T eps, T p, T* __restrict__ out) {
  using Reduce = cub::BlockReduce<T, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ T row_max;
  // one row per block, grid-stride over the rows; the loop bound is the block's, so every barrier is reached
  // by all of its threads
  for (int64_t i = blockIdx.x; i < r; i += gridDim.x) {
    const T* row = d + i * k;
    const T xi = xh[i];
    T mx = ot::lse_thread_max<PK>(row, xi, yh, h, k, inv_eps, p, threadIdx.x, kThreads);
    mx = Reduce(tmp).Reduce(mx, MaxOp());
    if (threadIdx.x == 0) row_max = mx;
    __syncthreads();
    mx = row_max;
    T sum = 0;
    if (ot::lse_needs_sum(mx)) {  // the same for every thread of the block
      sum = ot::lse_thread_sum<PK>(row, xi, yh, h, k, inv_eps, p, mx, threadIdx.x, kThreads);
      sum = Reduce(tmp).Sum(sum);
    }
    if (threadIdx.x == 0) out[i] = ot::lse_block_finish(mx, sum, eps);
    __syncthreads();  // row_max and tmp are reused by the next row
  }
}

struct CudaDev {
  static void lse(const at::Tensor& d, const at::Tensor& xh, const at::Tensor& yh, const at::Tensor& h, double eps,
                  double p, bool given, at::Tensor& out) {
    const int64_t r = d.size(0), k = d.size(1);
    if (r == 0) return;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(r, std::numeric_limits<int32_t>::max()));
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "sinkhorn_lse_cuda", [&] {
      auto launch = [&](auto pk) {
        lse_rows_kernel<decltype(pk)::value, scalar_t><<<blocks, kThreads, 0, stream>>>(
            d.const_data_ptr<scalar_t>(), xh.const_data_ptr<scalar_t>(), yh.const_data_ptr<scalar_t>(),
            h.const_data_ptr<scalar_t>(), r, k, scalar_t(1.0 / eps), scalar_t(eps), scalar_t(p),
            out.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      ot::dispatch_power_kind(given, p, launch);
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_solve_cuda(const at::Tensor& x, const at::Tensor& y,
                                                                   const at::Tensor& loga, const at::Tensor& logb,
                                                                   double eps, double p, int64_t max_iter,
                                                                   double tol, double scaling, int64_t check_every,
                                                                   bool online, int64_t tile) {
  const c10::cuda::CUDAGuard guard(x.device());
  return ot::solve<CudaDev>(x, y, loga, logb, {eps, p, tol, scaling, max_iter, check_every, tile, online});
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("sinkhorn_solve", &kdops::cuda::sinkhorn_solve_cuda);
}
