// The math of CRD's NCE loss (kdops::crd_nce), shared by the CPU and CUDA kernels. Nothing device-specific.
//
// Per anchor row i and column j of its index row (j = 0 the positive, j >= 1 the negatives), with the score
// x_ij = <memory[index_ij], anchor_i> / T, log P_ij = x_ij - log Z and a = c + eps, c = k / n_data:
//   positive:  -log(P / (P + a))     = softplus(log a - log P),                     d/dx = -a / (P + a)
//   negative:  -log(c / (P + a))     = log a - log c + softplus(log P - log a),     d/dx =  P / (P + a)
// which are the published terms -log(P_0 / (P_0 + c + eps)) and -log(c / (P_j + c + eps)), written in the log
// domain so that neither overflows when exp(x) does (exp(1 / 0.07) is 1.6e6; an un-normalised anchor gives inf)
// and both share one exponential and one log1p per entry.
#pragma once

#include <cmath>

#include "kdops/common.h"

namespace kdops {
namespace contrastive {

template <typename T>
struct EntryTerm {
  T value;  // the entry's share of the row loss
  T dx;     // its derivative with respect to the scaled score x = s / T
};

// u = log P - log a. softplus(u) = max(u, 0) + log1p(e), sigmoid(u) = 1 / (1 + e) or e / (1 + e), e = exp(-|u|);
// each derivative is the one of the two sigmoids that needs no subtraction (1 - sigmoid would cancel for P >> a).
template <typename T>
KDOPS_HOST_DEVICE EntryTerm<T> entry_term(T log_p, T log_a, T log_a_over_c, bool positive) {
  const T u = log_p - log_a;
  const T au = u < T(0) ? -u : u;
  const T e = exp_(-au);
  const T l1p = log1p_unit_(e);  // e in (0, 1]
  const T hi = T(1) / (T(1) + e), lo = e / (T(1) + e);  // sigmoid(|u|), sigmoid(-|u|)
  EntryTerm<T> r;
  if (positive) {
    r.value = (u < T(0) ? -u : T(0)) + l1p;  // softplus(-u)
    r.dx = u >= T(0) ? -lo : -hi;            // -a / (P + a) = -sigmoid(-u), never formed as P / (P + a) - 1
  } else {
    r.value = log_a_over_c + (u > T(0) ? u : T(0)) + l1p;
    r.dx = u >= T(0) ? hi : lo;  // P / (P + a) = sigmoid(u)
  }
  return r;
}

// The constants of one call, formed on the host in double: log a, log(a / c) (c = k / n_data; without negatives
// c = 0 and no negative term uses it), 1 / T, and log(n_data / entries), which turns the batch's log-sum-exp of
// the scaled scores into log Z for Z = mean(exp(x)) * n_data (the published normaliser).
template <typename T>
struct NceConstants {
  T log_a, log_a_over_c, inv_t, log_z_shift;
};

template <typename T>
inline NceConstants<T> nce_constants(int64_t rows, int64_t k, int64_t n_data, double temperature, double eps) {
  const double c = double(k) / double(n_data);
  NceConstants<T> r;
  r.log_a = T(std::log(c + eps));
  r.log_a_over_c = k > 0 ? T(std::log((c + eps) / c)) : T(0);
  r.inv_t = T(1.0 / temperature);
  const double entries = double(rows) * double(k + 1);
  r.log_z_shift = T(std::log(double(n_data)) - std::log(entries > 0 ? entries : 1.0));
  return r;
}

}  // namespace contrastive
}  // namespace kdops
