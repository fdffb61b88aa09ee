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
#include <ATen/ops/stack.h>
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
constexpr int kMaxPeerPointers = 32;  // peers passed by pointer in the kernel arguments

// The peers' logits (or gradients) as the kernels see them: up to kMaxPeerPointers pointers by value, or for
// more peers one stacked (N, R, C) buffer (base != nullptr).
template <typename T>
struct Peers {
  T* p[kMaxPeerPointers];
  T* base;
  int64_t stride;
  __device__ T* operator[](int64_t j) const { return base != nullptr ? base + j * stride : p[j]; }
};

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
__global__ void __launch_bounds__(kBlock) mutual_kd_forward_kernel(const Peers<const scalar_t> z, int64_t N,
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
      const scalar_t* zj = z[j] + r * C;
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
          const acc_t l = mu::log_prob(acc_t(z[j][r * C + c]), inv_t, sj[0], sj[1]);
          const acc_t q = exp_(l);
          S += q;
          E += mu::plogp(q, l);
        }
#pragma unroll
        for (int k = 0; k < kGroup; ++k) {
          const int64_t i = g0 + k;
          if (i < N) {
            const acc_t* si = stats + (i * R + r) * mu::kMutualStats;
            const acc_t li = mu::log_prob(acc_t(z[i][r * C + c]), inv_t, si[0], si[1]);
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
                                                                    const Peers<const scalar_t> z,
                                                                    const at::opmath_type<scalar_t>* __restrict__ stats,
                                                                    int64_t N, int64_t R, int64_t C,
                                                                    at::opmath_type<scalar_t> inv_t,
                                                                    at::opmath_type<scalar_t> scale,
                                                                    const Peers<scalar_t> gz) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t n_peers = acc_t(N);
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    for (int64_t c = threadIdx.x; c < C; c += kBlock) {
      acc_t S = 0;
      for (int64_t j = 0; j < N; ++j) {
        const acc_t* sj = stats + (j * R + r) * mu::kMutualStats;
        S += exp_(mu::log_prob(acc_t(z[j][r * C + c]), inv_t, sj[0], sj[1]));
      }
      for (int64_t i = 0; i < N; ++i) {
        const acc_t* si = stats + (i * R + r) * mu::kMutualStats;
        const acc_t q = exp_(mu::log_prob(acc_t(z[i][r * C + c]), inv_t, si[0], si[1]));
        const acc_t g = acc_t(grad[i * R + r]) * scale * inv_t;
        gz[i][r * C + c] = static_cast<scalar_t>(mu::grad_term(g, n_peers, q, S));
      }
    }
  }
}

unsigned row_blocks(int64_t R) {
  return static_cast<unsigned>(std::min<int64_t>(R, kMaxRowBlocks));
}

// The kernel-argument view of the peers; `stacked` holds the copy when there are more than kMaxPeerPointers.
template <typename scalar_t>
Peers<const scalar_t> peer_view(const kd::MutualCall& c, at::Tensor& stacked) {
  Peers<const scalar_t> v{};
  v.base = nullptr;
  v.stride = c.R * c.C;
  if (c.N > kMaxPeerPointers) {
    stacked = at::stack(c.peers);
    v.base = stacked.const_data_ptr<scalar_t>();
  } else {
    for (int64_t j = 0; j < c.N; ++j) v.p[j] = c.peers[j].const_data_ptr<scalar_t>();
  }
  return v;
}

// The same for the gradients: written in place for up to kMaxPeerPointers peers, else into `stacked`, which
// the caller then copies out.
template <typename scalar_t>
Peers<scalar_t> grad_view(const kd::MutualCall& c, std::vector<at::Tensor>& grads, at::Tensor& stacked) {
  Peers<scalar_t> v{};
  v.base = nullptr;
  v.stride = c.R * c.C;
  if (c.N > kMaxPeerPointers) {
    stacked = at::empty({c.N, c.R, c.C}, c.peers[0].options());
    v.base = stacked.mutable_data_ptr<scalar_t>();
  } else {
    for (int64_t j = 0; j < c.N; ++j) v.p[j] = grads[j].mutable_data_ptr<scalar_t>();
  }
  return v;
}

std::tuple<at::Tensor, at::Tensor> mutual_kd_cuda(at::TensorList logits, double temperature, double scale) {
  const kd::MutualCall c = kd::prepare_mutual(logits, temperature, "mutual_kd");
  const c10::cuda::CUDAGuard guard(c.peers[0].device());
  at::Tensor out = at::empty({c.N, c.R}, c.peers[0].options());
  at::Tensor stats = at::empty({c.N, c.R, mu::kMutualStats}, c.peers[0].options().dtype(c.acc));
  if (c.R == 0) return {out, stats};
  if (c.C == 0) {
    out.zero_();
    stats.fill_(-std::numeric_limits<double>::infinity());
    return {out, stats};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor stacked;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "mutual_kd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mutual_kd_forward_kernel<scalar_t><<<row_blocks(c.R), kBlock, 0, stream>>>(
        peer_view<scalar_t>(c, stacked), c.N, c.R, c.C, acc_t(1.0 / temperature), acc_t(scale),
        out.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, stats};
}

std::vector<at::Tensor> mutual_kd_backward_cuda(const at::Tensor& grad, at::TensorList logits,
                                                const at::Tensor& stats, double temperature, double scale) {
  const kd::MutualCall c = kd::prepare_mutual(logits, temperature, "mutual_kd_backward");
  kd::check_mutual_backward(grad, c, stats);
  const c10::cuda::CUDAGuard guard(c.peers[0].device());
  const at::Tensor g = grad.contiguous(), st = stats.contiguous();
  std::vector<at::Tensor> gz = kd::empty_peer_grads(c);
  if (c.R > 0 && c.C > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor stacked_in, stacked_out;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "mutual_kd_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      mutual_kd_backward_kernel<scalar_t><<<row_blocks(c.R), kBlock, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), peer_view<scalar_t>(c, stacked_in), st.const_data_ptr<acc_t>(), c.N, c.R,
          c.C, acc_t(1.0 / temperature), acc_t(scale), grad_view<scalar_t>(c, gz, stacked_out));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (stacked_out.defined()) {
      for (int64_t j = 0; j < c.N; ++j) gz[j].copy_(stacked_out.select(0, j));
    }
  }
  return gz;
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("mutual_kd", &kdops::cuda::mutual_kd_cuda);
  m.impl("mutual_kd_backward", &kdops::cuda::mutual_kd_backward_cuda);
}
