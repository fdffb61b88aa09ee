// CUDA kernels of the mutual-learning op (mutual_kd and mutual_kd_backward), the math in kd_math.h (namespace
// kd::mutual). One block per row (grid-stride over rows). Forward: each peer's stats by two block reductions
// (max, then the shifted sum), written by thread 0 and read back by the block; then each thread walks its
// strided share of the classes, forms S and E from the N peers' probabilities and folds the terms of up to
// kGroup peers at a time in registers, which the block sums. Backward: each thread forms S for its classes and writes every
// peer's gradient there.
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

#include "kdops/common.h"
#include "kdops/kd_host.h"
#include "kdops/kd_math.h"

namespace kdops {
namespace cuda {
namespace {

namespace mu = kd::mutual;

constexpr int kBlock = 256;
constexpr int kGroup = 8;          // peers whose terms a thread folds in one pass over its classes
constexpr int64_t kMaxRowBlocks = 65535;

struct MaxOp {
  template <typename T>
  __device__ T operator()(const T& a, const T& b) const {
    return a > b ? a : b;
  }
};

struct SumOp {
  template <typename T>
  __device__ T operator()(const T& a, const T& b) const {
    return a + b;
  }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) mutual_kd_forward_kernel(const scalar_t* __restrict__ z, int64_t N,
                                                                   int64_t R, int64_t C,
                                                                   at::opmath_type<scalar_t> inv_t,
                                                                   at::opmath_type<scalar_t> scale,
                                                                   scalar_t* __restrict__ out,
                                                                   at::opmath_type<scalar_t>* stats) {
  using acc_t = at::opmath_type<scalar_t>;
  using Reduce = cub::BlockReduce<acc_t, kBlock>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ acc_t shared_max;

  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    for (int64_t j = 0; j < N; ++j) {
      const scalar_t* zj = z + (j * R + r) * C;
      acc_t m = neg_inf<acc_t>();
      for (int64_t c = threadIdx.x; c < C; c += kBlock) m = max_of(m, acc_t(zj[c]));
      m = Reduce(tmp).Reduce(m, MaxOp{});
      if (threadIdx.x == 0) shared_max = m;
      __syncthreads();  // shared_max visible; tmp free again
      m = shared_max;
      acc_t s = 0;
      if (m > neg_inf<acc_t>()) {
        for (int64_t c = threadIdx.x; c < C; c += kBlock) s += exp_((acc_t(zj[c]) - m) * inv_t);
      }
      s = Reduce(tmp).Reduce(s, SumOp{});
      if (threadIdx.x == 0) {
        stats[(j * R + r) * mu::kMutualStats] = m;
        stats[(j * R + r) * mu::kMutualStats + 1] = log_(s);
      }
      __syncthreads();  // the row's stats (global memory, read back below by the whole block) visible; tmp and
                        // shared_max free again
    }
    for (int64_t g0 = 0; g0 < N; g0 += kGroup) {
      acc_t v[kGroup];
#pragma unroll
      for (int k = 0; k < kGroup; ++k) v[k] = acc_t(0);
      for (int64_t c = threadIdx.x; c < C; c += kBlock) {
        acc_t S = 0, E = 0;
        for (int64_t j = 0; j < N; ++j) {
          const acc_t* sj = stats + (j * R + r) * mu::kMutualStats;
          const acc_t l = mu::log_prob(acc_t(z[(j * R + r) * C + c]), inv_t, sj[0], sj[1]);
          const acc_t q = exp_(l);
          S += q;
          E += mu::plogp(q, l);
        }
#pragma unroll
        for (int k = 0; k < kGroup; ++k) {
          const int64_t i = g0 + k;
          if (i < N) {
            const acc_t* si = stats + (i * R + r) * mu::kMutualStats;
            const acc_t li = mu::log_prob(acc_t(z[(i * R + r) * C + c]), inv_t, si[0], si[1]);
            v[k] += mu::value_term(E, S, li);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        const int64_t i = g0 + k;
        if (i < N) {  // uniform across the block: every thread reaches the same reductions
          const acc_t total = Reduce(tmp).Reduce(v[k], SumOp{});
          if (threadIdx.x == 0) out[i * R + r] = static_cast<scalar_t>(kd::nonnegative(total) * scale);
          __syncthreads();  // tmp free again
        }
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) mutual_kd_backward_kernel(const scalar_t* __restrict__ grad,
                                                                    const scalar_t* __restrict__ z,
                                                                    const at::opmath_type<scalar_t>* __restrict__ stats,
                                                                    int64_t N, int64_t R, int64_t C,
                                                                    at::opmath_type<scalar_t> inv_t,
                                                                    at::opmath_type<scalar_t> scale,
                                                                    scalar_t* __restrict__ gz) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t n_peers = acc_t(N);
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    for (int64_t c = threadIdx.x; c < C; c += kBlock) {
      acc_t S = 0;
      for (int64_t j = 0; j < N; ++j) {
        const acc_t* sj = stats + (j * R + r) * mu::kMutualStats;
        S += exp_(mu::log_prob(acc_t(z[(j * R + r) * C + c]), inv_t, sj[0], sj[1]));
      }
      for (int64_t i = 0; i < N; ++i) {
        const acc_t* si = stats + (i * R + r) * mu::kMutualStats;
        const int64_t idx = (i * R + r) * C + c;
        const acc_t q = exp_(mu::log_prob(acc_t(z[idx]), inv_t, si[0], si[1]));
        const acc_t g = acc_t(grad[i * R + r]) * scale * inv_t;
        gz[idx] = static_cast<scalar_t>(mu::grad_term(g, n_peers, q, S));
      }
    }
  }
}

unsigned row_blocks(int64_t R) {
  return static_cast<unsigned>(std::min<int64_t>(R, kMaxRowBlocks));
}

std::tuple<at::Tensor, at::Tensor> mutual_kd_cuda(const at::Tensor& logits, double temperature, double scale) {
  kd::check_mutual(logits, temperature, "mutual_kd");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = logits.contiguous();
  const int64_t N = z.size(0), R = z.size(1), C = z.size(2);
  at::Tensor out = at::empty({N, R}, z.options());
  at::Tensor stats = at::empty({N, R, mu::kMutualStats}, z.options().dtype(at::toOpMathType(z.scalar_type())));
  if (R == 0) return {out, stats};
  if (C == 0) {
    out.zero_();
    stats.fill_(-std::numeric_limits<double>::infinity());
    return {out, stats};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "mutual_kd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mutual_kd_forward_kernel<scalar_t><<<row_blocks(R), kBlock, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), N, R, C, acc_t(1.0 / temperature), acc_t(scale),
        out.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, stats};
}

at::Tensor mutual_kd_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& stats,
                                   double temperature, double scale) {
  kd::check_mutual(logits, temperature, "mutual_kd_backward");
  kd::check_mutual_backward(grad, logits, stats);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = logits.contiguous(), g = grad.contiguous(), l = stats.contiguous();
  const int64_t N = z.size(0), R = z.size(1), C = z.size(2);
  at::Tensor gz = at::empty(z.sizes(), z.options());
  if (R == 0 || C == 0) return gz;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "mutual_kd_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mutual_kd_backward_kernel<scalar_t><<<row_blocks(R), kBlock, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), l.const_data_ptr<acc_t>(), N, R, C,
        acc_t(1.0 / temperature), acc_t(scale), gz.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gz;
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("mutual_kd", &kdops::cuda::mutual_kd_cuda);
  m.impl("mutual_kd_backward", &kdops::cuda::mutual_kd_backward_cuda);
}
