// CUDA kernels of the fused FKD epilogue (see kdops/fkd_math.h): one block per row with a CUB block sum for
// the squared kernel differences (or, backward, the row sum the norms' gradient needs), then one thread per
// row for the diagonal's terms. Same math as the CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <tuple>

#include "kdops/fkd_math.h"
#include "kdops/gram_host.h"

namespace kdops {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Mode 0: rows[i] = sum_j (rho_ij - K_ij)^2 off the diagonal and fr[i] the row's regularisation term.
// Mode 1: dG (direct part, times cf) and dK of row i, and rows[i] = sum_j dG_ij G_ij. The per-thread work is
// kdops/fkd_math.h's row_share, emulated on the host by csrc/cpu/fkd_emulate.cpp.
template <typename T, int Mode>
__global__ void __launch_bounds__(kThreads)
    fkd_rows_kernel(const T* __restrict__ g, const T* __restrict__ k, int64_t b, bool cosine, int power, T cf,
                    bool want_s, bool want_t, T* __restrict__ rows, T* __restrict__ fr, T* __restrict__ dg,
                    T* __restrict__ dk) {
  using Reduce = cub::BlockReduce<T, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t i = blockIdx.x;
  T acc = fkd::row_share<Mode>(g, k, b, cosine, cf, want_s, want_t, i, threadIdx.x, kThreads, dg, dk);
  acc = Reduce(tmp).Sum(acc);
  if (threadIdx.x == 0) {
    rows[i] = acc;
    if (Mode == 0) fr[i] = fkd::row_fr(g, b, power, i);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fkd_diag_kernel(const T* __restrict__ g, int64_t b, bool cosine,
                                                            int power, T fr_w, const T* __restrict__ rho,
                                                            T* __restrict__ dg) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= b) return;
  fkd::diag_entry(g, b, cosine, power, fr_w, rho, dg, i);
}

struct CudaDev {
  static at::Tensor forward(const at::Tensor& gs, const at::Tensor& kt, bool cosine, double fr_weight,
                            int64_t fr_power) {
    const int64_t b = gs.size(0);
    at::Tensor rows = at::empty({2, b}, gs.options());
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "fkd_gram_cuda", [&] {
      scalar_t* rp = rows.mutable_data_ptr<scalar_t>();
      fkd_rows_kernel<scalar_t, 0><<<b, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          gs.const_data_ptr<scalar_t>(), kt.const_data_ptr<scalar_t>(), b, cosine, int(fr_power), scalar_t(0),
          false, false, rp, rp + b, nullptr, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return rows[0].sum() / (double(b) * double(b - 1)) + rows[1].sum() * (fr_weight / double(b));
  }

  static void backward(const at::Tensor& gs, const at::Tensor& kt, bool need_s, bool need_t, at::Tensor& dgs,
                       at::Tensor& dkt, bool cosine, double fr_weight, int64_t fr_power) {
    const int64_t b = gs.size(0);
    at::Tensor rho = at::empty({b}, gs.options());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "fkd_gram_backward_cuda", [&] {
      using T = scalar_t;
      fkd_rows_kernel<T, 1><<<b, kThreads, 0, stream>>>(
          gs.const_data_ptr<T>(), kt.const_data_ptr<T>(), b, cosine, int(fr_power),
          T(1.0 / (double(b) * double(b - 1))), need_s, need_t, rho.mutable_data_ptr<T>(), nullptr,
          dgs.mutable_data_ptr<T>(), dkt.mutable_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_s) {
        fkd_diag_kernel<T><<<static_cast<unsigned>((b + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
            gs.const_data_ptr<T>(), b, cosine, int(fr_power), T(fr_weight / double(b)), rho.const_data_ptr<T>(),
            dgs.mutable_data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
};

at::Tensor fkd_gram_cuda(const at::Tensor& gs, const at::Tensor& kt, bool cosine, double fr_weight,
                         int64_t fr_power) {
  const c10::cuda::CUDAGuard guard(gs.device());
  gram::check_fkd_args("kdops.fkd_gram", gs, fr_weight, fr_power);
  return gram::forward<CudaDev>("kdops.fkd_gram", gs, kt, cosine, fr_weight, fr_power);
}

std::tuple<at::Tensor, at::Tensor> fkd_gram_backward_cuda(const at::Tensor& grad, const at::Tensor& gs,
                                                          const at::Tensor& kt, bool cosine, double fr_weight,
                                                          int64_t fr_power, bool need_s, bool need_t) {
  const c10::cuda::CUDAGuard guard(gs.device());
  gram::check_fkd_args("kdops.fkd_gram_backward", gs, fr_weight, fr_power);
  return gram::backward<CudaDev>("kdops.fkd_gram_backward", grad, gs, kt, need_s, need_t, cosine, fr_weight,
                                 fr_power);
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("fkd_gram", &kdops::cuda::fkd_gram_cuda);
  m.impl("fkd_gram_backward", &kdops::cuda::fkd_gram_backward_cuda);
}
