// CUDA kernels of CRD's NCE loss (kdops::crd_nce), the math in contrastive_math.h. Work units as on the CPU: one
// anchor row and a chunk of kCrdChunk index columns per block. Each warp takes every `warps`-th column of the
// chunk: its lanes read the memory row in place (coalesced, no gathered copy), the dot product is reduced by
// shuffles, the entry's term is folded, and the lanes add dx / T * memory row into the warp's own gradient
// accumulator in shared memory. Per-unit partials are summed per row in a fixed order by a last kernel, so the
// result is deterministic. When the normaliser is not set (<= 0 on the device) a first kernel forms the
// batch's log-sum-exp per unit and a one-block kernel merges it into log Z; with it set, both only read it, so
// the host never syncs.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "kdops/common.h"
#include "kdops/contrastive_host.h"
#include "kdops/contrastive_math.h"

namespace kdops {
namespace cuda {
namespace {

namespace cn = contrastive;

constexpr int kCrdChunk = 256;       // index columns per block
constexpr int kMaxWarps = 8;
constexpr int kFinalThreads = 256;
constexpr int64_t kMaxGrid = 1 << 20;
// the dynamic gradient accumulators' budget: the 48 KiB a block may have without opting in, less room for the
// kernel's static shared memory (kMaxWarps accumulators)
constexpr size_t kSharedBytes = 48 * 1024 - 256;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// (max, sum of exp(x - max)) merged with another pair; an empty pair is (-inf, 0).
template <typename T>
__device__ __forceinline__ void lse_merge(T& m, T& s, T m2, T s2) {
  if (s2 == T(0)) return;
  if (m2 > m) {
    s = s * exp_(m - m2) + s2;
    m = m2;
  } else {
    s += s2 * exp_(m2 - m);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t warp_dot(const scalar_t* __restrict__ row, const scalar_t* __restrict__ v,
                                          int64_t d, int lane) {
  acc_t s = 0;
  for (int64_t c = lane; c < d; c += 32) s += acc_t(row[c]) * acc_t(v[c]);
  return warp_sum(s);
}

template <typename scalar_t>
__global__ void crd_lse_kernel(const scalar_t* __restrict__ anchor, const scalar_t* __restrict__ memory,
                               const int64_t* __restrict__ index, const at::opmath_type<scalar_t>* normalizer,
                               int64_t units, int64_t chunks, int64_t k1, int64_t d, int64_t n_bank,
                               at::opmath_type<scalar_t> inv_t, at::opmath_type<scalar_t>* part) {
  using acc_t = at::opmath_type<scalar_t>;
  if (*normalizer > acc_t(0)) return;  // set: nothing to form
  __shared__ acc_t sm[kMaxWarps], ss[kMaxWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t r = u / chunks, j0 = (u % chunks) * kCrdChunk, j1 = min(k1, j0 + kCrdChunk);
    acc_t m = neg_inf<acc_t>(), s = 0;
    for (int64_t j = j0 + warp; j < j1; j += warps) {
      const int64_t row = index[r * k1 + j];
      CUDA_KERNEL_ASSERT(row >= 0 && row < n_bank);
      const acc_t x = warp_dot<scalar_t, acc_t>(memory + row * d, anchor + r * d, d, lane) * inv_t;
      lse_merge(m, s, x, acc_t(1));
    }
    if (lane == 0) {
      sm[warp] = m;
      ss[warp] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      acc_t bm = neg_inf<acc_t>(), bs = 0;
      for (int w = 0; w < warps; ++w) lse_merge(bm, bs, sm[w], ss[w]);
      part[2 * u] = bm;
      part[2 * u + 1] = bs;
    }
    __syncthreads();
  }
}

// log Z as log_z[0] + log_z[1] (the largest score or the given Z's log rounded, then the small rest: see
// csrc/cpu/crd_nce.cpp) and Z into z_out: the given normaliser when set, else from the units' partials.
template <typename acc_t>
__global__ void crd_normalizer_kernel(const acc_t* normalizer, const acc_t* __restrict__ part, int64_t units,
                                      acc_t log_z_shift, acc_t* log_z, acc_t* z_out) {
  __shared__ acc_t sm[kFinalThreads], ss[kFinalThreads];
  const acc_t given = *normalizer;
  if (given > acc_t(0)) {
    if (threadIdx.x == 0) {
      const double lz = ::log(static_cast<double>(given));
      log_z[0] = static_cast<acc_t>(lz);
      log_z[1] = static_cast<acc_t>(lz - static_cast<double>(static_cast<acc_t>(lz)));
      *z_out = given;
    }
    return;
  }
  acc_t m = neg_inf<acc_t>(), s = 0;
  for (int64_t u = threadIdx.x; u < units; u += blockDim.x) lse_merge(m, s, part[2 * u], part[2 * u + 1]);
  sm[threadIdx.x] = m;
  ss[threadIdx.x] = s;
  __syncthreads();
  for (int step = blockDim.x / 2; step > 0; step >>= 1) {
    if (threadIdx.x < step) {
      acc_t a = sm[threadIdx.x], b = ss[threadIdx.x];
      lse_merge(a, b, sm[threadIdx.x + step], ss[threadIdx.x + step]);
      sm[threadIdx.x] = a;
      ss[threadIdx.x] = b;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const acc_t lo = ::log(ss[0]) + log_z_shift;
    log_z[0] = sm[0];
    log_z[1] = lo;
    *z_out = ::exp(sm[0] + lo);
  }
}

template <typename scalar_t>
__global__ void crd_nce_kernel(const scalar_t* __restrict__ anchor, const scalar_t* __restrict__ memory,
                               const int64_t* __restrict__ index, const at::opmath_type<scalar_t>* log_z_ptr,
                               int64_t units, int64_t chunks, int64_t k1, int64_t d, int64_t n_bank,
                               cn::NceConstants<at::opmath_type<scalar_t>> k, bool want_grad,
                               at::opmath_type<scalar_t>* __restrict__ loss_part,
                               at::opmath_type<scalar_t>* __restrict__ grad_part) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned char shared_raw[];
  acc_t* sg = reinterpret_cast<acc_t*>(shared_raw);  // (warps, d) gradient accumulators
  __shared__ acc_t sl[kMaxWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const acc_t log_z_hi = log_z_ptr[0], log_z_lo = log_z_ptr[1];
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t r = u / chunks, j0 = (u % chunks) * kCrdChunk, j1 = min(k1, j0 + kCrdChunk);
    acc_t* g = sg + warp * d;
    if (want_grad)
      for (int64_t c = lane; c < d; c += 32) g[c] = 0;
    acc_t total = 0;
    for (int64_t j = j0 + warp; j < j1; j += warps) {
      const int64_t row = index[r * k1 + j];
      CUDA_KERNEL_ASSERT(row >= 0 && row < n_bank);
      const scalar_t* mj = memory + row * d;
      const acc_t x = warp_dot<scalar_t, acc_t>(mj, anchor + r * d, d, lane) * k.inv_t;
      const auto t = cn::entry_term((x - log_z_hi) - log_z_lo, k.log_a, k.log_a_over_c, j == 0);
      total += t.value;
      if (want_grad) {
        const acc_t a = t.dx * k.inv_t;
        for (int64_t c = lane; c < d; c += 32) g[c] += a * acc_t(mj[c]);
      }
    }
    if (lane == 0) sl[warp] = total;
    __syncthreads();
    if (want_grad) {
      for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
        acc_t s = 0;
        for (int w = 0; w < warps; ++w) s += sg[w * d + c];
        grad_part[u * d + c] = s;
      }
    }
    if (threadIdx.x == 0) {
      acc_t s = 0;
      for (int w = 0; w < warps; ++w) s += sl[w];
      loss_part[u] = s;
    }
    __syncthreads();
  }
}

template <typename acc_t>
__global__ void crd_rows_kernel(const acc_t* __restrict__ loss_part, const acc_t* __restrict__ grad_part,
                                int64_t b, int64_t chunks, int64_t d, bool want_grad, acc_t* __restrict__ loss,
                                acc_t* __restrict__ grad) {
  for (int64_t r = blockIdx.x; r < b; r += gridDim.x) {
    if (threadIdx.x == 0) {
      acc_t s = 0;
      for (int64_t q = 0; q < chunks; ++q) s += loss_part[r * chunks + q];
      loss[r] = s;
    }
    if (want_grad) {
      for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
        acc_t s = 0;
        for (int64_t q = 0; q < chunks; ++q) s += grad_part[(r * chunks + q) * d + c];
        grad[r * d + c] = s;
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> crd_nce_cuda(const at::Tensor& anchor, const at::Tensor& memory,
                                                            const at::Tensor& index, const at::Tensor& normalizer,
                                                            double temperature, int64_t n_data, double eps,
                                                            bool anchor_grad) {
  const c10::cuda::CUDAGuard guard(anchor.device());
  auto c = cn::prepare_crd(anchor, memory, index, normalizer, temperature, n_data, eps, anchor_grad);
  if (c.b == 0) {
    c.z_out.copy_(c.normalizer);  // no batch: the normaliser stays as it was (unset stays unset)
    return {c.loss, c.z_out, c.grad};
  }
  const size_t acc_size = c.acc == at::kDouble ? 8 : 4;
  const int64_t per_warp = std::max<int64_t>(c.d, 1) * static_cast<int64_t>(acc_size);
  // without the gradient no shared accumulators are used, so any width runs
  const int warps = anchor_grad ? static_cast<int>(std::min<int64_t>(kMaxWarps, static_cast<int64_t>(kSharedBytes) /
                                                                                   per_warp))
                                : kMaxWarps;
  TORCH_CHECK(warps >= 1, "kdops.crd_nce: on CUDA the anchor's gradient needs the width d to be at most ",
              kSharedBytes / acc_size, " in ", c.acc, ", got ", c.d);
  const int threads = 32 * warps;
  const int64_t chunks = (c.k1 + kCrdChunk - 1) / kCrdChunk;
  const int64_t units = c.b * chunks;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(units, kMaxGrid));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto opts = c.anchor.options().dtype(c.acc);
  at::Tensor part = at::empty({2 * units}, opts);
  at::Tensor log_z = at::empty({2}, opts);
  at::Tensor loss_part = at::empty({units}, opts);
  at::Tensor grad_part = at::empty({anchor_grad ? units * c.d : 0}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.anchor.scalar_type(), "crd_nce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto k = cn::nce_constants<acc_t>(c.b, c.k1 - 1, n_data, temperature, eps);
    const scalar_t* a = c.anchor.const_data_ptr<scalar_t>();
    const scalar_t* mem = c.memory.const_data_ptr<scalar_t>();
    const int64_t* idx = c.index.const_data_ptr<int64_t>();
    const acc_t* zin = c.normalizer.const_data_ptr<acc_t>();
    crd_lse_kernel<scalar_t><<<grid, threads, 0, stream>>>(a, mem, idx, zin, units, chunks, c.k1, c.d, c.n_bank,
                                                          k.inv_t, part.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    crd_normalizer_kernel<acc_t><<<1, kFinalThreads, 0, stream>>>(zin, part.const_data_ptr<acc_t>(), units,
                                                                   k.log_z_shift, log_z.mutable_data_ptr<acc_t>(),
                                                                   c.z_out.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const size_t shared = anchor_grad ? static_cast<size_t>(warps) * static_cast<size_t>(per_warp) : 0;
    crd_nce_kernel<scalar_t><<<grid, threads, shared, stream>>>(
        a, mem, idx, log_z.const_data_ptr<acc_t>(), units, chunks, c.k1, c.d, c.n_bank, k, anchor_grad,
        loss_part.mutable_data_ptr<acc_t>(), anchor_grad ? grad_part.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const unsigned row_grid = static_cast<unsigned>(std::min<int64_t>(c.b, kMaxGrid));
    crd_rows_kernel<acc_t><<<row_grid, 128, 0, stream>>>(
        loss_part.const_data_ptr<acc_t>(), anchor_grad ? grad_part.const_data_ptr<acc_t>() : nullptr, c.b, chunks,
        c.d, anchor_grad, c.loss.mutable_data_ptr<acc_t>(), anchor_grad ? c.grad.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {c.loss, c.z_out, c.grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("crd_nce", &crd_nce_cuda);
}

}  // namespace cuda
}  // namespace kdops
