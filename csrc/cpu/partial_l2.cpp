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

template <typename acc_t>
KDOPS_CPU_CLONES acc_t chunk_partial_l2(const acc_t* s, const acc_t* t, int64_t n, acc_t m) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += feature::partial_l2_term(s[i], t[i], m);
  return sum;
}

template <typename acc_t, bool WS, bool WT>
KDOPS_CPU_CLONES void chunk_partial_l2_grad(const acc_t* s, const acc_t* t, int64_t n, acc_t m, acc_t g, acc_t* gs,
                                            acc_t* gt) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    acc_t a, b;
    feature::partial_l2_grad(s[i], t[i], m, g, a, b);
    if (WS) gs[i] = a;
    if (WT) gt[i] = b;
  }
}

// Walks the elements of planes [p0, p1) (hw contiguous elements each) in chunks of at most kChunk elements:
// chunk(e0, e1) once per chunk (16-bit inputs are converted there, once for many small planes), then
// segment(plane, offset in chunk, length) for each plane's part of the chunk, then chunk_done(e0, e1).
template <typename Chunk, typename Segment, typename Done>
void walk_planes(int64_t p0, int64_t p1, int64_t hw, Chunk&& chunk, Segment&& segment, Done&& chunk_done) {
  const int64_t end = p1 * hw;
  for (int64_t e0 = p0 * hw; e0 < end; e0 += kChunk) {
    const int64_t e1 = std::min(end, e0 + kChunk);
    chunk(e0, e1);
    for (int64_t p = e0 / hw; p * hw < e1; ++p) {
      const int64_t b = std::max(e0, p * hw), e = std::min(e1, (p + 1) * hw);
      segment(p, b - e0, e - b);
    }
    chunk_done(e0, e1);
  }
}

at::Tensor partial_l2_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& margin) {
  const feature::MapCall c = feature::prepare_maps("kdops.partial_l2", student, teacher, margin);
  const at::Tensor &s = c.s, &t = c.t, &m = c.m;
  const int64_t C = c.C, planes = c.planes, hw = c.hw;
  at::Tensor plane_sums = at::empty({c.B, C}, m.options());
  if (planes == 0) return plane_sums.sum(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "partial_l2_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const acc_t* mp = m.const_data_ptr<acc_t>();
    acc_t* out = plane_sums.mutable_data_ptr<acc_t>();
    at::parallel_for(0, planes, plane_grain(hw), [&](int64_t p0, int64_t p1) {
      ChunkReader<scalar_t, acc_t> rs, rt;
      const acc_t *cs = nullptr, *ct = nullptr;
      std::fill(out + p0, out + p1, acc_t(0));
      walk_planes(
          p0, p1, hw,
          [&](int64_t e0, int64_t e1) {
            cs = rs.read(sp + e0, e1 - e0);
            ct = rt.read(tp + e0, e1 - e0);
          },
          [&](int64_t p, int64_t off, int64_t len) {
            out[p] += chunk_partial_l2<acc_t>(cs + off, ct + off, len, mp[p % C]);
          },
          [](int64_t, int64_t) {});
    });
  });
  return plane_sums.sum(1);
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
        ChunkReader<scalar_t, acc_t> rs, rt;
        ChunkWriter<scalar_t, acc_t> w_s, w_t;
        const acc_t *cs = nullptr, *ct = nullptr;
        acc_t *ds = nullptr, *dt = nullptr;
        walk_planes(
            p0, p1, hw,
            [&](int64_t e0, int64_t e1) {
              cs = rs.read(sp + e0, e1 - e0);
              ct = rt.read(tp + e0, e1 - e0);
              if (WS) ds = w_s.dest(gsp + e0);
              if (WT) dt = w_t.dest(gtp + e0);
            },
            [&](int64_t p, int64_t off, int64_t len) {
              chunk_partial_l2_grad<acc_t, WS, WT>(cs + off, ct + off, len, mp[p % C], gp[p / C],
                                                   WS ? ds + off : nullptr, WT ? dt + off : nullptr);
            },
            [&](int64_t e0, int64_t e1) {
              if (WS) w_s.flush(gsp + e0, e1 - e0);
              if (WT) w_t.flush(gtp + e0, e1 - e0);
            });
      });
    });
  });
  return {gs, gt};
}

template <typename acc_t, bool Backward>
KDOPS_CPU_CLONES void chunk_margin_relu(const acc_t* grad, const acc_t* x, int64_t n, acc_t m, acc_t* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    out[i] = Backward ? (x[i] > m ? grad[i] : acc_t(0)) : feature::margin_relu(x[i], m);
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
      ChunkReader<scalar_t, acc_t> rx, rg;
      ChunkWriter<scalar_t, acc_t> w;
      const acc_t *cx = nullptr, *cg = nullptr;
      acc_t* co = nullptr;
      walk_planes(
          p0, p1, hw,
          [&](int64_t e0, int64_t e1) {
            cx = rx.read(xp + e0, e1 - e0);
            if (Backward) cg = rg.read(gp + e0, e1 - e0);
            co = w.dest(op + e0);
          },
          [&](int64_t p, int64_t off, int64_t len) {
            chunk_margin_relu<acc_t, Backward>(Backward ? cg + off : nullptr, cx + off, len, mp[p % C], co + off);
          },
          [&](int64_t e0, int64_t e1) { w.flush(op + e0, e1 - e0); });
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
  m.impl("margin_relu", &kdops::cpu::margin_relu_cpu);
  m.impl("margin_relu_backward", &kdops::cpu::margin_relu_backward_cpu);
}
