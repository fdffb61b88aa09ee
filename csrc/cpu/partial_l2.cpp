// CPU kernels of the Overhaul's margin ReLU and fused partial L2 (forward and backward).
// Maps are (b, C, *spatial), processed as b*C planes of HW contiguous elements sharing one margin.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "cpu/cpu_utils.h"
#include "kdops/feature_host.h"
#include "kdops/feature_math.h"
#include "kdops/host_common.h"

namespace kdops {
namespace cpu {
namespace {

int64_t plane_grain(int64_t hw) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(hw, 1));
}

// Planes [p0, p1) in one call: the loops convert 16-bit inputs in registers and each plane's margin is a
// scalar, so small planes (8x8) cost no per-plane call or conversion pass (they did: 20-30% of the time).
// Planes are summed in chunks of kChunk elements so fp32 partial sums stay short. With WS / WT the same
// loop writes the gradients of scale * sum (partial_l2_with_grad).
template <typename scalar_t, typename acc_t, bool WS, bool WT>
KDOPS_CPU_CLONES void planes_partial_l2(const scalar_t* s, const scalar_t* t, const acc_t* m, int64_t C,
                                        int64_t hw, int64_t p0, int64_t p1, acc_t scale, acc_t* out, scalar_t* gs,
                                        scalar_t* gt) {
  for (int64_t p = p0; p < p1; ++p) {
    const scalar_t* sp = s + p * hw;
    const scalar_t* tp = t + p * hw;
    scalar_t* gsp = WS ? gs + p * hw : nullptr;
    scalar_t* gtp = WT ? gt + p * hw : nullptr;
    const acc_t mp = m[p % C];
    acc_t total = 0;
    for (int64_t c0 = 0; c0 < hw; c0 += kChunk) {
      const int64_t c1 = std::min(hw, c0 + kChunk);
      acc_t sum = 0;
      if constexpr (WS || WT) {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = c0; i < c1; ++i) {
          acc_t a, b;
          sum += feature::partial_l2_term_grad<acc_t>(to_acc(sp[i]), to_acc(tp[i]), mp, scale, a, b);
          if (WS) gsp[i] = from_acc<scalar_t>(a);
          if (WT) gtp[i] = from_acc<scalar_t>(b);
        }
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = c0; i < c1; ++i) sum += feature::partial_l2_term<acc_t>(to_acc(sp[i]), to_acc(tp[i]), mp);
      }
      total += sum;
    }
    out[p] = total;
  }
}

template <typename scalar_t, typename acc_t, bool WS, bool WT>
KDOPS_CPU_CLONES void planes_partial_l2_grad(const scalar_t* s, const scalar_t* t, const acc_t* m, const acc_t* g,
                                             int64_t C, int64_t hw, int64_t p0, int64_t p1, scalar_t* gs,
                                             scalar_t* gt) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t o = p * hw;
    const acc_t mp = m[p % C], gp = g[p / C];
#pragma omp simd
    for (int64_t i = o; i < o + hw; ++i) {
      acc_t a, b;
      feature::partial_l2_grad<acc_t>(to_acc(s[i]), to_acc(t[i]), mp, gp, a, b);
      if (WS) gs[i] = from_acc<scalar_t>(a);
      if (WT) gt[i] = from_acc<scalar_t>(b);
    }
  }
}

// Per-sample sums, and with student_grad / teacher_grad the gradients of scale * sum in the same pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_l2_impl(const char* op, const at::Tensor& student,
                                                               const at::Tensor& teacher, const at::Tensor& margin,
                                                               double scale, bool student_grad, bool teacher_grad) {
  const feature::MapGradCall c =
      feature::prepare_maps_with_grad(op, student, teacher, margin, student_grad, teacher_grad);
  const at::Tensor &s = c.s, &t = c.t, &m = c.m, &gs = c.gs, &gt = c.gt;
  const int64_t C = c.C, planes = c.planes, hw = c.hw;
  at::Tensor plane_sums = at::empty({c.B, C}, m.options());
  if (planes == 0) return {plane_sums.sum(1), gs, gt};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "partial_l2_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const acc_t* mp = m.const_data_ptr<acc_t>();
    acc_t* out = plane_sums.mutable_data_ptr<acc_t>();
    scalar_t* gsp = student_grad ? gs.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gtp = teacher_grad ? gt.mutable_data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto ws, auto wt) {
      constexpr bool WS = decltype(ws)::value, WT = decltype(wt)::value;
      at::parallel_for(0, planes, plane_grain(hw), [&](int64_t p0, int64_t p1) {
        planes_partial_l2<scalar_t, acc_t, WS, WT>(sp, tp, mp, C, hw, p0, p1, acc_t(scale), out, gsp, gtp);
      });
    };
    if (student_grad || teacher_grad) {
      dispatch_grad_flags(student_grad, teacher_grad, run);
    } else {
      run(std::false_type{}, std::false_type{});
    }
  });
  return {plane_sums.sum(1), gs, gt};
}

at::Tensor partial_l2_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& margin) {
  return std::get<0>(partial_l2_impl("kdops.partial_l2", student, teacher, margin, 1.0, false, false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_l2_with_grad_cpu(const at::Tensor& student,
                                                                        const at::Tensor& teacher,
                                                                        const at::Tensor& margin, double scale,
                                                                        bool student_grad, bool teacher_grad) {
  return partial_l2_impl("kdops.partial_l2_with_grad", student, teacher, margin, scale, student_grad, teacher_grad);
}

std::tuple<at::Tensor, at::Tensor> partial_l2_backward_cpu(const at::Tensor& grad, const at::Tensor& student,
                                                           const at::Tensor& teacher, const at::Tensor& margin,
                                                           bool student_grad, bool teacher_grad) {
  const feature::MapGradCall c =
      feature::prepare_maps_backward(grad, student, teacher, margin, student_grad, teacher_grad);
  const at::Tensor &s = c.s, &t = c.t, &m = c.m, &g = c.g;
  const at::Tensor &gs = c.gs, &gt = c.gt;
  const int64_t C = c.C, planes = c.planes, hw = c.hw;
  if (planes == 0 || hw == 0 || !(student_grad || teacher_grad)) return {gs, gt};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "partial_l2_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const acc_t* mp = m.const_data_ptr<acc_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    scalar_t* gsp = student_grad ? gs.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gtp = teacher_grad ? gt.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_grad_flags(student_grad, teacher_grad, [&](auto ws, auto wt) {
      constexpr bool WS = decltype(ws)::value, WT = decltype(wt)::value;
      at::parallel_for(0, planes, plane_grain(hw), [&](int64_t p0, int64_t p1) {
        planes_partial_l2_grad<scalar_t, acc_t, WS, WT>(sp, tp, mp, gp, C, hw, p0, p1, gsp, gtp);
      });
    });
  });
  return {gs, gt};
}

template <typename scalar_t, typename acc_t, bool Backward>
KDOPS_CPU_CLONES void planes_margin_relu(const scalar_t* grad, const scalar_t* x, const acc_t* m, int64_t C,
                                         int64_t hw, int64_t p0, int64_t p1, scalar_t* out) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t o = p * hw;
    const acc_t mp = m[p % C];
#pragma omp simd
    for (int64_t i = o; i < o + hw; ++i) {
      const acc_t xi = to_acc(x[i]);
      out[i] = from_acc<scalar_t>(Backward ? (xi > mp ? to_acc(grad[i]) : acc_t(0)) : feature::margin_relu(xi, mp));
    }
  }
}

template <bool Backward>
at::Tensor margin_relu_impl(const at::Tensor* grad, const at::Tensor& x_in, const at::Tensor& margin) {
  const feature::MarginReluCall c = feature::prepare_margin_relu(grad, x_in, margin);
  const at::Tensor &x = c.x, &m = c.m, &g = c.g, &out = c.out;
  const int64_t C = c.C, planes = c.planes, hw = c.hw;
  if (planes == 0 || hw == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "margin_relu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = Backward ? g.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* mp = m.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, planes, plane_grain(hw), [&](int64_t p0, int64_t p1) {
      planes_margin_relu<scalar_t, acc_t, Backward>(gp, xp, mp, C, hw, p0, p1, op);
    });
  });
  return out;
}

at::Tensor margin_relu_cpu(const at::Tensor& x, const at::Tensor& margin) {
  return margin_relu_impl<false>(nullptr, x, margin);
}

at::Tensor margin_relu_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& margin) {
  return margin_relu_impl<true>(&grad, x, margin);
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("partial_l2", &kdops::cpu::partial_l2_cpu);
  m.impl("partial_l2_backward", &kdops::cpu::partial_l2_backward_cpu);
  m.impl("partial_l2_with_grad", &kdops::cpu::partial_l2_with_grad_cpu);
  m.impl("margin_relu", &kdops::cpu::margin_relu_cpu);
  m.impl("margin_relu_backward", &kdops::cpu::margin_relu_backward_cpu);
}
