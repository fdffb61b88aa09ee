// CPU kernels of the fused CC epilogue (see kdops/cc_math.h): per row of the two Gram matrices, the squared
// differences of the correlation kernels (forward), or the gradient of their Frobenius norm (backward, after
// a first pass for the norm). No b x b kernel matrix is formed.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/cpu_utils.h"
#include "kdops/cc_math.h"
#include "kdops/gram_host.h"
#include "kdops/host_common.h"

namespace kdops {
namespace cpu {
namespace {

// The squares are summed in double: a float difference of C beyond 1.8e19 (Gram entries of 1e6 at order 3)
// is representable, its square is not.
template <typename T, int K>
KDOPS_CPU_CLONES double row_sq_diff(const T* s, const T* t, int64_t b, T two_gamma, int order, T scale) {
  double l = 0;
#pragma omp simd reduction(+ : l)
  for (int64_t j = 0; j < b; ++j) {
    T ds, dt;
    const T d = scale * (cc::series<T, K>(s[j], two_gamma, order, ds) -  //
                         cc::series<T, K>(t[j], two_gamma, order, dt));
    l += double(d) * double(d);
  }
  return l;
}

template <typename T, int K, bool WS, bool WT>
KDOPS_CPU_CLONES void row_grads(const T* s, const T* t, int64_t b, T two_gamma, int order, T cf, T* gs, T* gt) {
#pragma omp simd
  for (int64_t j = 0; j < b; ++j) {
    T ds, dt;
    const T d = cf * (cc::series<T, K>(s[j], two_gamma, order, ds) - cc::series<T, K>(t[j], two_gamma, order, dt));
    if (WS) gs[j] = d * ds;
    if (WT) gt[j] = -d * dt;
  }
}

// sum over all entries of (C_s - C_t)^2, rows in parallel and summed in double
template <typename T>
double total_sq_diff(const T* s, const T* t, int64_t b, T two_gamma, int order, T scale) {
  std::vector<double> rows(b);
  dispatch_small_int<4, -1>(order, [&](auto k) {
    constexpr int K = decltype(k)::value;
    at::parallel_for(0, b, std::max<int64_t>(1, 4096 / std::max<int64_t>(b, 1)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        rows[i] = row_sq_diff<T, K>(s + i * b, t + i * b, b, two_gamma, order, scale);
      }
    });
  });
  double total = 0;
  for (double r : rows) total += r;
  return total;
}

struct CpuDev {
  static at::Tensor forward(const at::Tensor& gs, const at::Tensor& gt, double gamma, int64_t order) {
    const int64_t b = gs.size(0);
    at::Tensor out = at::empty({}, gs.options());
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "cc_gram_cpu", [&] {
      using T = scalar_t;
      const double total = total_sq_diff(gs.const_data_ptr<T>(), gt.const_data_ptr<T>(), b, T(2 * gamma),
                                         int(order), T(std::exp(-2 * gamma)));
      *out.mutable_data_ptr<T>() = T(std::sqrt(total) / (double(b) * double(b)));
    });
    return out;
  }

  static void backward(const at::Tensor& gs, const at::Tensor& gt, bool need_s, bool need_t, at::Tensor& dgs,
                       at::Tensor& dgt, double gamma, int64_t order) {
    const int64_t b = gs.size(0);
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "cc_gram_backward_cpu", [&] {
      using T = scalar_t;
      const T *sp = gs.const_data_ptr<T>(), *tp = gt.const_data_ptr<T>();
      const T two_gamma = T(2 * gamma), scale = T(std::exp(-2 * gamma));
      const double norm = std::sqrt(total_sq_diff(sp, tp, b, two_gamma, int(order), scale));
      // d|D| / dD = D / |D| (0 at D = 0, the norm's subgradient), then / b^2
      // times the factors of C and dC/dg: e^(-2 gamma) twice and 2 gamma
      const T cf = norm > 0 ? T(std::exp(-4 * gamma) * 2 * gamma / (norm * double(b) * double(b))) : T(0);
      T* ds = need_s ? dgs.mutable_data_ptr<T>() : nullptr;
      T* dt = need_t ? dgt.mutable_data_ptr<T>() : nullptr;
      dispatch_small_int<4, -1>(order, [&](auto k) {
        dispatch_grad_flags(need_s, need_t, [&](auto ws, auto wt) {
          constexpr int K = decltype(k)::value;
          constexpr bool WS = decltype(ws)::value, WT = decltype(wt)::value;
          at::parallel_for(0, b, std::max<int64_t>(1, 4096 / std::max<int64_t>(b, 1)), [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) {
              row_grads<T, K, WS, WT>(sp + i * b, tp + i * b, b, two_gamma, int(order), cf,
                                      WS ? ds + i * b : nullptr, WT ? dt + i * b : nullptr);
            }
          });
        });
      });
    });
  }
};

at::Tensor cc_gram_cpu(const at::Tensor& gs, const at::Tensor& gt, double gamma, int64_t order) {
  gram::check_cc_args("kdops.cc_gram", gamma, order);
  return gram::forward<CpuDev>("kdops.cc_gram", gs, gt, gamma, order);
}

std::tuple<at::Tensor, at::Tensor> cc_gram_backward_cpu(const at::Tensor& grad, const at::Tensor& gs,
                                                        const at::Tensor& gt, double gamma, int64_t order,
                                                        bool need_s, bool need_t) {
  gram::check_cc_args("kdops.cc_gram_backward", gamma, order);
  return gram::backward<CpuDev>("kdops.cc_gram_backward", grad, gs, gt, need_s, need_t, gamma, order);
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("cc_gram", &kdops::cpu::cc_gram_cpu);
  m.impl("cc_gram_backward", &kdops::cpu::cc_gram_backward_cpu);
}
