// CPU kernels of the fused FKD epilogue (see kdops/fkd_math.h): per row of the student's Gram matrix and the
// teacher kernel, the squared kernel differences off the diagonal, or (backward) their gradient, with the
// row norms' and the feature regularisation's terms added on the diagonal. No b x b temporary is formed.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cpu/cpu_utils.h"
#include "kdops/fkd_math.h"
#include "kdops/gram_host.h"
#include "kdops/host_common.h"

namespace kdops {
namespace cpu {
namespace {

template <typename T>
KDOPS_CPU_CLONES T row_sq_diff(const T* g, const T* k, const T* c, T ci, int64_t b, int64_t i) {
  T l = 0;
#pragma omp simd reduction(+ : l)
  for (int64_t j = 0; j < b; ++j) {
    const T d = fkd::kernel_diff(g[j], k[j], ci, c[j], j == i);
    l += d * d;
  }
  return l;
}

// dG (direct part, times cf) and dK of row i; returns sum_j dG_ij G_ij.
template <typename T, bool WS, bool WT>
KDOPS_CPU_CLONES T row_grads(const T* g, const T* k, const T* c, T ci, int64_t b, int64_t i, T cf, T* dg, T* dk) {
  T rho = 0;
#pragma omp simd reduction(+ : rho)
  for (int64_t j = 0; j < b; ++j) {
    const T d = T(2) * cf * fkd::kernel_diff(g[j], k[j], ci, c[j], j == i);
    if (WS) {
      dg[j] = d * ci * c[j];
      rho += d * ci * c[j] * g[j];
    }
    if (WT) dk[j] = -d;
  }
  return rho;
}

template <typename T>
void norms(const T* g, int64_t b, bool cosine, T* n, T* c) {
  for (int64_t i = 0; i < b; ++i) {
    n[i] = sqrt_pos_(g[i * b + i]);
    c[i] = fkd::scale_of(g[i * b + i], cosine);
  }
}

int64_t row_grain(int64_t b) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(b, 1));
}

struct CpuDev {
  static at::Tensor forward(const at::Tensor& gs, const at::Tensor& kt, bool cosine, double fr_weight,
                            int64_t fr_power) {
    const int64_t b = gs.size(0);
    at::Tensor out = at::empty({}, gs.options());
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "fkd_gram_cpu", [&] {
      using T = scalar_t;
      const T *g = gs.const_data_ptr<T>(), *k = kt.const_data_ptr<T>();
      std::vector<T> buf(3 * b);
      T *n = buf.data(), *c = n + b, *rows = c + b;
      norms(g, b, cosine, n, c);
      at::parallel_for(0, b, row_grain(b), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) rows[i] = row_sq_diff(g + i * b, k + i * b, c, c[i], b, i);
      });
      double d = 0, fr = 0;
      for (int64_t i = 0; i < b; ++i) {
        d += rows[i];
        fr += fkd::fr_term(n[i], g[i * b + i], int(fr_power));
      }
      *out.mutable_data_ptr<T>() = T(d / (double(b) * double(b - 1)) + fr_weight * fr / double(b));
    });
    return out;
  }

  static void backward(const at::Tensor& gs, const at::Tensor& kt, bool need_s, bool need_t, at::Tensor& dgs,
                       at::Tensor& dkt, bool cosine, double fr_weight, int64_t fr_power) {
    const int64_t b = gs.size(0);
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "fkd_gram_backward_cpu", [&] {
      using T = scalar_t;
      const T *g = gs.const_data_ptr<T>(), *k = kt.const_data_ptr<T>();
      T* dg = need_s ? dgs.mutable_data_ptr<T>() : nullptr;
      T* dk = need_t ? dkt.mutable_data_ptr<T>() : nullptr;
      std::vector<T> buf(3 * b);
      T *n = buf.data(), *c = n + b, *rho = c + b;
      norms(g, b, cosine, n, c);
      const T cf = T(1.0 / (double(b) * double(b - 1)));
      dispatch_grad_flags(need_s, need_t, [&](auto ws, auto wt) {
        constexpr bool WS = decltype(ws)::value, WT = decltype(wt)::value;
        at::parallel_for(0, b, row_grain(b), [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            rho[i] = row_grads<T, WS, WT>(g + i * b, k + i * b, c, c[i], b, i, cf, WS ? dg + i * b : nullptr,
                                          WT ? dk + i * b : nullptr);
          }
        });
      });
      if (!need_s) return;
      const T fr_w = T(fr_weight / double(b));
      for (int64_t i = 0; i < b; ++i) {
        T extra = fr_w * fkd::fr_grad(n[i], int(fr_power));
        if (cosine) extra += fkd::norm_grad(rho[i], g[i * b + i]);
        dg[i * b + i] += extra;
      }
    });
  }
};

at::Tensor fkd_gram_cpu(const at::Tensor& gs, const at::Tensor& kt, bool cosine, double fr_weight,
                        int64_t fr_power) {
  gram::check_fkd_args("kdops.fkd_gram", gs, fr_weight, fr_power);
  return gram::forward<CpuDev>("kdops.fkd_gram", gs, kt, cosine, fr_weight, fr_power);
}

std::tuple<at::Tensor, at::Tensor> fkd_gram_backward_cpu(const at::Tensor& grad, const at::Tensor& gs,
                                                         const at::Tensor& kt, bool cosine, double fr_weight,
                                                         int64_t fr_power, bool need_s, bool need_t) {
  gram::check_fkd_args("kdops.fkd_gram_backward", gs, fr_weight, fr_power);
  return gram::backward<CpuDev>("kdops.fkd_gram_backward", grad, gs, kt, need_s, need_t, cosine, fr_weight,
                                fr_power);
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("fkd_gram", &kdops::cpu::fkd_gram_cpu);
  m.impl("fkd_gram_backward", &kdops::cpu::fkd_gram_backward_cpu);
}
