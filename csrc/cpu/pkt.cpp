// CPU kernels of the fused PKT epilogue on the raw Gram matrices (see kdops/pkt_math.h): per row, the
// affinity row sums, then the loss terms or (backward) the gradient through the row normalisation, the
// cosine scaling and the row norms, in vectorised passes over the row. Rows are split between threads; the
// column sums the norms' gradient needs are kept per thread and added at the end.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cpu/cpu_utils.h"
#include "kdops/gram_host.h"
#include "kdops/host_common.h"
#include "kdops/pkt_math.h"

namespace kdops {
namespace cpu {
namespace {

template <typename T>
void norms(const T* g, int64_t b, T eps, T* n, T* c) {
  for (int64_t i = 0; i < b; ++i) {
    n[i] = sqrt_pos_(g[i * b + i]);
    c[i] = T(1) / (n[i] + eps);
  }
}

template <typename T>
KDOPS_CPU_CLONES T affinity_sum(const T* g, const T* c, T ci, int64_t b) {
  T r = 0;
#pragma omp simd reduction(+ : r)
  for (int64_t j = 0; j < b; ++j) r += pkt::affinity(g[j], ci, c[j]);
  return r;
}

template <typename T>
KDOPS_CPU_CLONES T row_loss(const T* gs, const T* gt, const T* cs, const T* ct, T cis, T cit, T irs, T irt,
                            int64_t b, T eps) {
  T l = 0;
#pragma omp simd reduction(+ : l)
  for (int64_t j = 0; j < b; ++j) {
    const T ps = pkt::affinity(gs[j], cis, cs[j]) * irs, pt = pkt::affinity(gt[j], cit, ct[j]) * irt;
    l += pkt::kl_term(pt, ps, eps);
  }
  return l;
}

// w = sum_j q_j P_j for the side(s) wanted (q = dL/dP).
template <typename T, bool WS, bool WT>
KDOPS_CPU_CLONES void row_dots(const T* gs, const T* gt, const T* cs, const T* ct, T cis, T cit, T irs, T irt,
                               int64_t b, T eps, T& ws_out, T& wt_out) {
  T ws = 0, wt = 0;
#pragma omp simd reduction(+ : ws, wt)
  for (int64_t j = 0; j < b; ++j) {
    const T ps = pkt::affinity(gs[j], cis, cs[j]) * irs, pt = pkt::affinity(gt[j], cit, ct[j]) * irt;
    if (WS) ws += pkt::kl_grad_s(pt, ps, eps) * ps;
    if (WT) wt += pkt::kl_grad_t(pt, ps, eps) * pt;
  }
  ws_out = ws;
  wt_out = wt;
}

// The direct part of dL/dG for row i (times cf), its row sum of dG o G into rho, and dG o G added to the
// thread's column sums.
template <typename T, bool WS, bool WT>
KDOPS_CPU_CLONES void row_grads(const T* gs, const T* gt, const T* cs, const T* ct, T cis, T cit, T irs, T irt,
                                int64_t b, T eps, T cf, T ws, T wt, T* dgs, T* dgt, T* col_s, T* col_t, T& rho_s,
                                T& rho_t) {
  T rs = 0, rt = 0;
#pragma omp simd reduction(+ : rs, rt)
  for (int64_t j = 0; j < b; ++j) {
    const T ps = pkt::affinity(gs[j], cis, cs[j]) * irs, pt = pkt::affinity(gt[j], cit, ct[j]) * irt;
    if (WS) {
      const T d = cf * pkt::gram_grad(pkt::kl_grad_s(pt, ps, eps), ws, irs, cis, cs[j]);
      dgs[j] = d;
      rs += d * gs[j];
      col_s[j] += d * gs[j];
    }
    if (WT) {
      const T d = cf * pkt::gram_grad(pkt::kl_grad_t(pt, ps, eps), wt, irt, cit, ct[j]);
      dgt[j] = d;
      rt += d * gt[j];
      col_t[j] += d * gt[j];
    }
  }
  rho_s = rs;
  rho_t = rt;
}

// Rows [i0, i1) of both sides: the norms, then per row the affinity row sums and `body`.
template <typename T, typename F>
void for_rows(const T* gs, const T* gt, int64_t b, const T* cs, const T* ct, F&& body) {
  at::parallel_for(0, b, std::max<int64_t>(1, 2048 / std::max<int64_t>(b, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T *s = gs + i * b, *t = gt + i * b;
      const T irs = T(1) / affinity_sum(s, cs, cs[i], b), irt = T(1) / affinity_sum(t, ct, ct[i], b);
      body(i, s, t, irs, irt);
    }
  });
}

struct CpuDev {
  static at::Tensor forward(const at::Tensor& gs, const at::Tensor& gt, double eps) {
    const int64_t b = gs.size(0);
    at::Tensor rows = at::empty({b}, gs.options());
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "pkt_gram_cpu", [&] {
      using T = scalar_t;
      const T *sp = gs.const_data_ptr<T>(), *tp = gt.const_data_ptr<T>();
      std::vector<T> buf(4 * b);
      T *ns = buf.data(), *cs = ns + b, *nt = cs + b, *ct = nt + b;
      norms(sp, b, T(eps), ns, cs);
      norms(tp, b, T(eps), nt, ct);
      T* out = rows.mutable_data_ptr<T>();
      for_rows<T>(sp, tp, b, cs, ct, [&](int64_t i, const T* s, const T* t, T irs, T irt) {
        out[i] = row_loss(s, t, cs, ct, cs[i], ct[i], irs, irt, b, T(eps));
      });
    });
    return rows.sum() / (double(b) * double(b));
  }

  static void backward(const at::Tensor& gs, const at::Tensor& gt, bool need_s, bool need_t, at::Tensor& dgs,
                       at::Tensor& dgt, double eps) {
    const int64_t b = gs.size(0);
    const double cf = 1.0 / (double(b) * double(b));
    const int threads = at::get_num_threads();
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "pkt_gram_backward_cpu", [&] {
      using T = scalar_t;
      const T *sp = gs.const_data_ptr<T>(), *tp = gt.const_data_ptr<T>();
      T* ds = need_s ? dgs.mutable_data_ptr<T>() : nullptr;
      T* dt = need_t ? dgt.mutable_data_ptr<T>() : nullptr;
      // norms and scales (4 b), row sums rho (2 b), per-thread column sums (2 b each)
      std::vector<T> buf(6 * b + 2 * b * threads, T(0));
      T *ns = buf.data(), *cs = ns + b, *nt = cs + b, *ct = nt + b, *rho_s = ct + b, *rho_t = rho_s + b;
      T* cols = rho_t + b;
      norms(sp, b, T(eps), ns, cs);
      norms(tp, b, T(eps), nt, ct);
      dispatch_grad_flags(need_s, need_t, [&](auto ws_flag, auto wt_flag) {
        constexpr bool WS = decltype(ws_flag)::value, WT = decltype(wt_flag)::value;
        for_rows<T>(sp, tp, b, cs, ct, [&](int64_t i, const T* s, const T* t, T irs, T irt) {
          T* col = cols + 2 * b * at::get_thread_num();
          T ws, wt;
          row_dots<T, WS, WT>(s, t, cs, ct, cs[i], ct[i], irs, irt, b, T(eps), ws, wt);
          row_grads<T, WS, WT>(s, t, cs, ct, cs[i], ct[i], irs, irt, b, T(eps), T(cf), ws, wt,
                               WS ? ds + i * b : nullptr, WT ? dt + i * b : nullptr, col, col + b, rho_s[i],
                               rho_t[i]);
        });
      });
      // the row norms' gradient lands on the diagonal
      for (int64_t i = 0; i < b; ++i) {
        T ks = 0, kt = 0;
        for (int th = 0; th < threads; ++th) {
          ks += cols[2 * b * th + i];
          kt += cols[2 * b * th + b + i];
        }
        if (need_s) ds[i * b + i] += pkt::diag_grad(rho_s[i] + ks, cs[i], ns[i]);
        if (need_t) dt[i * b + i] += pkt::diag_grad(rho_t[i] + kt, ct[i], nt[i]);
      }
    });
  }
};

at::Tensor pkt_gram_cpu(const at::Tensor& gs, const at::Tensor& gt, double eps) {
  gram::check_nonnegative("kdops.pkt_gram", "eps", eps);
  return gram::forward<CpuDev>("kdops.pkt_gram", gs, gt, eps);
}

std::tuple<at::Tensor, at::Tensor> pkt_gram_backward_cpu(const at::Tensor& grad, const at::Tensor& gs,
                                                         const at::Tensor& gt, double eps, bool need_s,
                                                         bool need_t) {
  gram::check_nonnegative("kdops.pkt_gram_backward", "eps", eps);
  return gram::backward<CpuDev>("kdops.pkt_gram_backward", grad, gs, gt, need_s, need_t, eps);
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("pkt_gram", &kdops::cpu::pkt_gram_cpu);
  m.impl("pkt_gram_backward", &kdops::cpu::pkt_gram_backward_cpu);
}
