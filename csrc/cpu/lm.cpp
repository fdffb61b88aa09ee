// CPU row kernels of the lm family (kdops::fused_linear_kd, kdops::topk_kd), the math in lm_math.h and the chunk
// loop in lm_host.h. Rows of a chunk are split across threads; each row is a few passes over its (V,) logits in
// the accumulation dtype, which stay in L2: softcap / scale in place (only when asked), the maxima, the shifted
// exp-sums (with the cross sum that gives KL and reverse KL their value in the same pass), for the other
// divergences a pass of their sums, and the pass that overwrites the logits with their gradient.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/bf16_gemm.h"
#include "cpu/cpu_utils.h"
#include "kdops/lm_host.h"
#include "kdops/lm_math.h"

namespace kdops {
namespace cpu {
namespace {

using lm::Div;
using lm::Params;
using lm::Tail;

template <typename acc_t>
KDOPS_CPU_CLONES void transform_row(acc_t* x, int64_t n, acc_t scale, acc_t cap) {
  if (cap > acc_t(0)) {
    for (int64_t j = 0; j < n; ++j) x[j] = lm::transform(x[j], scale, cap);
  } else if (scale != acc_t(1)) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] *= scale;
  }
}

template <typename acc_t>
KDOPS_CPU_CLONES acc_t row_max(const acc_t* x, int64_t n) {
  acc_t m = neg_inf<acc_t>();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// A row's exponentials and terms, computed once and read by the later passes (per thread, 5 V values): the
// gradient pass then runs no exp or log (JSD: 8 exps and 2 logs per class before, 3 and 1 now).
template <typename acc_t>
struct RowCache {
  std::vector<acc_t> buf;
  acc_t *es, *et, *eu, *a, *b;
  explicit RowCache(int64_t v) : buf(5 * v) {
    es = buf.data(), et = es + v, eu = et + v, a = eu + v, b = a + v;
  }
};

// Z_s, Z_t, Z_u and the cross sum of KL (CROSS = 1) or reverse KL (CROSS = 2) against the row maxima; the
// exponentials themselves into es, et (and eu when U).
template <int CROSS, bool U, typename acc_t>
KDOPS_CPU_CLONES void row_sums(const acc_t* s, const acc_t* t, int64_t n, lm::RowStats<acc_t>& st, acc_t inv_t,
                               acc_t* __restrict es_, acc_t* __restrict et_, acc_t* __restrict eu_) {
  const acc_t ms = st.ms, mt = st.mt, d0 = st.d0;
  acc_t zs = 0, zt = 0, zu = 0, cr = 0;
#pragma omp simd reduction(+ : zs, zt, zu, cr)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t es = exp_((s[j] - ms) * inv_t);
    const acc_t et = exp_((t[j] - mt) * inv_t);
    es_[j] = es;
    et_[j] = et;
    zs += es;
    zt += et;
    if (U) {
      const acc_t eu = exp_(s[j] - ms);
      eu_[j] = eu;
      zu += eu;
    }
    if (CROSS == 1) cr += lm::pmul(et, (t[j] - s[j]) * inv_t - d0);
    if (CROSS == 2) cr += lm::pmul(es, (s[j] - t[j]) * inv_t - d0);
  }
  st.zs = zs, st.zt = zt, st.zu = zu, st.cross = cr;
}

// Sums of v, a and b (the divergences without a closed form).
// The first index of a row's maximum (the caller knows the maximum).
template <typename acc_t>
int64_t first_of(const acc_t* x, int64_t n, acc_t m) {
  for (int64_t j = 0; j < n; ++j)
    if (x[j] == m) return j;
  return 0;  // an all-NaN row: any index
}

// The terms a and b into the cache.
template <Div D, typename acc_t>
KDOPS_CPU_CLONES void row_terms(const acc_t* s, const acc_t* t, int64_t n, acc_t ms, acc_t ls, acc_t mt, acc_t lt,
                                acc_t izs, acc_t izt, const Params<acc_t> kp, const acc_t* __restrict es,
                                const acc_t* __restrict et, acc_t* __restrict a_out, acc_t* __restrict b_out,
                                acc_t& sv, acc_t& sa, acc_t& sb) {
  acc_t v_ = 0, a_ = 0, b_ = 0;
  const acc_t inv_t = kp.inv_t;
#pragma omp simd reduction(+ : v_, a_, b_)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t lq = (s[j] - ms) * inv_t - ls, lp = (t[j] - mt) * inv_t - lt;
    acc_t v, a, b;
    lm::terms<D>(lq, lp, (s[j] - t[j]) * kp.inv_t, es[j] * izs, et[j] * izt, kp, v, a, b);
    a_out[j] = a;
    b_out[j] = b;
    v_ += v, a_ += a, b_ += b;
  }
  sv = v_, sa = a_, sb = b_;
}

// Overwrites s with d(row loss * w)/dz_s (and t with d/dz_t when GT), from the cache: the exponentials, and the
// terms a, b where the divergence has no closed sums (CACHED; the closed ones form theirs here, without exp).
// izu: 1 / Z_u (U: the hard CE's own softmax).
template <Div D, bool GT, bool U, bool CACHED, typename acc_t>
KDOPS_CPU_CLONES void row_grads(acc_t* s, acc_t* t, int64_t n, acc_t ms, acc_t ls, acc_t mt, acc_t lt, acc_t izu,
                                acc_t izs, acc_t izt, acc_t sa, acc_t sb, acc_t shift, acc_t w,
                                const Params<acc_t> kp, const acc_t* __restrict es, const acc_t* __restrict et,
                                const acc_t* __restrict eu, const acc_t* __restrict ca, const acc_t* __restrict cb) {
  const acc_t inv_t = kp.inv_t;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const acc_t fs = s[j], ft = t[j];
    const acc_t q = es[j] * izs, p = et[j] * izt;
    acc_t v, a, b;
    if (CACHED) {
      a = ca[j], b = cb[j];
    } else {
      const acc_t lq = (fs - ms) * inv_t - ls, lp = (ft - mt) * inv_t - lt;
      lm::terms<D>(lq, lp, (fs - ft) * inv_t + shift, q, p, kp, v, a, b);
    }
    const acc_t su = U ? eu[j] * izu : q;
    s[j] = lm::student_grad(a, q, sa, su, fs, w, kp);
    if (GT) t[j] = lm::teacher_grad(b, p, sb, ft, w, kp);
  }
}

template <typename acc_t>
KDOPS_CPU_CLONES void zero_row(acc_t* x, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] = acc_t(0);
}

int64_t rows_grain(int64_t v) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(v, 1));
}

template <Div D, typename acc_t>
void kd_rows(lm::Chunk<acc_t>& c, const Params<acc_t>& kp) {
  const bool u = kp.hard != acc_t(0) && kp.inv_t != acc_t(1);
  const bool transform_s = kp.s_cap > acc_t(0) || kp.s_scale != acc_t(1);
  const bool transform_t = kp.t_cap > acc_t(0) || kp.t_scale != acc_t(1);
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, c.n, rows_grain(c.v), [&](int64_t r0, int64_t r1) {
    RowCache<acc_t> cache(c.v);
    for (int64_t r = r0; r < r1; ++r) {
      acc_t* s = c.s + r * c.lds;
      acc_t* t = c.t + r * c.ldt;
      const int64_t V = c.v;
      const int64_t y = c.target != nullptr ? c.target[r] : -1;
      const bool ignored = c.target != nullptr && y == c.ignore_index;
      if (!ignored && c.target != nullptr && (y < 0 || y >= V)) {
        int64_t e = -1;
        bad.compare_exchange_strong(e, r);
        c.rows[r] = acc_t(0);
        continue;
      }
      if (ignored) {
        c.rows[r] = acc_t(0);
        if (c.grad_s) zero_row(s, V);
        if (c.grad_t) zero_row(t, V);
        continue;
      }
      if (transform_s) transform_row(s, V, kp.s_scale, kp.s_cap);
      if (transform_t) transform_row(t, V, kp.t_scale, kp.t_cap);
      lm::RowStats<acc_t> st;
      st.ms = row_max(s, V);
      st.mt = row_max(t, V);
      st.d0 = st.shift = acc_t(0);
      if (D == Div::KL) {
        const int64_t j = first_of(t, V, st.mt);
        st.d0 = (t[j] - s[j]) * kp.inv_t;
        st.shift = st.d0;
      } else if (D == Div::ReverseKL) {
        const int64_t j = first_of(s, V, st.ms);
        st.d0 = (s[j] - t[j]) * kp.inv_t;
        st.shift = -st.d0;
      }
      constexpr int cross = D == Div::KL ? 1 : (D == Div::ReverseKL ? 2 : 0);
      if (u) row_sums<cross, true>(s, t, V, st, kp.inv_t, cache.es, cache.et, cache.eu);
      else row_sums<cross, false>(s, t, V, st, kp.inv_t, cache.es, cache.et, cache.eu);
      const acc_t ls = log_(st.zs), lt = log_(st.zt);
      // probabilities as e / Z: exp(x - lse) would carry the rounding of log Z into every q alike, a bias that the
      // gradient's sums over the vocabulary (q - p summing to 0) do not cancel
      const acc_t izs = acc_t(1) / st.zs, izt = acc_t(1) / st.zt;
      const acc_t lu = u ? log_(st.zu) : ls;
      const acc_t izu = u ? acc_t(1) / st.zu : izs;
      acc_t value, sa, sb;
      if constexpr (lm::has_closed_sums<D>()) {
        value = lm::closed_value<D>(st, st.ms * kp.inv_t + ls, st.mt * kp.inv_t + lt);
        lm::closed_sums<D>(st, sa, sb);
      } else {
        row_terms<D>(s, t, V, st.ms, ls, st.mt, lt, izs, izt, kp, cache.es, cache.et, cache.a, cache.b, value, sa,
                     sb);
        value = value > acc_t(0) ? value : acc_t(0);
      }
      acc_t row = kp.soft * value;
      acc_t fy = 0;
      if (y >= 0) {
        fy = s[y];
        if (kp.hard != acc_t(0)) row += kp.hard * (st.ms + lu - fy);  // lse of the untempered f_s minus f_s[y]
      }
      c.rows[r] = row;
      if (!c.grad_s && !c.grad_t) continue;
      const acc_t w = c.w != nullptr ? c.w[r * c.w_stride] : acc_t(1);
      // izu is only read when U: the tempered sums are against ms * inv_t, the untempered against ms.
      constexpr bool cached = !lm::has_closed_sums<D>();
      const auto grads = [&](auto gt, auto uu) {
        row_grads<D, decltype(gt)::value, decltype(uu)::value, cached>(s, t, V, st.ms, ls, st.mt, lt, izu, izs, izt,
                                                                       sa, sb, st.shift, w, kp, cache.es, cache.et,
                                                                       cache.eu, cache.a, cache.b);
      };
      using T1 = std::true_type;
      using F0 = std::false_type;
      if (c.grad_t) {
        if (u) grads(T1{}, T1{}); else grads(T1{}, F0{});
      } else {
        if (u) grads(F0{}, T1{}); else grads(F0{}, F0{});
      }
      if (y >= 0 && kp.hard != acc_t(0)) s[y] -= w * kp.hard * lm::transform_slope(fy, kp.s_scale, kp.s_cap);
    }
  });
  const int64_t b = bad.load();
  TORCH_CHECK(b < 0, "kdops.fused_linear_kd: target values must be in [0, ", c.v, ") (the kept vocabulary) or ",
              "ignore_index (", c.ignore_index, "), got ", c.target[b], " at a token of the chunk");
}

template <typename acc_t>
void kd_rows_any(Div d, lm::Chunk<acc_t>& c, const Params<acc_t>& kp) {
  switch (d) {
    case Div::KL: return kd_rows<Div::KL>(c, kp);
    case Div::ReverseKL: return kd_rows<Div::ReverseKL>(c, kp);
    case Div::JSD: return kd_rows<Div::JSD>(c, kp);
    case Div::SkewKL: return kd_rows<Div::SkewKL>(c, kp);
    case Div::SkewReverseKL: return kd_rows<Div::SkewReverseKL>(c, kp);
    case Div::TVD: return kd_rows<Div::TVD>(c, kp);
  }
}

// The maximum over the ids outside K (mask[j] = 0); -inf when there is none.
template <typename acc_t>
KDOPS_CPU_CLONES acc_t masked_max(const acc_t* s, const uint8_t* mask, int64_t n) {
  acc_t m = neg_inf<acc_t>();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = !mask[j] && s[j] > m ? s[j] : m;
  return m;
}

// Z_s, Z_u against the row maximum ms, and the exp-sum over the ids outside K against their own maximum mo (so
// that the tail mass keeps its digits, and its log stays finite, however small it is).
template <bool U, typename acc_t>
KDOPS_CPU_CLONES void topk_sums(const acc_t* s, const uint8_t* mask, int64_t n, acc_t ms, acc_t mo, acc_t inv_t,
                                acc_t& zs, acc_t& zu, acc_t& zo) {
  acc_t a = 0, b = 0, o = 0;
  const acc_t so = lm::finite_or_zero(mo);
#pragma omp simd reduction(+ : a, b, o)
  for (int64_t j = 0; j < n; ++j) {
    a += exp_((s[j] - ms) * inv_t);
    o += mask[j] ? acc_t(0) : exp_((s[j] - so) * inv_t);
    if (U) b += exp_(s[j] - ms);
  }
  zs = a, zu = b, zo = o;
}

// s = w (soft / T (c_out q + c_r q / R) + hard su) df/dz over the whole row (the K ids are overwritten after);
// q / R = exp(log q - log R) is formed as such, so that a tail mass R below the float range costs nothing.
template <bool U, bool BUCKET, typename acc_t>
KDOPS_CPU_CLONES void topk_dense(acc_t* s, int64_t n, acc_t ms, acc_t ls, acc_t izs, acc_t lu, acc_t c_out,
                                 acc_t c_r, acc_t log_r, acc_t w, const Params<acc_t> kp) {
  const acc_t inv_t = kp.inv_t;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const acc_t f = s[j];
    const acc_t lq = (f - ms) * inv_t - ls;
    const acc_t q = exp_((f - ms) * inv_t) * izs;
    const acc_t su = U ? exp_(f - ms - lu) : q;
    const acc_t soft = BUCKET ? c_out * q + c_r * exp_(lq - log_r) : c_out * q;
    s[j] = w * (kp.soft * inv_t * soft + kp.hard * su) * lm::transform_slope(f, kp.s_scale, kp.s_cap);
  }
}

template <Tail TL, typename acc_t>
void topk_rows(lm::Chunk<acc_t>& c, const Params<acc_t>& kp) {
  const bool u = kp.hard != acc_t(0) && kp.inv_t != acc_t(1);
  const bool transform_s = kp.s_cap > acc_t(0) || kp.s_scale != acc_t(1);
  const bool retemper = kp.mix != acc_t(1);
  const int64_t K = c.k, V = c.v;
  std::atomic<int64_t> bad_target{-1}, bad_id{-1}, dup_id{-1};
  at::parallel_for(0, c.n, rows_grain(V), [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> mask(static_cast<size_t>(V), 0);
    std::vector<acc_t> lp(static_cast<size_t>(K)), fk(static_cast<size_t>(K));
    for (int64_t r = r0; r < r1; ++r) {
      acc_t* s = c.s + r * c.lds;
      const int64_t* ids = c.ids + r * K;
      const acc_t* lps = c.lps + r * K;
      const int64_t y = c.target != nullptr ? c.target[r] : -1;
      const bool ignored = c.target != nullptr && y == c.ignore_index;
      c.rows[r] = acc_t(0);
      if (!ignored && c.target != nullptr && (y < 0 || y >= V)) {
        int64_t e = -1;
        bad_target.compare_exchange_strong(e, r);
        continue;
      }
      if (ignored) {
        if (c.grad_s) zero_row(s, V);
        continue;
      }
      bool ok = true;
      int64_t marked = 0;
      for (; marked < K; ++marked) {
        const int64_t id = ids[marked];
        if (id < 0 || id >= V) {
          int64_t e = -1;
          bad_id.compare_exchange_strong(e, r);
          ok = false;
          break;
        }
        if (mask[id]) {
          int64_t e = -1;
          dup_id.compare_exchange_strong(e, r);
          ok = false;
          break;
        }
        mask[id] = 1;
      }
      if (!ok) {
        for (int64_t i = 0; i < marked; ++i) mask[ids[i]] = 0;
        continue;
      }
      if (transform_s) transform_row(s, V, kp.s_scale, kp.s_cap);
      const acc_t ms = row_max(s, V);
      const acc_t mo = TL == Tail::Bucket ? masked_max(s, mask.data(), V) : neg_inf<acc_t>();
      acc_t zs, zu, zo;
      if (u) topk_sums<true>(s, mask.data(), V, ms, mo, kp.inv_t, zs, zu, zo);
      else topk_sums<false>(s, mask.data(), V, ms, mo, kp.inv_t, zs, zu, zo);
      for (int64_t i = 0; i < K; ++i) mask[ids[i]] = 0;
      const acc_t ls = log_(zs), lu = u ? log_(zu) : ls, izs = acc_t(1) / zs;
      for (int64_t i = 0; i < K; ++i) {
        lp[i] = lps[i];
        fk[i] = s[ids[i]];
      }
      // log R, R the student's mass outside K, from its own sum (no 1 - Q cancellation)
      const acc_t log_r = (lm::finite_or_zero(mo) - ms) * kp.inv_t + log_(zo) - ls;
      const lm::TopkRow<acc_t> side = lm::topk_side<TL>(lp.data(), fk.data(), K, V, ms, ls, log_r, retemper, kp);
      const acc_t value = side.value;
      acc_t row = kp.soft * value;
      acc_t fy = 0;
      if (y >= 0) {
        fy = s[y];
        if (kp.hard != acc_t(0)) row += kp.hard * (ms + lu - fy);
      }
      c.rows[r] = row;
      if (!c.grad_s) continue;
      const acc_t w = c.w != nullptr ? c.w[r * c.w_stride] : acc_t(1);
      constexpr bool bkt = TL == Tail::Bucket;
      if (u) topk_dense<true, bkt>(s, V, ms, ls, izs, lu, side.c_out, side.c_r, log_r, w, kp);
      else topk_dense<false, bkt>(s, V, ms, ls, izs, lu, side.c_out, side.c_r, log_r, w, kp);
      for (int64_t i = 0; i < K; ++i) {
        const acc_t q = exp_((fk[i] - ms) * kp.inv_t) * izs;
        const acc_t soft = lm::topk_soft_at<TL>(side, lp[i], (fk[i] - ms) * kp.inv_t - ls, q, K == V);
        const acc_t su = u ? exp_(fk[i] - ms - lu) : q;
        s[ids[i]] = w * (kp.soft * kp.inv_t * soft + kp.hard * su) * lm::transform_slope(fk[i], kp.s_scale, kp.s_cap);
      }
      if (y >= 0 && kp.hard != acc_t(0)) s[y] -= w * kp.hard * lm::transform_slope(fy, kp.s_scale, kp.s_cap);
    }
  });
  const int64_t bt = bad_target.load(), bi = bad_id.load(), bd = dup_id.load();
  TORCH_CHECK(bt < 0, "kdops.topk_kd: target values must be in [0, ", V, ") (the kept vocabulary) or ignore_index (",
              c.ignore_index, "), got ", bt < 0 ? 0 : c.target[bt]);
  TORCH_CHECK(bi < 0, "kdops.topk_kd: teacher_ids must be in [0, ", V, ") (the kept vocabulary)");
  TORCH_CHECK(bd < 0, "kdops.topk_kd: teacher_ids must name K distinct ids per token; a token repeats one");
}

template <typename acc_t>
void topk_rows_any(Tail t, lm::Chunk<acc_t>& c, const Params<acc_t>& kp) {
  switch (t) {
    case Tail::Renormalize: return topk_rows<Tail::Renormalize>(c, kp);
    case Tail::Zero: return topk_rows<Tail::Zero>(c, kp);
    case Tail::Bucket: return topk_rows<Tail::Bucket>(c, kp);
  }
}

// bf16 inputs: GEMMs that read them as they are, at bf16 speed, with fp32 results (csrc/cpu/bf16_gemm.h).
// KDOPS_CPU_BF16_GEMM=0 turns them off (the fp32-copy path instead), read at each call.
bool bf16_gemm_usable() {
  const char* env = std::getenv("KDOPS_CPU_BF16_GEMM");
  return bf16::available() && !(env != nullptr && std::strcmp(env, "0") == 0);
}

const lm::Bf16Gemms kBf16Gemms{bf16_gemm_usable, bf16::packed_words, bf16::pack_rows, bf16::pack_cols,
                               bf16::pack_cols_f32, bf16::gemm};

lm::Outputs fused_linear_kd_cpu(const at::Tensor& sh, const at::Tensor& sw, const std::optional<at::Tensor>& sb,
                                const std::optional<at::Tensor>& th, const std::optional<at::Tensor>& tw,
                                const std::optional<at::Tensor>& tb, const std::optional<at::Tensor>& tl,
                                const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& row_weight,
                                int64_t divergence, double mix, double temperature, double soft, double hard,
                                int64_t ignore_index, int64_t vocab_size, double s_cap, double t_cap, double s_scale,
                                double t_scale, int64_t chunk_size, int64_t grad_mask) {
  lm::check_fused_scalars(divergence, mix, temperature, soft, hard, s_cap, t_cap, s_scale, t_scale, chunk_size);
  lm::Outputs out;
  if (sh.scalar_type() == at::kDouble) {
    const auto kp = lm::make_params<double>(mix, temperature, soft, hard, s_cap, t_cap, s_scale, t_scale);
    out = lm::fused_linear_kd_run<double>(sh, sw, sb, th, tw, tb, tl, target, row_weight, kp, ignore_index,
                                          vocab_size, chunk_size, grad_mask, [&](auto& c, const auto& k) {
                                            kd_rows_any(static_cast<Div>(divergence), c, k);
                                          });
  } else {
    const auto kp = lm::make_params<float>(mix, temperature, soft, hard, s_cap, t_cap, s_scale, t_scale);
    out = lm::fused_linear_kd_run<float>(
        sh, sw, sb, th, tw, tb, tl, target, row_weight, kp, ignore_index, vocab_size, chunk_size, grad_mask,
        [&](auto& c, const auto& k) { kd_rows_any(static_cast<Div>(divergence), c, k); }, &kBf16Gemms);
  }
  return out;
}

lm::TopkOutputs topk_kd_cpu(const at::Tensor& sh, const at::Tensor& sw, const std::optional<at::Tensor>& sb,
                            const at::Tensor& ids, const at::Tensor& lps, const std::optional<at::Tensor>& target,
                            const std::optional<at::Tensor>& row_weight, int64_t tail, double retemper,
                            double temperature, double soft, double hard, int64_t ignore_index, int64_t vocab_size,
                            double s_cap, double s_scale, int64_t chunk_size, int64_t grad_mask) {
  lm::check_topk_scalars(tail, retemper, temperature, soft, hard, s_cap, s_scale, chunk_size);
  if (sh.scalar_type() == at::kDouble) {
    const auto kp = lm::make_params<double>(retemper, temperature, soft, hard, s_cap, 0.0, s_scale, 1.0);
    return lm::topk_kd_run<double>(sh, sw, sb, ids, lps, target, row_weight, kp, ignore_index, vocab_size, chunk_size,
                                   grad_mask, [&](auto& c, const auto& k) { topk_rows_any(static_cast<Tail>(tail), c, k); });
  }
  const auto kp = lm::make_params<float>(retemper, temperature, soft, hard, s_cap, 0.0, s_scale, 1.0);
  return lm::topk_kd_run<float>(
      sh, sw, sb, ids, lps, target, row_weight, kp, ignore_index, vocab_size, chunk_size, grad_mask,
      [&](auto& c, const auto& k) { topk_rows_any(static_cast<Tail>(tail), c, k); }, &kBf16Gemms);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("fused_linear_kd", &fused_linear_kd_cpu);
  m.impl("topk_kd", &topk_kd_cpu);
}

}  // namespace cpu
}  // namespace kdops
