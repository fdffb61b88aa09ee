// CPU kernels of the fused SP epilogue: per row of the two Gram matrices, the row norms, the normalised
// difference and (backward) the normalisation's gradient, in two or three vectorised passes over the row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "cpu/cpu_utils.h"
#include "kdops/host_common.h"
#include "kdops/gram_host.h"
#include "kdops/sp_math.h"

namespace kdops {
namespace cpu {
namespace {

template <typename T>
KDOPS_CPU_CLONES void row_norms(const T* s, const T* t, int64_t k, T& ss, T& st) {
  T a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t j = 0; j < k; ++j) {
    a += s[j] * s[j];
    b += t[j] * t[j];
  }
  ss = a;
  st = b;
}

// sum_j (s_j is - t_j it)^2, and the dots sum_j a_j d_j, sum_j c_j d_j (a, c the normalised rows, d = a - c)
template <typename T>
KDOPS_CPU_CLONES void row_terms(const T* s, const T* t, int64_t k, T is, T it, T& loss, T& ad, T& cd) {
  T l = 0, x = 0, y = 0;
#pragma omp simd reduction(+ : l, x, y)
  for (int64_t j = 0; j < k; ++j) {
    const T a = s[j] * is, c = t[j] * it, d = a - c;
    l += d * d;
    x += a * d;
    y += c * d;
  }
  loss = l;
  ad = x;
  cd = y;
}

template <typename T, bool WS, bool WT>
KDOPS_CPU_CLONES void row_grads(const T* s, const T* t, int64_t k, T is, T it, bool cs, bool ct, T ydy_s, T ydy_t,
                                T cf, T* gs, T* gt) {
#pragma omp simd
  for (int64_t j = 0; j < k; ++j) {
    const T a = s[j] * is, c = t[j] * it, d = cf * (a - c);
    if (WS) gs[j] = sp::normalize_grad(d, a, ydy_s, is, cs);
    if (WT) gt[j] = sp::normalize_grad(-d, c, ydy_t, it, ct);
  }
}

struct CpuDev {
  static at::Tensor forward(const at::Tensor& gs, const at::Tensor& gt) {
    const int64_t b = gs.size(0), k = gs.size(1);
    at::Tensor rows = at::empty({b}, gs.options());
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "sp_gram_cpu", [&] {
      const scalar_t *sp = gs.const_data_ptr<scalar_t>(), *tp = gt.const_data_ptr<scalar_t>();
      scalar_t* out = rows.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, b, std::max<int64_t>(1, 4096 / std::max<int64_t>(k, 1)), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          scalar_t ss, st, l, ad, cd;
          row_norms<scalar_t>(sp + i * k, tp + i * k, k, ss, st);
          row_terms<scalar_t>(sp + i * k, tp + i * k, k, inv_norm_clamped_(ss), inv_norm_clamped_(st), l, ad, cd);
          out[i] = l;
        }
      });
    });
    return rows.sum() / (double(b) * double(b));
  }

  static void backward(const at::Tensor& gs, const at::Tensor& gt, bool need_s, bool need_t, at::Tensor& dgs,
                       at::Tensor& dgt) {
    const int64_t b = gs.size(0), k = gs.size(1);
    const double cf = 2.0 / (double(b) * double(b));  // d|d|^2 = 2 d, mean over b^2
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "sp_gram_backward_cpu", [&] {
      const scalar_t *sp = gs.const_data_ptr<scalar_t>(), *tp = gt.const_data_ptr<scalar_t>();
      scalar_t* ds = need_s ? dgs.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* dt = need_t ? dgt.mutable_data_ptr<scalar_t>() : nullptr;
      const scalar_t c = scalar_t(cf);
      dispatch_grad_flags(need_s, need_t, [&](auto ws, auto wt) {
        constexpr bool WS = decltype(ws)::value, WT = decltype(wt)::value;
        at::parallel_for(0, b, std::max<int64_t>(1, 4096 / std::max<int64_t>(k, 1)), [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            scalar_t ss, st, l, ad, cd;
            row_norms<scalar_t>(sp + i * k, tp + i * k, k, ss, st);
            const scalar_t is = inv_norm_clamped_(ss), it = inv_norm_clamped_(st);
            row_terms<scalar_t>(sp + i * k, tp + i * k, k, is, it, l, ad, cd);
            row_grads<scalar_t, WS, WT>(sp + i * k, tp + i * k, k, is, it, std::sqrt(ss) <= scalar_t(1e-12),
                                        std::sqrt(st) <= scalar_t(1e-12), c * ad, -c * cd, c,
                                        WS ? ds + i * k : nullptr, WT ? dt + i * k : nullptr);
          }
        });
      });
    });
  }
};

at::Tensor sp_gram_cpu(const at::Tensor& gs, const at::Tensor& gt) {
  return gram::forward<CpuDev>("kdops.sp_gram", gs, gt);
}

std::tuple<at::Tensor, at::Tensor> sp_gram_backward_cpu(const at::Tensor& grad, const at::Tensor& gs,
                                                        const at::Tensor& gt, bool need_s, bool need_t) {
  return gram::backward<CpuDev>("kdops.sp_gram_backward", grad, gs, gt, need_s, need_t);
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("sp_gram", &kdops::cpu::sp_gram_cpu);
  m.impl("sp_gram_backward", &kdops::cpu::sp_gram_backward_cpu);
}
