// CUDA kernels of the fused CC epilogue (see kdops/cc_math.h): one block per row with a CUB block sum for the
// squared kernel differences; the backward takes the norm from those row sums (ATen, on the device) and
// writes the gradients one thread per entry. Same math as the CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "kdops/cc_math.h"
#include "cuda/launch.h"
#include "kdops/gram_host.h"

namespace kdops {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) cc_rows_kernel(const T* __restrict__ gs, const T* __restrict__ gt,
                                                           int64_t b, T two_gamma, int order, T scale,
                                                           double* __restrict__ rows) {
  // the squares are summed in double: a float difference of C beyond 1.8e19 is representable, its square not
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t i = blockIdx.x;
  double acc = 0;
  for (int64_t j = threadIdx.x; j < b; j += kThreads) {
    T ds, dt;
    const T d = scale * (cc::series(gs[i * b + j], two_gamma, order, ds) -  //
                         cc::series(gt[i * b + j], two_gamma, order, dt));
    acc += double(d) * double(d);
  }
  acc = Reduce(tmp).Sum(acc);
  if (threadIdx.x == 0) rows[i] = acc;
}

// cf[0] = e^(-4 gamma) 2 gamma / (|D| b^2), 0 at D = 0 (the factors of C and dC/dg included)
template <typename T>
__global__ void __launch_bounds__(kThreads)
    cc_grad_kernel(const T* __restrict__ gs, const T* __restrict__ gt, int64_t total, T two_gamma, int order,
                   const T* __restrict__ cf, bool want_s, bool want_t, T* __restrict__ dgs,
                   T* __restrict__ dgt) {
  const T c = cf[0];
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += int64_t(gridDim.x) * kThreads) {
    T ds, dt;
    const T d = c * (cc::series(gs[e], two_gamma, order, ds) - cc::series(gt[e], two_gamma, order, dt));
    if (want_s) dgs[e] = d * ds;
    if (want_t) dgt[e] = -d * dt;
  }
}

at::Tensor row_sums(const at::Tensor& gs, const at::Tensor& gt, double gamma, int64_t order) {
  const int64_t b = gs.size(0);
  at::Tensor rows = at::empty({b}, gs.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "cc_gram_cuda", [&] {
    cc_rows_kernel<scalar_t><<<b, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        gs.const_data_ptr<scalar_t>(), gt.const_data_ptr<scalar_t>(), b, scalar_t(2 * gamma), int(order),
        scalar_t(std::exp(-2 * gamma)), rows.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return rows;
}

struct CudaDev {
  static at::Tensor forward(const at::Tensor& gs, const at::Tensor& gt, double gamma, int64_t order) {
    const int64_t b = gs.size(0);
    return (at::sqrt(row_sums(gs, gt, gamma, order).sum()) / (double(b) * double(b))).to(gs.scalar_type());
  }

  static void backward(const at::Tensor& gs, const at::Tensor& gt, bool need_s, bool need_t, at::Tensor& dgs,
                       at::Tensor& dgt, double gamma, int64_t order) {
    const int64_t b = gs.size(0), total = gs.numel();
    const at::Tensor norm = at::sqrt(row_sums(gs, gt, gamma, order).sum());
    const double factors = std::exp(-4 * gamma) * 2 * gamma;
    const at::Tensor cf =
        at::where(norm > 0, factors / (norm * (double(b) * double(b))), at::zeros_like(norm)).to(gs.scalar_type());
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "cc_gram_backward_cuda", [&] {
      cc_grad_kernel<scalar_t><<<blocks_for(total),
                                 kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          gs.const_data_ptr<scalar_t>(), gt.const_data_ptr<scalar_t>(), total, scalar_t(2 * gamma), int(order),
          cf.const_data_ptr<scalar_t>(), need_s, need_t,
          dgs.mutable_data_ptr<scalar_t>(), dgt.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

at::Tensor cc_gram_cuda(const at::Tensor& gs, const at::Tensor& gt, double gamma, int64_t order) {
  const c10::cuda::CUDAGuard guard(gs.device());
  gram::check_cc_args("kdops.cc_gram", gamma, order);
  return gram::forward<CudaDev>("kdops.cc_gram", gs, gt, gamma, order);
}

std::tuple<at::Tensor, at::Tensor> cc_gram_backward_cuda(const at::Tensor& grad, const at::Tensor& gs,
                                                         const at::Tensor& gt, double gamma, int64_t order,
                                                         bool need_s, bool need_t) {
  const c10::cuda::CUDAGuard guard(gs.device());
  gram::check_cc_args("kdops.cc_gram_backward", gamma, order);
  return gram::backward<CudaDev>("kdops.cc_gram_backward", grad, gs, gt, need_s, need_t, gamma, order);
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("cc_gram", &kdops::cuda::cc_gram_cuda);
  m.impl("cc_gram_backward", &kdops::cuda::cc_gram_backward_cuda);
}
