// CUDA kernels of the fused KD divergences (kd_div and kd_div_backward).
//
// One block per row. Forward: each thread folds its strided share of the row into an online log-sum-exp
// state (kd_math.h), CUB merges the states across the block, and thread 0 writes the row's loss and stats
// (JSD makes a second pass once the normalisers are known). Backward: every thread derives the row's
// gradient constants from the saved stats and writes its share of the gradient(s).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include "kdops/kd_host.h"
#include "kdops/kd_math.h"

namespace kdops {
namespace cuda {
namespace {

using kd::Divergence;
using kd::RowState;

constexpr int kBlock = 256;

template <typename acc_t>
struct MergeStates {
  acc_t inv_t;
  __device__ RowState<acc_t> operator()(const RowState<acc_t>& a, const RowState<acc_t>& b) const {
    return kd::merge(a, b, inv_t);
  }
};

template <typename acc_t>
struct Pair {
  acc_t a, b;
};

struct SumPairs {
  template <typename acc_t>
  __device__ Pair<acc_t> operator()(const Pair<acc_t>& x, const Pair<acc_t>& y) const {
    return {x.a + y.a, x.b + y.b};
  }
};

template <typename scalar_t, Divergence D>
__global__ void __launch_bounds__(kBlock) kd_div_forward_kernel(const scalar_t* __restrict__ student,
                                                                const scalar_t* __restrict__ teacher,
                                                                const int64_t* __restrict__ target, int64_t C,
                                                                at::opmath_type<scalar_t> inv_t,
                                                                at::opmath_type<scalar_t> w1,
                                                                at::opmath_type<scalar_t> w2, int64_t ignore_index,
                                                                at::opmath_type<scalar_t> scale,
                                                                scalar_t* __restrict__ loss,
                                                                at::opmath_type<scalar_t>* __restrict__ stats) {
  using acc_t = at::opmath_type<scalar_t>;
  using StateReduce = cub::BlockReduce<RowState<acc_t>, kBlock>;
  using PairReduce = cub::BlockReduce<Pair<acc_t>, kBlock>;
  __shared__ union {
    typename StateReduce::TempStorage state;
    typename PairReduce::TempStorage pair;
  } tmp;
  __shared__ acc_t row_stats[kd::kNumStats];

  const int64_t r = blockIdx.x;
  acc_t* st_row = stats + r * kd::kNumStats;
  const int64_t y = target != nullptr ? target[r] : -1;
  if (target != nullptr && y == ignore_index) {
    if (threadIdx.x == 0) loss[r] = scalar_t(0);
    if (threadIdx.x < kd::kNumStats) st_row[threadIdx.x] = acc_t(0);
    return;
  }
  if (D == Divergence::DKD) CUDA_KERNEL_ASSERT(y >= 0 && y < C && "kd_div: target out of range [0, C)");
  const scalar_t* s = student + r * C;
  const scalar_t* t = teacher + r * C;
  const int64_t skip = D == Divergence::DKD ? y : -1;

  RowState<acc_t> state = RowState<acc_t>::empty();
  for (int64_t k = threadIdx.x; k < C; k += kBlock) {
    if (k != skip) kd::push(state, acc_t(s[k]), acc_t(t[k]), inv_t);
  }
  state = StateReduce(tmp.state).Reduce(state, MergeStates<acc_t>{inv_t});

  if (threadIdx.x == 0) {
    const acc_t xs_y = skip >= 0 ? acc_t(s[skip]) : acc_t(0);
    const acc_t xt_y = skip >= 0 ? acc_t(t[skip]) : acc_t(0);
    const acc_t value = kd::finish_row<D>(state, inv_t, w1, w2, xs_y, xt_y, row_stats);
    if (D != Divergence::JSD) {
      loss[r] = static_cast<scalar_t>(value * scale);
      for (int i = 0; i < kd::kNumStats; ++i) st_row[i] = row_stats[i];
    }
  }
  if (D == Divergence::JSD) {
    __syncthreads();  // row_stats complete; tmp free again
    Pair<acc_t> p{acc_t(0), acc_t(0)};
    for (int64_t k = threadIdx.x; k < C; k += kBlock) {
      kd::jsd_accumulate(acc_t(s[k]), acc_t(t[k]), row_stats, inv_t, w1, w2, p.a, p.b);
    }
    p = PairReduce(tmp.pair).Reduce(p, SumPairs{});
    if (threadIdx.x == 0) {
      loss[r] = static_cast<scalar_t>(kd::jsd_finish(p.a, p.b, w1, row_stats) * scale);
      for (int i = 0; i < kd::kNumStats; ++i) st_row[i] = row_stats[i];
    }
  }
}

template <typename scalar_t, Divergence D, bool WS, bool WT>
__global__ void __launch_bounds__(kBlock) kd_div_backward_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
    const int64_t* __restrict__ target, const at::opmath_type<scalar_t>* __restrict__ stats, int64_t C,
    at::opmath_type<scalar_t> inv_t, at::opmath_type<scalar_t> w1, at::opmath_type<scalar_t> w2,
    int64_t ignore_index, at::opmath_type<scalar_t> scale, scalar_t* __restrict__ grad_s,
    scalar_t* __restrict__ grad_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x;
  const int64_t y = target != nullptr ? target[r] : -1;
  scalar_t* gs_row = WS ? grad_s + r * C : nullptr;
  scalar_t* gt_row = WT ? grad_t + r * C : nullptr;
  if (target != nullptr && y == ignore_index) {
    for (int64_t k = threadIdx.x; k < C; k += kBlock) {
      if (WS) gs_row[k] = scalar_t(0);
      if (WT) gt_row[k] = scalar_t(0);
    }
    return;
  }
  if (D == Divergence::DKD) CUDA_KERNEL_ASSERT(y >= 0 && y < C && "kd_div_backward: target out of range [0, C)");
  const scalar_t* s = student + r * C;
  const scalar_t* t = teacher + r * C;
  const acc_t xs_y = D == Divergence::DKD ? acc_t(s[y]) : acc_t(0);
  const acc_t xt_y = D == Divergence::DKD ? acc_t(t[y]) : acc_t(0);
  const kd::GradRow<acc_t> g =
      kd::grad_row<D>(stats + r * kd::kNumStats, acc_t(grad[r]) * scale, inv_t, w1, w2, xs_y, xt_y);
  for (int64_t k = threadIdx.x; k < C; k += kBlock) {
    acc_t a, b;
    kd::grad_elem<D>(g, acc_t(s[k]), acc_t(t[k]), a, b);
    if (D == Divergence::DKD && k == y) {
      a = g.gs_y;
      b = g.gt_y;
    }
    if (WS) gs_row[k] = static_cast<scalar_t>(a);
    if (WT) gt_row[k] = static_cast<scalar_t>(b);
  }
}

std::tuple<at::Tensor, at::Tensor> kd_div_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                               const std::optional<at::Tensor>& target, double temperature,
                                               std::string_view divergence, double alpha, double beta,
                                               int64_t ignore_index, double scale) {
  const c10::cuda::CUDAGuard guard(student.device());
  kd::KdCall c = kd::prepare_forward(student, teacher, target, temperature, divergence, alpha, beta);
  if (c.N == 0 || c.C == 0) return {c.out0, c.out1};
  TORCH_CHECK(c.N <= std::numeric_limits<int32_t>::max(), "kdops.kd_div: too many rows for one launch: ", c.N);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.s.scalar_type(), "kd_div_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kd::dispatch_divergence(c.div, [&](auto dc) {
      kd_div_forward_kernel<scalar_t, decltype(dc)::value><<<static_cast<unsigned>(c.N), kBlock, 0, stream>>>(
          c.s.const_data_ptr<scalar_t>(), c.t.const_data_ptr<scalar_t>(), c.target_ptr(), c.C,
          acc_t(1.0 / temperature), acc_t(c.w1), acc_t(c.w2), ignore_index, acc_t(scale),
          c.out0.mutable_data_ptr<scalar_t>(),
          c.out1.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {c.out0, c.out1};
}

std::tuple<at::Tensor, at::Tensor> kd_div_backward_cuda(const at::Tensor& grad, const at::Tensor& student,
                                                        const at::Tensor& teacher,
                                                        const std::optional<at::Tensor>& target,
                                                        const at::Tensor& stats, double temperature,
                                                        std::string_view divergence, double alpha, double beta,
                                                        int64_t ignore_index, bool student_grad, bool teacher_grad,
                                                        double scale) {
  const c10::cuda::CUDAGuard guard(student.device());
  kd::KdCall c = kd::prepare_backward(grad, student, teacher, target, stats, temperature, divergence, alpha, beta,
                                      student_grad, teacher_grad);
  if (c.N == 0 || c.C == 0 || !(student_grad || teacher_grad)) return {c.out0, c.out1};
  TORCH_CHECK(c.N <= std::numeric_limits<int32_t>::max(), "kdops.kd_div_backward: too many rows for one launch: ",
              c.N);
  const at::Tensor g = grad.contiguous(), st = stats.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.s.scalar_type(), "kd_div_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kd::dispatch_divergence(c.div, [&](auto dc) {
      dispatch_grad_flags(student_grad, teacher_grad, [&](auto ws, auto wt) {
        kd_div_backward_kernel<scalar_t, decltype(dc)::value, decltype(ws)::value, decltype(wt)::value>
            <<<static_cast<unsigned>(c.N), kBlock, 0, stream>>>(
                g.const_data_ptr<scalar_t>(), c.s.const_data_ptr<scalar_t>(), c.t.const_data_ptr<scalar_t>(),
                c.target_ptr(), st.const_data_ptr<acc_t>(), c.C, acc_t(1.0 / temperature), acc_t(c.w1),
                acc_t(c.w2), ignore_index, acc_t(scale), student_grad ? c.out0.mutable_data_ptr<scalar_t>() : nullptr,
                teacher_grad ? c.out1.mutable_data_ptr<scalar_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {c.out0, c.out1};
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("kd_div", &kdops::cuda::kd_div_cuda);
  m.impl("kd_div_backward", &kdops::cuda::kd_div_backward_cuda);
}
