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

// The loops, in two builds: target clones for every CPU, and 512-bit AVX-512 for 16-bit maps (see cpu_utils.h).
namespace clones {
#define KDOPS_LOOP KDOPS_CPU_CLONES
#include "cpu/partial_l2_loops.inc"
#undef KDOPS_LOOP
}  // namespace clones

namespace wide {
#define KDOPS_LOOP KDOPS_CPU_WIDE
#include "cpu/partial_l2_loops.inc"
#undef KDOPS_LOOP
}  // namespace wide

// Whether a map loop takes the 512-bit build: 16-bit maps with planes of >= 64 elements when the loop
// writes a map, >= 128 when it only reads (the forward). On shorter planes (7x7) the wide vector loop barely
// runs and that build was 2-3x slower than the clones; at 8x8 it won only where it stores.
template <typename scalar_t>
bool wide_map_loop(int64_t hw, bool writes = true) {
  return sizeof(scalar_t) == 2 && hw >= (writes ? 64 : 128) && cpu_has_wide_build();
}

// Per-sample sums, and with student_grad / teacher_grad the gradients of scale * sum in the same pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_l2_impl(const char* op, const at::Tensor& student,
                                                               const at::Tensor& teacher, const at::Tensor& margin,
                                                               double scale, bool student_grad, bool teacher_grad) {
  const feature::MapGradCall c =
      feature::prepare_maps_with_grad(op, student, teacher, margin, student_grad, teacher_grad);
  advise_huge_pages(c.gs);
  advise_huge_pages(c.gt);
  const at::Tensor &s = c.s, &t = c.t, &m = c.m, &gs = c.gs, &gt = c.gt;
  const int64_t C = c.C, planes = c.planes, hw = c.hw;
  at::Tensor plane_sums = at::empty({c.B, C}, m.options());
  if (planes == 0) return {plane_sums.sum(1), gs, gt};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "partial_l2_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool wide = wide_map_loop<scalar_t>(hw, student_grad || teacher_grad);
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const acc_t* mp = m.const_data_ptr<acc_t>();
    acc_t* out = plane_sums.mutable_data_ptr<acc_t>();
    scalar_t* gsp = student_grad ? gs.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gtp = teacher_grad ? gt.mutable_data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto ws, auto wt) {
      constexpr bool WS = decltype(ws)::value, WT = decltype(wt)::value;
      at::parallel_for(0, planes, plane_grain(hw), [&](int64_t p0, int64_t p1) {
        auto loop = wide ? wide::planes_partial_l2<scalar_t, acc_t, WS, WT>
                         : clones::planes_partial_l2<scalar_t, acc_t, WS, WT>;
        loop(sp, tp, mp, C, hw, p0, p1, acc_t(scale), out, gsp, gtp);
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
  advise_huge_pages(c.gs);
  advise_huge_pages(c.gt);
  const at::Tensor &s = c.s, &t = c.t, &m = c.m, &g = c.g;
  const at::Tensor &gs = c.gs, &gt = c.gt;
  const int64_t C = c.C, planes = c.planes, hw = c.hw;
  if (planes == 0 || hw == 0 || !(student_grad || teacher_grad)) return {gs, gt};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "partial_l2_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool wide = wide_map_loop<scalar_t>(hw);
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const acc_t* mp = m.const_data_ptr<acc_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    scalar_t* gsp = student_grad ? gs.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gtp = teacher_grad ? gt.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_grad_flags(student_grad, teacher_grad, [&](auto ws, auto wt) {
      constexpr bool WS = decltype(ws)::value, WT = decltype(wt)::value;
      at::parallel_for(0, planes, plane_grain(hw), [&](int64_t p0, int64_t p1) {
        auto loop = wide ? wide::planes_partial_l2_grad<scalar_t, acc_t, WS, WT>
                         : clones::planes_partial_l2_grad<scalar_t, acc_t, WS, WT>;
        loop(sp, tp, mp, gp, C, hw, p0, p1, gsp, gtp);
      });
    });
  });
  return {gs, gt};
}

template <bool Backward>
at::Tensor margin_relu_impl(const at::Tensor* grad, const at::Tensor& x_in, const at::Tensor& margin) {
  const feature::MarginReluCall c = feature::prepare_margin_relu(grad, x_in, margin);
  advise_huge_pages(c.out);
  const at::Tensor &x = c.x, &m = c.m, &g = c.g, &out = c.out;
  const int64_t C = c.C, planes = c.planes, hw = c.hw;
  if (planes == 0 || hw == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "margin_relu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool wide = wide_map_loop<scalar_t>(hw);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = Backward ? g.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* mp = m.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, planes, plane_grain(hw), [&](int64_t p0, int64_t p1) {
      auto loop = wide ? wide::planes_margin_relu<scalar_t, acc_t, Backward>
                       : clones::planes_margin_relu<scalar_t, acc_t, Backward>;
      loop(gp, xp, mp, C, hw, p0, p1, op);
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
