// Math of the language-model distillation family (fused lm_head + divergence, and top-k teachers).
//
// Every row kernel, CPU or CUDA, is built from these functions. A row is one token's logits over the kept
// vocabulary: f = softcap(scale * z) (f = c tanh(scale z / c), or scale z without a cap), x = f_s / T for the
// student, y = f_t / T for the teacher, log q = x - lse(x), log p = y - lse(y). Maxima are kept in units of f
// and arguments formed as (f - m) / T, as in kd_math.h.
//
// Gradients: every divergence D(p, q) is written as per-class terms (v, a, b) with
//   D = sum v,  dD/dx_k = a_k - q_k sum_j a_j,  dD/dy_k = b_k - p_k sum_j b_j,
// that is a = q * dD/dq and b = p * dD/dp with the softmax Jacobian applied by the caller. Constants that the
// Jacobian cancels (the "+1" of d(p log p)/dp) are left out of a and b, which keeps the sums small and exact.
#pragma once

#include "kdops/common.h"

namespace kdops {
namespace lm {

enum class Div : int { KL = 0, ReverseKL = 1, JSD = 2, SkewKL = 3, SkewReverseKL = 4, TVD = 5 };
enum class Tail : int { Renormalize = 0, Zero = 1, Bucket = 2 };

template <typename acc_t>
struct Params {
  acc_t mix;             // JSD: beta (the teacher's weight in M); skew: lambda
  acc_t log_mix, log_1m_mix, one_m_mix;
  acc_t inv_t;           // 1 / T
  acc_t soft;            // soft_weight, times T^2 with scale_t2
  acc_t hard;            // hard_weight (CE of f_s against the target, untempered)
  acc_t s_scale, s_cap;  // cap <= 0: no softcap
  acc_t t_scale, t_cap;
};

template <typename T>
KDOPS_HOST_DEVICE T tanh_(T x) {
  return ::tanh(x);
}

// f(z) = cap * tanh(scale * z / cap), or scale * z without a cap.
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t transform(acc_t z, acc_t scale, acc_t cap) {
  return cap > acc_t(0) ? cap * tanh_(scale * z / cap) : scale * z;
}

// df/dz from f itself (the buffers hold f, not z): scale * (1 - (f / cap)^2).
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t transform_slope(acc_t f, acc_t scale, acc_t cap) {
  if (!(cap > acc_t(0))) return scale;
  const acc_t r = f / cap;
  return scale * (acc_t(1) - r * r);
}

// A maximum usable as a shift: -inf (no element) gives 0.
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t finite_or_zero(acc_t m) {
  return m == neg_inf<acc_t>() ? acc_t(0) : m;
}

// p * u with p = 0 giving 0 (u may be -inf or NaN where the probability underflowed).
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t pmul(acc_t p, acc_t u) {
  return p > acc_t(0) ? p * u : acc_t(0);
}

// Per-row statistics (units of f): maxima and the sums Z = sum exp((f - m) / T); zu = sum exp(f_s - m_s)
// (the untempered student, for the hard CE when T != 1); cross = sum e_t ((y - x) - d0) (KL) or
// sum e_s ((x - y) - d0) (reverse KL), d0 the log-ratio at the teacher's (student's) maximum. Taking the
// expectation about d0, not 0, keeps its absolute error at the size of the spread of the log-ratio over the
// probable classes, not of the log-ratio itself (which can be 10x larger at low temperatures); `shift` is what
// the callers add to x - y to form the shifted log-ratio for `terms` (+d0 for KL, -d0 for reverse KL).
// (reverse KL), from which the value follows without a second pass.
template <typename acc_t>
struct RowStats {
  acc_t ms, mt, zs, zt, zu, cross, d0, shift;
};

// log(wa e^la + wb e^lb), wa + wb = 1, as hi + log(w_hi + w_lo e^(lo - hi)) with hi the larger argument: where
// la = lb the log's argument is wa + wb, exactly 1 in floating point for the weights used here (w and 1 - w), so
// the mixture of identical distributions is exactly the distribution and its divergences exactly 0 (forming
// log wa + la first, as logaddexp would, rounds it away).
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t log_mix_(acc_t la, acc_t lb, acc_t wa, acc_t wb) {
  const bool a_hi = la >= lb;
  const acc_t hi = a_hi ? la : lb, lo = a_hi ? lb : la;
  const acc_t r = hi + log_pos_((a_hi ? wa : wb) + (a_hi ? wb : wa) * exp_(lo - hi));
  return hi == neg_inf<acc_t>() ? hi : r;
}

// The terms (v, a, b) of one class; lq, lp are the log-probabilities, q, p their exponentials, dxy = x - y + shift
// (RowStats).
// KL and reverse KL take their log-ratio from dxy, without the log-normalisers: their closed-form sums
// (closed_sums) are the matching expectations E_p[y - x] and E_q[x - y], so the normalisers cancel exactly and a
// large lse costs no precision (as in kd_math.h).
template <Div D, typename acc_t>
KDOPS_HOST_DEVICE void terms(acc_t lq, acc_t lp, acc_t dxy, acc_t q, acc_t p, const Params<acc_t>& k, acc_t& v,
                             acc_t& a, acc_t& b) {
  if (D == Div::KL) {  // KL(P || Q)
    v = pmul(p, lp - lq);
    a = -p;
    b = pmul(p, -dxy);
  } else if (D == Div::ReverseKL) {  // KL(Q || P)
    v = pmul(q, lq - lp);
    a = pmul(q, dxy);
    b = -q;
  } else if (D == Div::JSD) {  // beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q
    const acc_t lm = log_mix_(lp, lq, k.mix, k.one_m_mix);
    a = k.one_m_mix * pmul(q, lq - lm);
    b = k.mix * pmul(p, lp - lm);
    v = a + b;
  } else if (D == Div::SkewKL) {  // KL(P || lambda P + (1 - lambda) Q)
    const acc_t lm = log_mix_(lp, lq, k.mix, k.one_m_mix);
    v = pmul(p, lp - lm);
    a = -k.one_m_mix * pmul(p, exp_(lq - lm));
    b = v - k.mix * pmul(p, exp_(lp - lm));
  } else if (D == Div::SkewReverseKL) {  // KL(Q || lambda Q + (1 - lambda) P)
    const acc_t lm = log_mix_(lq, lp, k.mix, k.one_m_mix);
    v = pmul(q, lq - lm);
    a = v - k.mix * pmul(q, exp_(lq - lm));
    b = -k.one_m_mix * pmul(q, exp_(lp - lm));
  } else {  // TVD: 1/2 sum |p - q|, the sign from the log-probabilities: p and q are products e / Z that a
    // contracted multiply-add may round differently, while identical inputs give identical lp and lq
    const acc_t dl = lp - lq;
    const acc_t sg = dl > acc_t(0) ? acc_t(1) : (dl < acc_t(0) ? acc_t(-1) : acc_t(0));
    const acc_t d = p - q;
    v = sg != acc_t(0) ? acc_t(0.5) * (d > acc_t(0) ? d : -d) : acc_t(0);
    a = acc_t(-0.5) * sg * q;
    b = acc_t(0.5) * sg * p;
  }
}

// Sums of a and b known in closed form, so that the student gradient of KL is q - p exactly (and the teacher
// gradient of reverse KL p - q); the other sum is the expectation of the log-ratio term from the row's cross sum.
template <Div D, typename acc_t>
KDOPS_HOST_DEVICE void closed_sums(const RowStats<acc_t>& st, acc_t& sa, acc_t& sb) {
  if (D == Div::KL) {
    sa = acc_t(-1);
    sb = st.cross / st.zt;
  } else if (D == Div::ReverseKL) {
    sa = st.cross / st.zs;
    sb = acc_t(-1);
  }
}

template <Div D>
KDOPS_HOST_DEVICE constexpr bool has_closed_sums() {
  return D == Div::KL || D == Div::ReverseKL;
}

// log-sum-exps of the row from its stats.
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t lse_of(acc_t m, acc_t z, acc_t inv_t) {
  return m * inv_t + log_(z);
}

// The divergence value from the one-pass cross sum (KL, reverse KL only), never negative.
template <Div D, typename acc_t>
KDOPS_HOST_DEVICE acc_t closed_value(const RowStats<acc_t>& s, acc_t lse_s, acc_t lse_t) {
  acc_t v = D == Div::KL ? (s.cross / s.zt + s.d0) - (lse_t - lse_s) : (s.cross / s.zs + s.d0) - (lse_s - lse_t);
  return v > acc_t(0) ? v : acc_t(0);
}

// The gradient of the row's loss with respect to the raw student logit z_k: the soft term's
// (soft / T) (a_k - q_k sum a), plus the hard CE's hard * softmax(f_s)_k (the one-hot part is the caller's),
// times the row weight and df/dz.
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t student_grad(acc_t a, acc_t q, acc_t sa, acc_t su, acc_t f, acc_t w, const Params<acc_t>& k) {
  return w * (k.soft * k.inv_t * (a - q * sa) + k.hard * su) * transform_slope(f, k.s_scale, k.s_cap);
}

template <typename acc_t>
KDOPS_HOST_DEVICE acc_t teacher_grad(acc_t b, acc_t p, acc_t sb, acc_t f, acc_t w, const Params<acc_t>& k) {
  return w * k.soft * k.inv_t * (b - p * sb) * transform_slope(f, k.t_scale, k.t_cap);
}

// ---- top-k teachers ----
// The teacher gives K ids and log-probabilities lp_i (re-tempered p^r / Z over the K ids when r = T_g / T != 1).
// Student log q_i = x_id - lse_V(x). With P = sum_K p, Q = sum_K q and R = 1 - Q = sum over the other ids:
//   renormalize: KL(p / P || q / Q) over K; d/dx_id = q_i / Q - p_i / P, 0 elsewhere.
//   zero:        sum_K p (log p - log q);    d/dx_k = P q_k - p_k [k in K].
//   bucket:      zero + (1 - P) log((1 - P) / R); d/dx_k = q_k - p_k (k in K), q_k - (1 - P) q_k / R otherwise.
// The soft gradient outside K is therefore c_out q_k + c_r q_k / R with (c_out, c_r) = (0, 0), (P, 0) or
// (1, -(1 - P)); log R comes from the exp-sum outside K taken against its own maximum, and q_k / R is formed as
// exp(log q_k - log R), so that a tail mass below the float range neither overflows nor turns the gradient NaN.
// With K = V there is no id outside K and no rest bucket: the bucket tail is the zero tail.
template <typename acc_t>
struct TopkRow {
  acc_t value;       // the soft divergence of the row
  acc_t c_out, c_r;  // the soft gradient outside K: c_out q_k + c_r q_k / R
  acc_t P;           // the teacher's mass on K
  acc_t qmax, izq;   // renormalize: max_K log q and 1 / sum_K exp(log q - qmax), so q_i / Q = e / Z
};

// The K-long side of a top-k row, serially (K is small next to V): lp (K,) holds the given log-probs and is
// re-tempered in place (p^r / Z over K when `retemper`); fk (K,) the K ids' f. ms, ls: the student row's maximum
// and log Z (its log q_i = (fk_i - ms) / T - ls); log_r: log of its mass outside K (bucket only).
template <Tail TL, typename acc_t>
KDOPS_HOST_DEVICE TopkRow<acc_t> topk_side(acc_t* lp, const acc_t* fk, int64_t K, int64_t V, acc_t ms, acc_t ls,
                                           acc_t log_r, bool retemper, const Params<acc_t>& k) {
  if (retemper) {
    acc_t lmax = neg_inf<acc_t>();
    for (int64_t i = 0; i < K; ++i) {
      lp[i] *= k.mix;
      lmax = max_of(lmax, lp[i]);
    }
    if (lmax != neg_inf<acc_t>()) {
      acc_t z = 0;
      for (int64_t i = 0; i < K; ++i) z += exp_(lp[i] - lmax);
      const acc_t lz = lmax + log_(z);
      for (int64_t i = 0; i < K; ++i) lp[i] -= lz;
    }
  }
  TopkRow<acc_t> o{acc_t(0), acc_t(0), acc_t(0), acc_t(0), neg_inf<acc_t>(), acc_t(0)};
  for (int64_t i = 0; i < K; ++i) {
    o.P += exp_(lp[i]);
    o.qmax = max_of(o.qmax, (fk[i] - ms) * k.inv_t - ls);
  }
  o.P = o.P < acc_t(1) ? o.P : acc_t(1);
  const acc_t lP = o.P > acc_t(0) ? log_(o.P) : neg_inf<acc_t>();
  acc_t lQ = 0;
  if (TL == Tail::Renormalize) {
    acc_t z = 0;
    for (int64_t i = 0; i < K; ++i) z += exp_((fk[i] - ms) * k.inv_t - ls - o.qmax);
    lQ = o.qmax + log_(z);
    o.izq = acc_t(1) / z;
  }
  if (!(o.P > acc_t(0))) return o;  // no teacher mass: no soft term
  for (int64_t i = 0; i < K; ++i) {
    const acc_t p = exp_(lp[i]), lq = (fk[i] - ms) * k.inv_t - ls;
    if (TL == Tail::Renormalize) o.value += pmul(p / o.P, (lp[i] - lP) - (lq - lQ));
    else o.value += pmul(p, lp[i] - lq);
  }
  if (TL == Tail::Zero || (TL == Tail::Bucket && K == V)) o.c_out = o.P;  // K = V: no rest bucket
  if (TL == Tail::Bucket && K < V) {
    const acc_t rest = acc_t(1) - o.P;
    if (rest > acc_t(0)) o.value += rest * (log_(rest) - log_r);
    o.c_out = acc_t(1);
    o.c_r = -rest;
  }
  if (TL != Tail::Zero) o.value = o.value > acc_t(0) ? o.value : acc_t(0);
  return o;
}

// The soft gradient (before soft / T) at one of the K ids, q its student probability.
template <Tail TL, typename acc_t>
KDOPS_HOST_DEVICE acc_t topk_soft_at(const TopkRow<acc_t>& o, acc_t lp, acc_t lq, acc_t q, bool all_ids) {
  if (!(o.P > acc_t(0))) return acc_t(0);
  const acc_t p = exp_(lp);
  if (TL == Tail::Renormalize) return exp_(lq - o.qmax) * o.izq - p / o.P;
  if (TL == Tail::Zero || all_ids) return o.P * q - p;
  return q - p;
}

}  // namespace lm
}  // namespace kdops
