// CPU kernels of the fused KD divergences (kd_div and kd_div_backward).
//
// Forward: one pass over each row in L1-sized chunks (chunk max, then exp-sums against it, merged into the
// row's online log-sum-exp state); only per-row stats are kept. JSD needs the normalisers before it can
// form the mixture, so it reads its rows a second time. Backward: one pass writing the gradient(s).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string_view>
#include <tuple>
#include <vector>

#include "cpu/cpu_utils.h"

#if KDOPS_CPU_HAS_WIDE_BUILD
#include <immintrin.h>
#endif
#include "kdops/kd_host.h"
#include "kdops/kd_math.h"

namespace kdops {
namespace cpu {
namespace {

using kd::Divergence;
using kd::RowState;

// Sums of a chunk taken against its own maxima: two passes over the chunk (it stays in L1).
template <Divergence D, typename acc_t>
KDOPS_CPU_CLONES RowState<acc_t> chunk_state(const acc_t* s, const acc_t* t, int64_t n, acc_t inv_t) {
  acc_t ms = neg_inf<acc_t>(), mt = neg_inf<acc_t>();
#pragma omp simd reduction(max : ms, mt)
  for (int64_t i = 0; i < n; ++i) {
    ms = s[i] > ms ? s[i] : ms;
    mt = t[i] > mt ? t[i] : mt;
  }
  const acc_t shift_s = kd::shift_of(ms), shift_t = kd::shift_of(mt);
  acc_t zs = 0, zt = 0, at = 0, as = 0;
#pragma omp simd reduction(+ : zs, zt, at, as)
  for (int64_t i = 0; i < n; ++i) {
    kd::accumulate<D>(s[i], t[i], shift_s, shift_t, inv_t, zs, zt, at, as);
  }
  return {ms, mt, zs, zt, at, as};
}

// Sums of a chunk against given shifts, in one pass that also finds the chunk maxima. Returns false,
// leaving `out` unspecified, when an element lies more than kMaxLead (in units of z / T) above its shift:
// the caller then falls back to chunk_state. Below that lead no exp overflows and no sum can leave the
// float range, and the state's reference point may sit below its maximum (all formulas allow any).
template <Divergence D, typename acc_t>
KDOPS_CPU_CLONES bool chunk_state_shifted(const acc_t* s, const acc_t* t, int64_t n, acc_t shift_s, acc_t shift_t,
                                          acc_t inv_t, RowState<acc_t>& out) {
  constexpr acc_t kMaxLead = 60;
  acc_t ms = neg_inf<acc_t>(), mt = neg_inf<acc_t>();
  acc_t zs = 0, zt = 0, at = 0, as = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    prefetch_block(s + b + kPrefetchAhead, t + b + kPrefetchAhead);
    const int64_t e = std::min(n, b + kBlock);
    acc_t bms = ms, bmt = mt, bzs = 0, bzt = 0, bat = 0, bas = 0;
#pragma omp simd reduction(max : bms, bmt) reduction(+ : bzs, bzt, bat, bas)
    for (int64_t i = b; i < e; ++i) {
      bms = s[i] > bms ? s[i] : bms;
      bmt = t[i] > bmt ? t[i] : bmt;
      kd::accumulate<D>(s[i], t[i], shift_s, shift_t, inv_t, bzs, bzt, bat, bas);
    }
    ms = bms, mt = bmt, zs += bzs, zt += bzt, at += bat, as += bas;
  }
  if (!((ms - shift_s) * inv_t <= kMaxLead && (mt - shift_t) * inv_t <= kMaxLead)) return false;
  out = {shift_s, shift_t, zs, zt, at, as};
  return true;
}

// Folds one chunk into the row state. Shifts come from the state (or the chunk's first element), so a
// chunk is normally read once; only a chunk that raises a maximum by a lot is read twice.
template <Divergence D, typename acc_t>
RowState<acc_t> fold_chunk(const RowState<acc_t>& state, const acc_t* s, const acc_t* t, int64_t n, acc_t inv_t) {
  const acc_t shift_s = state.ms == neg_inf<acc_t>() ? s[0] : state.ms;
  const acc_t shift_t = state.mt == neg_inf<acc_t>() ? t[0] : state.mt;
  RowState<acc_t> chunk;
  if (shift_s == neg_inf<acc_t>() || shift_t == neg_inf<acc_t>() ||
      !chunk_state_shifted<D, acc_t>(s, t, n, shift_s, shift_t, inv_t, chunk)) {
    chunk = chunk_state<D, acc_t>(s, t, n, inv_t);
  }
  return kd::merge(state, chunk, inv_t);
}

template <typename acc_t>
KDOPS_CPU_CLONES void jsd_chunk(const acc_t* s, const acc_t* t, int64_t n, const acc_t* stats, acc_t inv_t,
                                acc_t beta, acc_t one_m_beta, acc_t& kl_sm, acc_t& kl_tm) {
  acc_t a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = 0; i < n; ++i) kd::jsd_accumulate(s[i], t[i], stats, inv_t, beta, one_m_beta, a, b);
  kl_sm += a;
  kl_tm += b;
}

template <Divergence D, bool WS, bool WT, typename acc_t>
KDOPS_CPU_CLONES void grad_chunk(const acc_t* s, const acc_t* t, int64_t n, const kd::GradRow<acc_t>& g, acc_t* gs,
                                 acc_t* gt) {
  const kd::GradRow<acc_t> gl = g;  // a local copy lets the compiler keep the constants in registers
  for (int64_t b = 0; b < n; b += kBlock) {
    prefetch_block(s + b + kPrefetchAhead, t + b + kPrefetchAhead);
    const int64_t e = std::min(n, b + kBlock);
#pragma omp simd
    for (int64_t i = b; i < e; ++i) {
      acc_t x, y;
      kd::grad_elem<D>(gl, s[i], t[i], x, y);
      if (WS) gs[i] = x;
      if (WT) gt[i] = y;
    }
  }
}

// Calls fn(begin, end) over the classes of a row, leaving out `skip` (the DKD target) when >= 0.
template <typename F>
void for_each_chunk(int64_t C, int64_t skip, F&& fn) {
  const int64_t cut = skip >= 0 ? skip : C;
  for (int64_t c0 = 0; c0 < cut; c0 += kChunk) fn(c0, std::min(cut, c0 + kChunk));
  for (int64_t c0 = cut + 1; c0 < C; c0 += kChunk) fn(c0, std::min(C, c0 + kChunk));
}

int64_t row_grain(int64_t C) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1));
}

template <typename scalar_t, Divergence D>
void forward_rows(const scalar_t* student, const scalar_t* teacher, const int64_t* target, int64_t N, int64_t C,
                  double temperature, double w1, double w2, int64_t ignore_index, double scale, scalar_t* loss,
                  at::opmath_type<scalar_t>* stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_t = acc_t(1) / acc_t(temperature);
  const acc_t beta = acc_t(w1), one_m_beta = acc_t(w2);  // JSD only
  at::parallel_for(0, N, row_grain(C), [&](int64_t r0, int64_t r1) {
    ChunkReader<scalar_t, acc_t> rs, rt;
    for (int64_t r = r0; r < r1; ++r) {
      acc_t* st_row = stats + r * kd::kNumStats;
      const int64_t y = target != nullptr ? target[r] : -1;
      if (target != nullptr && y == ignore_index) {
        loss[r] = scalar_t(0);
        std::fill(st_row, st_row + kd::kNumStats, acc_t(0));
        continue;
      }
      TORCH_CHECK(D != Divergence::DKD || (y >= 0 && y < C), "kdops.kd_div: target value ", y, " at row ", r,
                  " is out of range [0, ", C, ") and is not ignore_index (", ignore_index, ")");
      const scalar_t* s = student + r * C;
      const scalar_t* t = teacher + r * C;
      const int64_t skip = D == Divergence::DKD ? y : -1;
      RowState<acc_t> state = RowState<acc_t>::empty();
      for_each_chunk(C, skip, [&](int64_t c0, int64_t c1) {
        const acc_t* cs = rs.read(s + c0, c1 - c0);
        const acc_t* ct = rt.read(t + c0, c1 - c0);
        state = fold_chunk<D>(state, cs, ct, c1 - c0, inv_t);
      });
      const acc_t xs_y = skip >= 0 ? acc_t(s[skip]) : acc_t(0);
      const acc_t xt_y = skip >= 0 ? acc_t(t[skip]) : acc_t(0);
      acc_t value = kd::finish_row<D>(state, inv_t, acc_t(w1), acc_t(w2), xs_y, xt_y, st_row);
      if (D == Divergence::JSD) {
        acc_t kl_sm = 0, kl_tm = 0;
        for_each_chunk(C, -1, [&](int64_t c0, int64_t c1) {
          const acc_t* cs = rs.read(s + c0, c1 - c0);
          const acc_t* ct = rt.read(t + c0, c1 - c0);
          jsd_chunk<acc_t>(cs, ct, c1 - c0, st_row, inv_t, beta, one_m_beta, kl_sm, kl_tm);
        });
        value = kd::jsd_finish(kl_sm, kl_tm, acc_t(w1), st_row);
      }
      loss[r] = static_cast<scalar_t>(value * acc_t(scale));
    }
  });
}

template <typename scalar_t, Divergence D, bool WS, bool WT>
void backward_rows(const scalar_t* grad, const scalar_t* student, const scalar_t* teacher, const int64_t* target,
                   const at::opmath_type<scalar_t>* stats, int64_t N, int64_t C, double temperature, double w1,
                   double w2, int64_t ignore_index, double scale, scalar_t* grad_s, scalar_t* grad_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_t = acc_t(1) / acc_t(temperature);
  at::parallel_for(0, N, row_grain(C), [&](int64_t r0, int64_t r1) {
    ChunkReader<scalar_t, acc_t> rs, rt;
    ChunkWriter<scalar_t, acc_t> ws, wt;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t y = target != nullptr ? target[r] : -1;
      scalar_t* gs_row = WS ? grad_s + r * C : nullptr;
      scalar_t* gt_row = WT ? grad_t + r * C : nullptr;
      if (target != nullptr && y == ignore_index) {
        if (WS) std::fill(gs_row, gs_row + C, scalar_t(0));
        if (WT) std::fill(gt_row, gt_row + C, scalar_t(0));
        continue;
      }
      TORCH_CHECK(D != Divergence::DKD || (y >= 0 && y < C), "kdops.kd_div_backward: target value ", y,
                  " at row ", r, " is out of range [0, ", C, ")");
      const scalar_t* s = student + r * C;
      const scalar_t* t = teacher + r * C;
      const acc_t xs_y = D == Divergence::DKD ? acc_t(s[y]) : acc_t(0);
      const acc_t xt_y = D == Divergence::DKD ? acc_t(t[y]) : acc_t(0);
      const kd::GradRow<acc_t> g = kd::grad_row<D>(stats + r * kd::kNumStats, acc_t(grad[r]) * acc_t(scale), inv_t, acc_t(w1),
                                                   acc_t(w2), xs_y, xt_y);
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int64_t n = std::min(C, c0 + kChunk) - c0;
        acc_t* ds = WS ? ws.dest(gs_row + c0) : nullptr;
        acc_t* dt = WT ? wt.dest(gt_row + c0) : nullptr;
        const acc_t* cs = rs.read(s + c0, n);
        const acc_t* ct = rt.read(t + c0, n);
        grad_chunk<D, WS, WT, acc_t>(cs, ct, n, g, ds, dt);
        if (D == Divergence::DKD && y >= c0 && y < c0 + n) {
          if (WS) ds[y - c0] = g.gs_y;
          if (WT) dt[y - c0] = g.gt_y;
        }
        if (WS) ws.flush(gs_row + c0, n);
        if (WT) wt.flush(gt_row + c0, n);
      }
    }
  });
}

// ---- kd_div_with_grad: the KL forward that also writes the student gradient of the summed outputs. ----
// A row is read once for its maxima, then once more taking each exp against them; the exps are kept (in the
// gradient row and a row buffer) so that the gradient (p_s - p_t) * scale / T is formed from them. Forward and
// backward together then take 2 exps per element instead of 2 in the forward and 2 more in the backward.
template <typename acc_t>
KDOPS_CPU_CLONES void row_maxima(const acc_t* s, const acc_t* t, int64_t n, acc_t& ms, acc_t& mt) {
  acc_t a = neg_inf<acc_t>(), b = neg_inf<acc_t>();
#pragma omp simd reduction(max : a, b)
  for (int64_t i = 0; i < n; ++i) {
    a = s[i] > a ? s[i] : a;
    b = t[i] > b ? t[i] : b;
  }
  ms = a;
  mt = b;
}

// The KL sums over exps against the given shifts; with kStore also es = exp((s - shift_s) / T) and et likewise.
// es / et may be s / t themselves (each element is read before it is written), so the pointers carry no restrict.
template <bool kStore, typename acc_t>
KDOPS_CPU_CLONES void kl_exps(const acc_t* s, const acc_t* t, int64_t n, acc_t shift_s, acc_t shift_t, acc_t inv_t,
                              acc_t* es, acc_t* et, RowState<acc_t>& st) {
  acc_t zs = 0, zt = 0, at = 0, as = 0;
#pragma omp simd reduction(+ : zs, zt, at, as)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xs = s[i], xt = t[i];
    const acc_t e_s = exp_((xs - shift_s) * inv_t);
    const acc_t e_t = exp_((xt - shift_t) * inv_t);
    if (kStore) {
      es[i] = e_s;
      et[i] = e_t;
    }
    zs += e_s;
    zt += e_t;
    at += e_t > acc_t(0) ? e_t * ((xt - xs) * inv_t) : acc_t(0);
  }
  st.zs = zs, st.zt = zt, st.at = at, st.as = as;
}

#if KDOPS_CPU_HAS_WIDE_BUILD
// exp over 16 floats with AVX-512: exp_'s reduction and polynomial (the same values wherever exp_'s result is a
// normal float), with the 2^k scaling done by vscalefps, which returns 0 for k below the float range, so the
// clamps and blends exp_ needs for its integer exponent are gone. -inf gives 0 (via the clamp at -150) and NaN
// stays NaN (vmaxps returns its second operand, x, when either is NaN). About 14 instructions instead of 22.
KDOPS_CPU_WIDE inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-150.0f), x);
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(k, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 e = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(e, k);
}

// One vector of kl_exps_wide: the exps of 16 elements into e_s / e_t, and the sums over the lanes in m.
KDOPS_CPU_WIDE inline void kl_step(__m512 xs, __m512 xt, __mmask16 m, __m512 vss, __m512 vst, __m512 vit, __m512& zs,
                                   __m512& zt, __m512& at, __m512& e_s, __m512& e_t) {
  e_s = exp16(_mm512_mul_ps(_mm512_sub_ps(xs, vss), vit));
  e_t = exp16(_mm512_mul_ps(_mm512_sub_ps(xt, vst), vit));
  zs = _mm512_mask_add_ps(zs, m, zs, e_s);
  zt = _mm512_mask_add_ps(zt, m, zt, e_t);
  const __m512 d = _mm512_mul_ps(_mm512_sub_ps(xt, xs), vit);
  const __mmask16 pos = _mm512_mask_cmp_ps_mask(m, e_t, _mm512_setzero_ps(), _CMP_GT_OQ);  // drops 0 * inf terms
  at = _mm512_mask_add_ps(at, pos, at, _mm512_mul_ps(e_t, d));
}

// kl_exps for float rows with AVX-512; the tail goes through masked loads and stores.
template <bool kStore>
KDOPS_CPU_WIDE void kl_exps_wide(const float* s, const float* t, int64_t n, float shift_s, float shift_t, float inv_t,
                                 float* es, float* et, RowState<float>& st) {
  const __m512 vss = _mm512_set1_ps(shift_s), vst = _mm512_set1_ps(shift_t), vit = _mm512_set1_ps(inv_t);
  __m512 zs = _mm512_setzero_ps(), zt = zs, at = zs, e_s, e_t;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    kl_step(_mm512_loadu_ps(s + i), _mm512_loadu_ps(t + i), __mmask16(0xFFFF), vss, vst, vit, zs, zt, at, e_s, e_t);
    if (kStore) {
      _mm512_storeu_ps(es + i, e_s);
      _mm512_storeu_ps(et + i, e_t);
    }
  }
  if (i < n) {
    const __mmask16 m = __mmask16((1u << (n - i)) - 1u);
    kl_step(_mm512_maskz_loadu_ps(m, s + i), _mm512_maskz_loadu_ps(m, t + i), m, vss, vst, vit, zs, zt, at, e_s, e_t);
    if (kStore) {
      _mm512_mask_storeu_ps(es + i, m, e_s);
      _mm512_mask_storeu_ps(et + i, m, e_t);
    }
  }
  st.zs = _mm512_reduce_add_ps(zs);
  st.zt = _mm512_reduce_add_ps(zt);
  st.at = _mm512_reduce_add_ps(at);
  st.as = 0.0f;
}
#endif

// g = es * cs - et * ct (g may be es).
template <typename acc_t>
KDOPS_CPU_CLONES void kl_grad_from_exps(const acc_t* es, const acc_t* et, int64_t n, acc_t cs, acc_t ct, acc_t* g) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) g[i] = es[i] * cs - et[i] * ct;
}

// KDOPS_CPU_WIDE_KD=0 runs the portable loop instead of the AVX-512 one (tests compare the two).
inline bool wide_kd_enabled() {
  const char* v = std::getenv("KDOPS_CPU_WIDE_KD");
  return v == nullptr || std::string_view(v) != "0";
}

// The KL rows of kd_div (kGrad = false: values and stats) and of kd_div_with_grad (kGrad: also the gradient).
template <typename scalar_t, bool kGrad>
void forward_kl_rows(const scalar_t* student, const scalar_t* teacher, const int64_t* target, int64_t N, int64_t C,
                       double temperature, int64_t ignore_index, double scale, scalar_t* loss,
                       at::opmath_type<scalar_t>* stats, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  const acc_t inv_t = acc_t(1) / acc_t(temperature);
  const acc_t coef = acc_t(scale) * inv_t;
  [[maybe_unused]] const bool wide = cpu_has_wide_build() && wide_kd_enabled();
  at::parallel_for(0, N, row_grain(C), [&](int64_t r0, int64_t r1) {
    // fp32 / fp64: the student exps go into the gradient row, the teacher's into bt. 16-bit: both rows are read
    // into float buffers and their exps overwrite them.
    std::vector<acc_t> bt(kSame && !kGrad ? 0 : C), bs(kSame ? 0 : C);
    for (int64_t r = r0; r < r1; ++r) {
      acc_t* st_row = stats + r * kd::kNumStats;
      scalar_t* g_row = kGrad ? grad + r * C : nullptr;
      if (target != nullptr && target[r] == ignore_index) {
        loss[r] = scalar_t(0);
        std::fill(st_row, st_row + kd::kNumStats, acc_t(0));
        if (kGrad) std::fill(g_row, g_row + C, scalar_t(0));
        continue;
      }
      const acc_t *s, *t;
      acc_t *es, *et = bt.data();
      if constexpr (kSame) {
        s = student + r * C;
        t = teacher + r * C;
        es = g_row;
      } else {
        load_floats(student + r * C, bs.data(), C);
        load_floats(teacher + r * C, bt.data(), C);
        s = es = bs.data();
        t = bt.data();
      }
      RowState<acc_t> state = RowState<acc_t>::empty();
      row_maxima(s, t, C, state.ms, state.mt);
#if KDOPS_CPU_HAS_WIDE_BUILD
      if constexpr (std::is_same_v<acc_t, float>) {
        if (wide) {
          kl_exps_wide<kGrad>(s, t, C, kd::shift_of(state.ms), kd::shift_of(state.mt), inv_t, es, et, state);
        } else {
          kl_exps<kGrad>(s, t, C, kd::shift_of(state.ms), kd::shift_of(state.mt), inv_t, es, et, state);
        }
      } else
#endif
      {
        kl_exps<kGrad>(s, t, C, kd::shift_of(state.ms), kd::shift_of(state.mt), inv_t, es, et, state);
      }
      const acc_t value = kd::finish_row<Divergence::KL>(state, inv_t, acc_t(0), acc_t(0), acc_t(0), acc_t(0), st_row);
      loss[r] = static_cast<scalar_t>(value * acc_t(scale));
      if constexpr (kGrad) {
        kl_grad_from_exps(es, et, C, coef / state.zs, coef / state.zt, es);
        if constexpr (!kSame) store_floats(es, g_row, C);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_div_with_grad_cpu(const at::Tensor& student,
                                                                    const at::Tensor& teacher,
                                                                    const std::optional<at::Tensor>& target,
                                                                    double temperature, int64_t ignore_index,
                                                                    double scale) {
  kd::KdCall c = kd::prepare_forward(student, teacher, target, temperature, "kl", 0.0, 0.0);
  at::Tensor grad = at::empty(student.sizes(), student.options());
  advise_huge_pages(grad);
  if (c.N == 0 || c.C == 0) return {c.out0, c.out1, grad.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.s.scalar_type(), "kd_div_with_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kl_rows<scalar_t, true>(c.s.const_data_ptr<scalar_t>(), c.t.const_data_ptr<scalar_t>(), c.target_ptr(),
                                c.N, c.C, temperature, ignore_index, scale, c.out0.mutable_data_ptr<scalar_t>(),
                                c.out1.mutable_data_ptr<acc_t>(), grad.mutable_data_ptr<scalar_t>());
  });
  return {c.out0, c.out1, grad};
}

std::tuple<at::Tensor, at::Tensor> kd_div_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                              const std::optional<at::Tensor>& target, double temperature,
                                              std::string_view divergence, double alpha, double beta,
                                              int64_t ignore_index, double scale) {
  kd::KdCall c = kd::prepare_forward(student, teacher, target, temperature, divergence, alpha, beta);
  if (c.N == 0 || c.C == 0) return {c.out0, c.out1};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.s.scalar_type(), "kd_div_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (c.div == Divergence::KL) {  // the row loop of kd_div_with_grad, without the gradient
      forward_kl_rows<scalar_t, false>(c.s.const_data_ptr<scalar_t>(), c.t.const_data_ptr<scalar_t>(), c.target_ptr(),
                                       c.N, c.C, temperature, ignore_index, scale, c.out0.mutable_data_ptr<scalar_t>(),
                                       c.out1.mutable_data_ptr<acc_t>(), nullptr);
      return;
    }
    kd::dispatch_divergence(c.div, [&](auto dc) {
      forward_rows<scalar_t, decltype(dc)::value>(c.s.const_data_ptr<scalar_t>(), c.t.const_data_ptr<scalar_t>(),
                                                  c.target_ptr(), c.N, c.C, temperature, c.w1, c.w2, ignore_index,
                                                  scale, c.out0.mutable_data_ptr<scalar_t>(), c.out1.mutable_data_ptr<acc_t>());
    });
  });
  return {c.out0, c.out1};
}

std::tuple<at::Tensor, at::Tensor> kd_div_backward_cpu(const at::Tensor& grad, const at::Tensor& student,
                                                       const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                                                       const at::Tensor& stats, double temperature,
                                                       std::string_view divergence, double alpha, double beta,
                                                       int64_t ignore_index, bool student_grad, bool teacher_grad,
                                                       double scale) {
  kd::KdCall c = kd::prepare_backward(grad, student, teacher, target, stats, temperature, divergence, alpha, beta,
                                      student_grad, teacher_grad);
  advise_huge_pages(c.out0);
  advise_huge_pages(c.out1);
  if (c.N == 0 || c.C == 0 || !(student_grad || teacher_grad)) return {c.out0, c.out1};
  const at::Tensor g = grad.contiguous(), st = stats.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.s.scalar_type(), "kd_div_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kd::dispatch_divergence(c.div, [&](auto dc) {
      dispatch_grad_flags(student_grad, teacher_grad, [&](auto ws, auto wt) {
        backward_rows<scalar_t, decltype(dc)::value, decltype(ws)::value, decltype(wt)::value>(
            g.const_data_ptr<scalar_t>(), c.s.const_data_ptr<scalar_t>(), c.t.const_data_ptr<scalar_t>(),
            c.target_ptr(), st.const_data_ptr<acc_t>(), c.N, c.C, temperature, c.w1, c.w2, ignore_index, scale,
            student_grad ? c.out0.mutable_data_ptr<scalar_t>() : nullptr,
            teacher_grad ? c.out1.mutable_data_ptr<scalar_t>() : nullptr);
      });
    });
  });
  return {c.out0, c.out1};
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("kd_div", &kdops::cpu::kd_div_cpu);
  m.impl("kd_div_backward", &kdops::cpu::kd_div_backward_cpu);
  m.impl("kd_div_with_grad", &kdops::cpu::kd_div_with_grad_cpu);
}
