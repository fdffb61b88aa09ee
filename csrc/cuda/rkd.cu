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

#include <tuple>

#include "kdops/rkd_host.h"
#include "kdops/rkd_math.h"

namespace kdops {
namespace cuda {
namespace {

constexpr int kThreads = 128;

// Mode 0: out[a*b + j] = sum_k huber. Mode 1: the four row sums (see rkd_host.h) into out0..out3.
template <typename T, int Mode>
__global__ void __launch_bounds__(kThreads)
    rows_kernel(const T* __restrict__ gs, const T* __restrict__ gt, const T* __restrict__ us,
                const T* __restrict__ ut, int64_t b, T c, T* __restrict__ out0, T* __restrict__ out1,
                T* __restrict__ out2, T* __restrict__ out3) {
  using Reduce = cub::BlockReduce<T, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t a = blockIdx.x / b, j = blockIdx.x % b;
  const T *gsj = gs + j * b, *gtj = gt + j * b, *gsa = gs + a * b, *gta = gt + a * b;
  const T *usa = us + a * b, *uta = ut + a * b;
  const T gs_aj = gsa[j], gs_aa = gsa[a], us_aj = usa[j], gt_aj = gta[j], gt_aa = gta[a], ut_aj = uta[j];
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (int64_t k = threadIdx.x; k < b; k += kThreads) {
    const T ps = rkd::psi(gsj[k], gs_aj, gsa[k], gs_aa, us_aj, usa[k]);
    const T pt = rkd::psi(gtj[k], gt_aj, gta[k], gt_aa, ut_aj, uta[k]);
    if (Mode == 0) {
      s0 += rkd::huber(ps - pt);
    } else {
      const T r = c * rkd::huber_grad(ps - pt);
      s0 += r * usa[k];
      s1 += r * ps;
      s2 -= r * uta[k];
      s3 -= r * pt;
    }
  }
  const int64_t o = a * b + j;
  s0 = Reduce(tmp).Sum(s0);
  if (threadIdx.x == 0) out0[o] = Mode == 0 ? s0 : s0 * us_aj;
  if (Mode == 0) return;
  __syncthreads();
  s1 = Reduce(tmp).Sum(s1);
  if (threadIdx.x == 0) out1[o] = s1;
  __syncthreads();
  s2 = Reduce(tmp).Sum(s2);
  if (threadIdx.x == 0) out2[o] = s2 * ut_aj;
  __syncthreads();
  s3 = Reduce(tmp).Sum(s3);
  if (threadIdx.x == 0) out3[o] = s3;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    cols_kernel(const T* __restrict__ gs, const T* __restrict__ gt, const T* __restrict__ us,
                const T* __restrict__ ut, int64_t b, T c, T* __restrict__ dgs, T* __restrict__ dgt) {
  const int64_t j = blockIdx.x;
  const T *gsj = gs + j * b, *gtj = gt + j * b;
  for (int64_t k = threadIdx.x; k < b; k += kThreads) {
    T acc_s = 0, acc_t = 0;
    for (int64_t a = 0; a < b; ++a) {
      const T *gsa = gs + a * b, *gta = gt + a * b, *usa = us + a * b, *uta = ut + a * b;
      const T ps = rkd::psi(gsj[k], gsa[j], gsa[k], gsa[a], usa[j], usa[k]);
      const T pt = rkd::psi(gtj[k], gta[j], gta[k], gta[a], uta[j], uta[k]);
      const T r = c * rkd::huber_grad(ps - pt);
      acc_s += r * usa[j] * usa[k];
      acc_t -= r * uta[j] * uta[k];
    }
    dgs[j * b + k] = acc_s;
    dgt[j * b + k] = acc_t;
  }
}

struct CudaDev {
  static at::Tensor forward(const at::Tensor& gs, const at::Tensor& gt, const at::Tensor& us, const at::Tensor& ut) {
    const int64_t b = gs.size(0);
    at::Tensor partial = at::empty({b * b}, gs.options());
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "rkd_angle_cuda", [&] {
      rows_kernel<scalar_t, 0><<<b * b, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
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
      rows_kernel<scalar_t, 1><<<b * b, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
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
