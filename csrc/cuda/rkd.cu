// CUDA kernels of the fused RKD angle loss: one block per (vertex a, point j) reducing over k with CUB (loss
// and per-row sums), and one block per row j of dG whose threads own columns k and loop over the vertices a
// (no atomics). Same per-triplet math as the CPU kernels (kdops/rkd_math.h).
#include <ATen/Dispatch.h>
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

#include "kdops/rkd_host.h"
#include "kdops/rkd_math.h"

namespace kdops {
namespace cuda {
namespace {

constexpr int kThreads = 128;

unsigned pair_blocks(int64_t b) {
  return static_cast<unsigned>(std::min<int64_t>(b * b, std::numeric_limits<int32_t>::max()));
}

// Mode 0: out[a*b + j] = sum_k huber. Mode 1: the four row sums (see rkd_host.h) into out0..out3. The
// per-thread work is kdops/rkd_math.h's pair_share / cols_entry, emulated on the host by
// csrc/cpu/rkd_emulate.cpp.
template <typename T, int Mode>
__global__ void __launch_bounds__(kThreads)
    rows_kernel(const T* __restrict__ gs, const T* __restrict__ gt, const T* __restrict__ us,
                const T* __restrict__ ut, int64_t b, T c, T* __restrict__ out0, T* __restrict__ out1,
                T* __restrict__ out2, T* __restrict__ out3) {
  using Reduce = cub::BlockReduce<T, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  T* outs[4] = {out0, out1, out2, out3};
  constexpr int kSums = Mode == 0 ? 1 : 4;
  // One (a, j) pair per block, grid-stride over the b^2 pairs (b^2 passes the grid's 2^31 - 1 blocks at b =
  // 46341). The loop bound is the same for every thread of a block, so each barrier is reached by all.
  for (int64_t pair = blockIdx.x; pair < b * b; pair += gridDim.x) {
    const int64_t a = pair / b, j = pair % b;
    T sums[4];
    rkd::pair_share<Mode>(gs, gt, us, ut, b, c, a, j, threadIdx.x, kThreads, sums);
    for (int q = 0; q < kSums; ++q) {
      sums[q] = Reduce(tmp).Sum(sums[q]);
      __syncthreads();  // tmp is reused by the next reduction
    }
    if (threadIdx.x == 0) {
      rkd::pair_outputs<Mode>(us, ut, b, a, j, sums);
      for (int q = 0; q < kSums; ++q) outs[q][pair] = sums[q];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    cols_kernel(const T* __restrict__ gs, const T* __restrict__ gt, const T* __restrict__ us,
                const T* __restrict__ ut, int64_t b, T c, T* __restrict__ dgs, T* __restrict__ dgt) {
  const int64_t j = blockIdx.x;
  for (int64_t k = threadIdx.x; k < b; k += kThreads) rkd::cols_entry(gs, gt, us, ut, b, c, j, k, dgs, dgt);
}

struct CudaDev {
  static at::Tensor forward(const at::Tensor& gs, const at::Tensor& gt, const at::Tensor& us, const at::Tensor& ut) {
    const int64_t b = gs.size(0);
    at::Tensor partial = at::empty({b * b}, gs.options());
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "rkd_angle_cuda", [&] {
      rows_kernel<scalar_t, 0><<<pair_blocks(b), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          gs.const_data_ptr<scalar_t>(), gt.const_data_ptr<scalar_t>(), us.const_data_ptr<scalar_t>(),
          ut.const_data_ptr<scalar_t>(), b, scalar_t(0), partial.mutable_data_ptr<scalar_t>(), nullptr, nullptr,
          nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return partial.sum();
  }

  static void rows(const at::Tensor& gs, const at::Tensor& gt, const at::Tensor& us, const at::Tensor& ut, double c,
                   at::Tensor& rws, at::Tensor& rqs, at::Tensor& rwt, at::Tensor& rqt) {
    const int64_t b = gs.size(0);
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "rkd_angle_rows_cuda", [&] {
      rows_kernel<scalar_t, 1><<<pair_blocks(b), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          gs.const_data_ptr<scalar_t>(), gt.const_data_ptr<scalar_t>(), us.const_data_ptr<scalar_t>(),
          ut.const_data_ptr<scalar_t>(), b, scalar_t(c), rws.mutable_data_ptr<scalar_t>(),
          rqs.mutable_data_ptr<scalar_t>(), rwt.mutable_data_ptr<scalar_t>(), rqt.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void cols(const at::Tensor& gs, const at::Tensor& gt, const at::Tensor& us, const at::Tensor& ut, double c,
                   at::Tensor& dgs, at::Tensor& dgt) {
    const int64_t b = gs.size(0);
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "rkd_angle_cols_cuda", [&] {
      cols_kernel<scalar_t><<<b, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          gs.const_data_ptr<scalar_t>(), gt.const_data_ptr<scalar_t>(), us.const_data_ptr<scalar_t>(),
          ut.const_data_ptr<scalar_t>(), b, scalar_t(c), dgs.mutable_data_ptr<scalar_t>(),
          dgt.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

at::Tensor rkd_angle_cuda(const at::Tensor& gs, const at::Tensor& gt) {
  const c10::cuda::CUDAGuard guard(gs.device());
  return rkd::angle_forward<CudaDev>(gs, gt);
}

std::tuple<at::Tensor, at::Tensor> rkd_angle_backward_cuda(const at::Tensor& grad, const at::Tensor& gs,
                                                           const at::Tensor& gt, bool need_s, bool need_t) {
  const c10::cuda::CUDAGuard guard(gs.device());
  return rkd::angle_backward<CudaDev>(grad, gs, gt, need_s, need_t);
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("rkd_angle", &kdops::cuda::rkd_angle_cuda);
  m.impl("rkd_angle_backward", &kdops::cuda::rkd_angle_backward_cuda);
}
