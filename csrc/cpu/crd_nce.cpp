// CPU kernel of CRD's NCE loss (kdops::crd_nce), the math in contrastive_math.h. The work is split into units of
// one anchor row and a chunk of kCrdChunk index columns; each unit reads its memory rows in place (no gathered
// copy), scores them (in the accumulation type), folds the loss terms and adds d(loss)/d(anchor) =
// sum_j dx_ij memory[index_ij] / T into a partial of its own (the sums over the k + 1 terms in double), and the
// partials are summed per row in a fixed order: the result does not depend on the number of threads. The gradient is formed here, in the one pass over the memory rows, so the backward only
// scales it (kdops/_ops/contrastive.py). When the normaliser is not yet set (<= 0), a first pass forms the
// batch's log-sum-exp of the scores the same way.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/cpu_utils.h"
#include "kdops/common.h"
#include "kdops/contrastive_host.h"
#include "kdops/contrastive_math.h"

namespace kdops {
namespace cpu {
namespace {

namespace cn = contrastive;

constexpr int64_t kCrdChunk = 512;  // index columns per work unit

template <typename scalar_t, typename acc_t>
KDOPS_CPU_CLONES acc_t dot_row(const scalar_t* __restrict__ m, const acc_t* __restrict__ v, int64_t d) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < d; ++c) s += static_cast<acc_t>(m[c]) * v[c];
  return s;
}

// g += a * m with g in double: a row's gradient sums up to k + 1 terms of either sign (the positive's pull
// against the negatives' push), which one after another in fp32 would lose k * 2^-24 of the largest of them.
template <typename scalar_t>
KDOPS_CPU_CLONES void axpy_row(double a, const scalar_t* __restrict__ m, double* __restrict__ g, int64_t d) {
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) g[c] += a * static_cast<double>(m[c]);
}

void check_index(const cn::CrdCall& c) {
  const int64_t* idx = c.index.data_ptr<int64_t>();
  const int64_t n = c.b * c.k1;
  int64_t bad = -1;
  for (int64_t e = 0; e < n && bad < 0; ++e) {
    if (idx[e] < 0 || idx[e] >= c.n_bank) bad = e;
  }
  TORCH_CHECK(bad < 0, "kdops.crd_nce: index values must be in [0, ", c.n_bank, ") (the memory's rows), got ",
              bad < 0 ? 0 : idx[bad], " at row ", bad / std::max<int64_t>(c.k1, 1), ", column ",
              bad % std::max<int64_t>(c.k1, 1));
}

template <typename scalar_t>
void crd_nce_impl(cn::CrdCall& c, double temperature, int64_t n_data, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto k = cn::nce_constants<acc_t>(c.b, c.k1 - 1, n_data, temperature, eps);
  const int64_t b = c.b, d = c.d, k1 = c.k1;
  const int64_t chunks = (k1 + kCrdChunk - 1) / kCrdChunk;
  const int64_t units = b * chunks;
  const scalar_t* anchor = c.anchor.data_ptr<scalar_t>();
  const scalar_t* memory = c.memory.data_ptr<scalar_t>();
  const int64_t* index = c.index.data_ptr<int64_t>();
  const bool want_grad = c.grad.numel() > 0;

  // The anchors in acc_t, read once per row instead of once per entry.
  std::vector<acc_t> v(static_cast<size_t>(b * d));
  at::parallel_for(0, b, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t e = 0; e < d; ++e) v[r * d + e] = static_cast<acc_t>(anchor[r * d + e]);
  });

  auto unit_range = [&](int64_t u, int64_t& row, int64_t& j0, int64_t& j1) {
    row = u / chunks;
    j0 = (u % chunks) * kCrdChunk;
    j1 = std::min(k1, j0 + kCrdChunk);
  };
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(kCrdChunk * std::max<int64_t>(d, 1), 1));

  acc_t given = c.normalizer.data_ptr<acc_t>()[0];
  // log Z as hi + lo: hi the largest score (or log of the given Z), lo the small rest, so that an entry's
  // log P = (x - hi) - lo is exact in its first step (x and hi are close) instead of rounding log Z at the
  // magnitude of the scores (1 / T = 14 for unit rows), which would cost P a digit
  acc_t log_z_hi, log_z_lo = 0;
  if (given > acc_t(0)) {
    const double lz = std::log(static_cast<double>(given));
    log_z_hi = static_cast<acc_t>(lz);
    log_z_lo = static_cast<acc_t>(lz - static_cast<double>(log_z_hi));
    c.z_out.data_ptr<acc_t>()[0] = given;
  } else {
    // log-sum-exp of every scaled score, as (max, sum of exp(x - max)) per unit, merged in unit order; the sums
    // in double (b (k + 1) terms)
    std::vector<acc_t> mx(static_cast<size_t>(units));
    std::vector<double> sm(static_cast<size_t>(units));
    at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        int64_t r, j0, j1;
        unit_range(u, r, j0, j1);
        acc_t m = neg_inf<acc_t>();
        double s = 0;
        for (int64_t j = j0; j < j1; ++j) {
          const acc_t x = dot_row(memory + index[r * k1 + j] * d, v.data() + r * d, d) * k.inv_t;
          if (x > m) {
            s = s * static_cast<double>(exp_(m - x)) + 1.0;
            m = x;
          } else {
            s += static_cast<double>(exp_(x - m));
          }
        }
        mx[u] = m;
        sm[u] = s;
      }
    });
    acc_t m = neg_inf<acc_t>();
    double s = 0;
    for (int64_t u = 0; u < units; ++u) {
      if (mx[u] > m) {
        s = s * static_cast<double>(exp_(m - mx[u])) + sm[u];
        m = mx[u];
      } else {
        s += sm[u] * static_cast<double>(exp_(mx[u] - m));
      }
    }
    // (b = 0: the normaliser stays unset, so that the next call sets it)
    log_z_hi = units ? m : acc_t(0);
    log_z_lo = units ? static_cast<acc_t>(std::log(s) + static_cast<double>(k.log_z_shift)) : acc_t(0);
    c.z_out.data_ptr<acc_t>()[0] = units ? std::exp(log_z_hi + log_z_lo) : given;
  }
  if (b == 0) return;

  std::vector<double> loss_part(static_cast<size_t>(units));
  std::vector<double> grad_part(want_grad ? static_cast<size_t>(units * d) : 0);
  acc_t* grad = want_grad ? c.grad.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      int64_t r, j0, j1;
      unit_range(u, r, j0, j1);
      const acc_t* vr = v.data() + r * d;
      double* g = nullptr;
      if (want_grad) {
        g = grad_part.data() + u * d;
        std::fill(g, g + d, 0.0);
      }
      double total = 0;
      for (int64_t j = j0; j < j1; ++j) {
        const scalar_t* mj = memory + index[r * k1 + j] * d;
        const acc_t x = dot_row(mj, vr, d) * k.inv_t;
        const auto t = cn::entry_term((x - log_z_hi) - log_z_lo, k.log_a, k.log_a_over_c, j == 0);
        total += static_cast<double>(t.value);
        if (want_grad) axpy_row(static_cast<double>(t.dx * k.inv_t), mj, g, d);
      }
      loss_part[u] = total;
    }
  });
  acc_t* loss = c.loss.data_ptr<acc_t>();
  at::parallel_for(0, b, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double s = 0;
      for (int64_t q = 0; q < chunks; ++q) s += loss_part[r * chunks + q];
      loss[r] = static_cast<acc_t>(s);
      if (want_grad) {
        acc_t* g = grad + r * d;
        for (int64_t e = 0; e < d; ++e) {
          double ge = 0;
          for (int64_t q = 0; q < chunks; ++q) ge += grad_part[(r * chunks + q) * d + e];
          g[e] = static_cast<acc_t>(ge);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> crd_nce_cpu(const at::Tensor& anchor, const at::Tensor& memory,
                                                           const at::Tensor& index, const at::Tensor& normalizer,
                                                           double temperature, int64_t n_data, double eps,
                                                           bool anchor_grad) {
  auto c = cn::prepare_crd(anchor, memory, index, normalizer, temperature, n_data, eps, anchor_grad);
  check_index(c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.anchor.scalar_type(), "crd_nce_cpu",
                                  [&] { crd_nce_impl<scalar_t>(c, temperature, n_data, eps); });
  return {c.loss, c.z_out, c.grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("crd_nce", &crd_nce_cpu);
}

}  // namespace cpu
}  // namespace kdops
