// CUDA kernels of the fused PKT epilogue on the raw Gram matrices (see kdops/pkt_math.h): one block per row
// with CUB block sums for the affinity row sums, the loss terms and the dot products the row normalisation's
// gradient needs; then one thread per column for the column sums that carry the row norms' gradient to the
// diagonal. Same math as the CPU kernels.
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
#include "kdops/pkt_math.h"

namespace kdops {
namespace cuda {
namespace {

constexpr int kThreads = 256;

using pkt::Pair;

template <typename T>
struct PairSum {
  __device__ Pair<T> operator()(const Pair<T>& x, const Pair<T>& y) const { return pkt::pair_sum(x, y); }
};

// Mode 0: rows[i] = the row's loss terms. Mode 1: the direct part of dL/dG (times cf) for the wanted sides
// and the row sums rho of dG o G. The per-thread passes are kdops/pkt_math.h's *_share, emulated on the host
// by csrc/cpu/pkt_emulate.cpp.
template <typename T, int Mode>
__global__ void __launch_bounds__(kThreads)
    pkt_rows_kernel(const T* __restrict__ gs, const T* __restrict__ gt, int64_t b, T eps, T cf, bool want_s,
                    bool want_t, T* __restrict__ rows, T* __restrict__ dgs, T* __restrict__ dgt,
                    T* __restrict__ rho_s, T* __restrict__ rho_t) {
  using Reduce = cub::BlockReduce<Pair<T>, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ Pair<T> shared;
  const int64_t i = blockIdx.x;
  Pair<T> r = pkt::affinity_share(gs, gt, b, eps, i, threadIdx.x, kThreads);
  r = Reduce(tmp).Reduce(r, PairSum<T>());
  if (threadIdx.x == 0) shared = r;
  __syncthreads();
  const T irs = T(1) / shared.a, irt = T(1) / shared.b;
  __syncthreads();
  Pair<T> acc = pkt::term_share<Mode>(gs, gt, b, eps, i, irs, irt, threadIdx.x, kThreads);
  acc = Reduce(tmp).Reduce(acc, PairSum<T>());
  if (threadIdx.x == 0) shared = acc;
  __syncthreads();
  if (Mode == 0) {
    if (threadIdx.x == 0) rows[i] = shared.a;
    return;
  }
  const T ws = shared.a, wt = shared.b;
  __syncthreads();
  Pair<T> rho = pkt::grad_share(gs, gt, b, eps, cf, want_s, want_t, i, irs, irt, ws, wt, threadIdx.x, kThreads,
                                dgs, dgt);
  rho = Reduce(tmp).Reduce(rho, PairSum<T>());
  if (threadIdx.x == 0) {
    rho_s[i] = rho.a;
    rho_t[i] = rho.b;
  }
}

// One thread per column j of one side: kappa_j = sum_i dG_ij G_ij, then the norms' term on dG_jj.
template <typename T>
__global__ void __launch_bounds__(kThreads) pkt_diag_kernel(const T* __restrict__ g, int64_t b, T eps,
                                                            const T* __restrict__ rho, T* __restrict__ dg) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= b) return;
  pkt::diag_column(g, b, eps, rho, dg, j);
}

struct CudaDev {
  static at::Tensor forward(const at::Tensor& gs, const at::Tensor& gt, double eps) {
    const int64_t b = gs.size(0);
    at::Tensor rows = at::empty({b}, gs.options());
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "pkt_gram_cuda", [&] {
      pkt_rows_kernel<scalar_t, 0><<<b, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          gs.const_data_ptr<scalar_t>(), gt.const_data_ptr<scalar_t>(), b, scalar_t(eps), scalar_t(0), false, false,
          rows.mutable_data_ptr<scalar_t>(), nullptr, nullptr, nullptr, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return rows.sum() / (double(b) * double(b));
  }

  static void backward(const at::Tensor& gs, const at::Tensor& gt, bool need_s, bool need_t, at::Tensor& dgs,
                       at::Tensor& dgt, double eps) {
    const int64_t b = gs.size(0);
    const double cf = 1.0 / (double(b) * double(b));
    at::Tensor rho = at::empty({2, b}, gs.options());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "pkt_gram_backward_cuda", [&] {
      using T = scalar_t;
      T* rp = rho.mutable_data_ptr<T>();
      pkt_rows_kernel<T, 1><<<b, kThreads, 0, stream>>>(gs.const_data_ptr<T>(), gt.const_data_ptr<T>(), b, T(eps),
                                                        T(cf), need_s, need_t, nullptr, dgs.mutable_data_ptr<T>(),
                                                        dgt.mutable_data_ptr<T>(), rp, rp + b);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const unsigned blocks = static_cast<unsigned>((b + kThreads - 1) / kThreads);
      if (need_s) {
        pkt_diag_kernel<T><<<blocks, kThreads, 0, stream>>>(gs.const_data_ptr<T>(), b, T(eps), rp,
                                                            dgs.mutable_data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (need_t) {
        pkt_diag_kernel<T><<<blocks, kThreads, 0, stream>>>(gt.const_data_ptr<T>(), b, T(eps), rp + b,
                                                            dgt.mutable_data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
};

at::Tensor pkt_gram_cuda(const at::Tensor& gs, const at::Tensor& gt, double eps) {
  const c10::cuda::CUDAGuard guard(gs.device());
  gram::check_nonnegative("kdops.pkt_gram", "eps", eps);
  return gram::forward<CudaDev>("kdops.pkt_gram", gs, gt, eps);
}

std::tuple<at::Tensor, at::Tensor> pkt_gram_backward_cuda(const at::Tensor& grad, const at::Tensor& gs,
                                                          const at::Tensor& gt, double eps, bool need_s,
                                                          bool need_t) {
  const c10::cuda::CUDAGuard guard(gs.device());
  gram::check_nonnegative("kdops.pkt_gram_backward", "eps", eps);
  return gram::backward<CudaDev>("kdops.pkt_gram_backward", grad, gs, gt, need_s, need_t, eps);
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("pkt_gram", &kdops::cuda::pkt_gram_cuda);
  m.impl("pkt_gram_backward", &kdops::cuda::pkt_gram_backward_cuda);
}
