// Math of the response-based (logit) divergences: Hinton KD, reverse KL, JSD and DKD.
//
// Every kernel, CPU or CUDA, is built from these functions; only the loops and reductions around them
// differ per device. Notation: s = z_s / T, t = z_t / T row-wise, p = softmax. Maxima are kept in raw
// logit units and arguments are formed as (z - m) / T, which keeps precision for logits near 1e4.
#pragma once

#include "kdops/common.h"

namespace kdops {
namespace kd {

enum class Divergence : int { KL = 0, ReverseKL = 1, JSD = 2, DKD = 3 };

// Per-row statistics the forward saves for the backward:
// [m_s, log Z_s, m_t, log Z_t, v1, v2] with Z = sum exp((z - m) / T) (over non-target classes for DKD),
// v1 = E_pt[t - s] (KL, DKD: over the non-target classes) | E_ps[s - t] (reverse KL) | KL(p_s||m) (JSD),
// v2 = KL(p_t||m) for JSD, else 0. The expectations, not the KL values, feed the backward: the teacher
// gradient of KL is p_t * ((t - s) - E_pt[t - s]), in which the log-normalisers cancel exactly, so large
// logits lose no precision to them.
constexpr int kNumStats = 6;

// Online log-sum-exp state of one row of student and teacher logits over the classes seen so far.
template <typename acc_t>
struct RowState {
  acc_t ms, mt;  // running maxima (raw logits)
  acc_t zs, zt;  // sum of exp((z - m) / T)
  acc_t at;      // sum of e_t * (t - s): E_pt[t - s] * zt
  acc_t as;      // sum of e_s * (s - t): E_ps[s - t] * zs

  KDOPS_HOST_DEVICE static RowState empty() {
    return {neg_inf<acc_t>(), neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  }
};

// A maximum usable as a shift: an all -inf chunk has max -inf, and (-inf) - (-inf) would be NaN.
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t shift_of(acc_t m) {
  return m == neg_inf<acc_t>() ? acc_t(0) : m;
}

// Adds one element to sums taken with fixed shifts ms, mt (the vectorised inner loop on the CPU).
// Terms whose probability is 0 are dropped so that -inf logits contribute 0, not NaN. D selects which of
// the cross sums the divergence needs (KL and DKD: at; reverse KL: as; JSD: neither), so a CPU loop does
// no work it throws away.
template <Divergence D, typename acc_t>
KDOPS_HOST_DEVICE void accumulate(acc_t xs, acc_t xt, acc_t ms, acc_t mt, acc_t inv_t, acc_t& zs, acc_t& zt,
                                  acc_t& at, acc_t& as) {
  const acc_t es = exp_((xs - ms) * inv_t);
  const acc_t et = exp_((xt - mt) * inv_t);
  zs += es;
  zt += et;
  if (D == Divergence::KL || D == Divergence::DKD) {
    at += et > acc_t(0) ? et * ((xt - xs) * inv_t) : acc_t(0);
  }
  if (D == Divergence::ReverseKL) {
    as += es > acc_t(0) ? es * ((xs - xt) * inv_t) : acc_t(0);
  }
}

// Merges the sums (m_o, z_o, a_o) into (m, z, a): both taken over disjoint sets of classes.
template <typename acc_t>
KDOPS_HOST_DEVICE void merge_one(acc_t& m, acc_t& z, acc_t& a, acc_t m_o, acc_t z_o, acc_t a_o, acc_t inv_t) {
  const acc_t mn = max_of(m, m_o);
  if (mn == neg_inf<acc_t>()) return;
  const acc_t r = exp_((m - mn) * inv_t);
  const acc_t r_o = exp_((m_o - mn) * inv_t);
  z = z * r + z_o * r_o;
  a = (r > acc_t(0) ? a * r : acc_t(0)) + (r_o > acc_t(0) ? a_o * r_o : acc_t(0));
  m = mn;
}

template <typename acc_t>
KDOPS_HOST_DEVICE RowState<acc_t> merge(RowState<acc_t> x, const RowState<acc_t>& y, acc_t inv_t) {
  merge_one(x.ms, x.zs, x.as, y.ms, y.zs, y.as, inv_t);
  merge_one(x.mt, x.zt, x.at, y.mt, y.zt, y.at, inv_t);
  return x;
}

// Adds one element with a running maximum (one exp per element): the per-thread loop on CUDA.
template <typename acc_t>
KDOPS_HOST_DEVICE void push_one(acc_t x, acc_t v, acc_t inv_t, acc_t& m, acc_t& z, acc_t& a) {
  if (x > m) {
    const acc_t r = exp_((m - x) * inv_t);
    z = z * r + acc_t(1);
    a = (r > acc_t(0) ? a * r : acc_t(0)) + v;
    m = x;
  } else if (x != neg_inf<acc_t>()) {  // NaN lands here and propagates, as on the CPU
    const acc_t e = exp_((x - m) * inv_t);
    z += e;
    a += e > acc_t(0) ? e * v : acc_t(0);
  }
}

template <typename acc_t>
KDOPS_HOST_DEVICE void push(RowState<acc_t>& st, acc_t xs, acc_t xt, acc_t inv_t) {
  const acc_t d = (xt - xs) * inv_t;
  push_one(xs, -d, inv_t, st.ms, st.zs, st.as);
  push_one(xt, d, inv_t, st.mt, st.zt, st.at);
}

// KL(p_t || p_s) from the row state and its stored log-normalisers (store_stats first); 0 over an empty set.
// A divergence is >= 0, but the forms below add terms of the size of the logits / T that cancel for nearly
// equal distributions, and rounding can leave the sum slightly negative: that is clamped to 0 (NaN passes).
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t nonnegative(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

template <typename acc_t>
KDOPS_HOST_DEVICE acc_t kl_teacher_student(const RowState<acc_t>& st, acc_t inv_t, const acc_t* stats) {
  if (st.zt == acc_t(0)) return acc_t(0);  // NaN must not take this exit
  return nonnegative(st.at / st.zt + (st.ms - st.mt) * inv_t + stats[1] - stats[3]);
}

template <typename acc_t>
KDOPS_HOST_DEVICE acc_t kl_student_teacher(const RowState<acc_t>& st, acc_t inv_t, const acc_t* stats) {
  if (st.zs == acc_t(0)) return acc_t(0);
  return nonnegative(st.as / st.zs + (st.mt - st.ms) * inv_t + stats[3] - stats[1]);
}

// E_pt[t - s] and E_ps[s - t] from the row state; 0 over an empty set of classes.
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t mean_t_minus_s(const RowState<acc_t>& st) {
  return st.zt != acc_t(0) ? st.at / st.zt : acc_t(0);
}

template <typename acc_t>
KDOPS_HOST_DEVICE acc_t mean_s_minus_t(const RowState<acc_t>& st) {
  return st.zs != acc_t(0) ? st.as / st.zs : acc_t(0);
}

template <typename acc_t>
KDOPS_HOST_DEVICE void store_stats(const RowState<acc_t>& st, acc_t v1, acc_t v2, acc_t* out) {
  out[0] = st.ms;
  out[1] = log_(st.zs);
  out[2] = st.mt;
  out[3] = log_(st.zt);
  out[4] = v1;
  out[5] = v2;
}

// ---- JSD: needs the normalisers first, so its forward makes a second pass over the row. ----
// rs = log p_s - log m and rt = log p_t - log m for the mixture m = beta * p_t + (1 - beta) * p_s, from the
// log-probabilities. Formed from d = lt - ls, not as ls - logaddexp(...): m / p_s = 1 + beta * (e^d - 1) where
// d <= 0 (and m / p_t = 1 + (1 - beta) * (e^-d - 1) where d > 0), so equal rows give exactly 0 and the error
// does not grow with |log p| (log-probabilities of 1e5 at T = 100 and logits of 1e4 left 1e-4 behind).
// Where the weighted term is below -1/2 the argument is summed as (1 - w) + w * e instead, which keeps its
// relative accuracy as it approaches 0 (beta = 0 or 1).
template <typename acc_t>
KDOPS_HOST_DEVICE void jsd_log_ratios(acc_t ls, acc_t lt, acc_t beta, acc_t one_m_beta, acc_t& rs, acc_t& rt) {
  const acc_t d = lt - ls;
  const bool lower = d <= acc_t(0);  // p_t <= p_s; NaN goes the other way and stays NaN
  const acc_t w = lower ? beta : one_m_beta, w_other = lower ? one_m_beta : beta;
  const acc_t e = exp_(lower ? d : -d);
  const acc_t u = w * (e - acc_t(1));
  const acc_t r = -log_pos_(u > acc_t(-0.5) ? acc_t(1) + u : w_other + w * e);
  rs = lower ? r : r - d;
  rt = lower ? r + d : r;
}

template <typename acc_t>
KDOPS_HOST_DEVICE void jsd_accumulate(acc_t xs, acc_t xt, const acc_t* stats, acc_t inv_t, acc_t beta,
                                      acc_t one_m_beta, acc_t& kl_sm, acc_t& kl_tm) {
  const acc_t ls = (xs - stats[0]) * inv_t - stats[1];
  const acc_t lt = (xt - stats[2]) * inv_t - stats[3];
  acc_t rs, rt;
  jsd_log_ratios(ls, lt, beta, one_m_beta, rs, rt);
  const acc_t ps = exp_(ls);
  const acc_t pt = exp_(lt);
  kl_sm += ps > acc_t(0) ? ps * rs : acc_t(0);
  kl_tm += pt > acc_t(0) ? pt * rt : acc_t(0);
}

// ---- DKD (decoupled KD): target-class part on binary distributions, non-target part on the rest. ----
template <typename acc_t>
struct DkdRow {
  acc_t lbs_y, lbs_n, lbt_y, lbt_n;  // log of [p_y, 1 - p_y] for student and teacher
  acc_t tckd;
  acc_t dr;  // (log bt_y - log bs_y) - (log bt_n - log bs_n), terms with bt = 0 dropped
};

// m, log_z: the row's non-target maximum and log-normaliser; x_y: the target logit.
template <typename acc_t>
KDOPS_HOST_DEVICE void binary_log_probs(acc_t m, acc_t log_z, acc_t x_y, acc_t inv_t, acc_t& lb_y, acc_t& lb_n) {
  if (log_z == neg_inf<acc_t>()) {  // C == 1: the target holds all the mass
    lb_y = acc_t(0);
    lb_n = neg_inf<acc_t>();
    return;
  }
  const acc_t u = (x_y - m) * inv_t;
  const acc_t lse = logaddexp_(u, log_z);
  lb_y = u - lse;
  lb_n = log_z - lse;
}

template <typename acc_t>
KDOPS_HOST_DEVICE DkdRow<acc_t> dkd_row(const acc_t* stats, acc_t xs_y, acc_t xt_y, acc_t inv_t) {
  DkdRow<acc_t> r;
  binary_log_probs(stats[0], stats[1], xs_y, inv_t, r.lbs_y, r.lbs_n);
  binary_log_probs(stats[2], stats[3], xt_y, inv_t, r.lbt_y, r.lbt_n);
  const acc_t bt_y = exp_(r.lbt_y), bt_n = exp_(r.lbt_n);
  const acc_t ry = bt_y > acc_t(0) ? r.lbt_y - r.lbs_y : acc_t(0);
  const acc_t rn = bt_n > acc_t(0) ? r.lbt_n - r.lbs_n : acc_t(0);
  r.tckd = nonnegative(bt_y * ry + bt_n * rn);
  r.dr = ry - rn;
  return r;
}

// ---- Backward. `scale` is grad_row / T; the rest of a row's constants come from its saved stats. ----
template <typename acc_t>
struct GradRow {
  acc_t ms, lzs, mt, lzt, v1, v2;
  acc_t inv_t, scale;
  acc_t w1, w2;  // JSD: beta, 1 - beta. DKD: alpha, beta
  // DKD only: gradient coefficients of the target-class part
  acc_t ds_n;      // bs_n - bt_n
  acc_t ct;        // bt_y * bt_n * dr
  acc_t gs_y, gt_y;  // gradients at the target class
};

template <Divergence D, typename acc_t>
KDOPS_HOST_DEVICE GradRow<acc_t> grad_row(const acc_t* stats, acc_t grad, acc_t inv_t, acc_t w1, acc_t w2, acc_t xs_y,
                                          acc_t xt_y) {
  GradRow<acc_t> g;
  g.ms = stats[0];
  g.lzs = stats[1];
  g.mt = stats[2];
  g.lzt = stats[3];
  g.v1 = stats[4];
  g.v2 = stats[5];
  g.inv_t = inv_t;
  g.scale = grad * inv_t;
  g.w1 = w1;
  g.w2 = w2;
  g.ds_n = g.ct = g.gs_y = g.gt_y = acc_t(0);
  if (D == Divergence::DKD) {
    const DkdRow<acc_t> r = dkd_row(stats, xs_y, xt_y, inv_t);
    const acc_t bs_y = exp_(r.lbs_y), bs_n = exp_(r.lbs_n);
    const acc_t bt_y = exp_(r.lbt_y), bt_n = exp_(r.lbt_n);
    g.ds_n = bs_n - bt_n;
    g.ct = bt_y * bt_n * r.dr;
    g.gs_y = g.scale * w1 * (bs_y - bt_y);
    g.gt_y = g.scale * w1 * g.ct;
  }
  return g;
}

// Gradients of one element (for DKD: of a non-target element; the target one is g.gs_y / g.gt_y).
template <Divergence D, typename acc_t>
KDOPS_HOST_DEVICE void grad_elem(const GradRow<acc_t>& g, acc_t xs, acc_t xt, acc_t& gs, acc_t& gt) {
  const acc_t ls = (xs - g.ms) * g.inv_t - g.lzs;
  const acc_t lt = (xt - g.mt) * g.inv_t - g.lzt;
  const acc_t ps = exp_(ls);
  const acc_t pt = exp_(lt);
  const acc_t d = (xt - xs) * g.inv_t;
  if (D == Divergence::KL) {
    gs = ps - pt;
    gt = pt > acc_t(0) ? pt * (d - g.v1) : acc_t(0);
  } else if (D == Divergence::ReverseKL) {
    gs = ps > acc_t(0) ? ps * (-d - g.v1) : acc_t(0);
    gt = pt - ps;
  } else if (D == Divergence::JSD) {
    acc_t rs, rt;  // w1 = beta, w2 = 1 - beta
    jsd_log_ratios(ls, lt, g.w1, g.w2, rs, rt);
    gs = ps > acc_t(0) ? g.w2 * ps * (rs - g.v1) : acc_t(0);
    gt = pt > acc_t(0) ? g.w1 * pt * (rt - g.v2) : acc_t(0);
  } else {  // DKD, non-target class: ps, pt are the non-target distributions q
    gs = g.w1 * ps * g.ds_n + g.w2 * (ps - pt);
    gt = -g.w1 * pt * g.ct + (pt > acc_t(0) ? g.w2 * pt * (d - g.v1) : acc_t(0));
  }
  gs *= g.scale;
  gt *= g.scale;
}

}  // namespace kd
}  // namespace kdops

namespace kdops {
namespace kd {

// Row loss from a finished row state; writes the row's stats. JSD returns 0 here and is completed by
// jsd_finish after its second pass.
template <Divergence D, typename acc_t>
KDOPS_HOST_DEVICE acc_t finish_row(const RowState<acc_t>& st, acc_t inv_t, acc_t w1, acc_t w2, acc_t xs_y, acc_t xt_y,
                                   acc_t* stats) {
  if (D == Divergence::KL) {
    store_stats(st, mean_t_minus_s(st), acc_t(0), stats);
    return kl_teacher_student(st, inv_t, stats);
  } else if (D == Divergence::ReverseKL) {
    store_stats(st, mean_s_minus_t(st), acc_t(0), stats);
    return kl_student_teacher(st, inv_t, stats);
  } else if (D == Divergence::DKD) {
    store_stats(st, mean_t_minus_s(st), acc_t(0), stats);
    return w1 * dkd_row(stats, xs_y, xt_y, inv_t).tckd + w2 * kl_teacher_student(st, inv_t, stats);
  } else {
    store_stats(st, acc_t(0), acc_t(0), stats);
    return acc_t(0);
  }
}

template <typename acc_t>
KDOPS_HOST_DEVICE acc_t jsd_finish(acc_t kl_sm, acc_t kl_tm, acc_t beta, acc_t* stats) {
  stats[4] = kl_sm = nonnegative(kl_sm);
  stats[5] = kl_tm = nonnegative(kl_tm);
  return beta * kl_tm + (acc_t(1) - beta) * kl_sm;
}


// ---- Mutual learning (DML, Zhang et al.): N peers, peer i's value sum_{j != i} KL(p_j || p_i) per row with
// p = softmax(z / T), the other peers held fixed. With S_c = sum_j p_jc and E_c = sum_j p_jc log p_jc it is
// sum_c (E_c - S_c log p_ic): every peer's value from one pass over the N rows, O(N C) instead of O(N^2 C).
// The gradient of peer i's value for its own logits: (N p_i - S) / T.
namespace mutual {

// Per peer and row the op keeps two stats: the row's largest logit m and log Z = log sum_c exp((z_c - m) / T).
constexpr int kMutualStats = 2;

// log p_c of a peer from its logit and its row's stats. The logit is shifted before it is scaled, so that the
// largest one gives exactly -log Z (z / T - m / T would leave the rounding of z / T, ~1e-2 at |z| / T = 2e5).
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t log_prob(acc_t z, acc_t inv_t, acc_t m, acc_t log_z) {
  return (z - m) * inv_t - log_z;
}

// A term p log p, 0 where p = 0 (also for log p = -inf, a masked logit).
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t plogp(acc_t p, acc_t logp) {
  return p > acc_t(0) ? p * logp : acc_t(0);
}

// Peer i's term of class c: E_c - S_c log p_ic, 0 where no peer puts mass on c (S_c = 0), +inf where some
// peer does and peer i puts none.
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t value_term(acc_t e, acc_t s, acc_t logp_i) {
  return s > acc_t(0) ? e - s * logp_i : acc_t(0);
}

// Peer i's gradient of class c: g (N p_ic - S_c), g = grad * scale / T.
template <typename acc_t>
KDOPS_HOST_DEVICE acc_t grad_term(acc_t g, acc_t n_peers, acc_t p_i, acc_t s) {
  return g * (n_peers * p_i - s);
}

}  // namespace mutual

}  // namespace kd
}  // namespace kdops
