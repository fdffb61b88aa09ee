// CPU kernel of the Sinkhorn solver: the log-domain potential update over one Gram block, one row per task,
// two vectorised passes per row (max, then the sum of exponentials) that recompute the cost from the Gram
// entry instead of storing it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

#include "cpu/cpu_utils.h"
#include "kdops/common.h"
#include "kdops/ot_host.h"
#include "kdops/ot_math.h"

namespace kdops {
namespace cpu {
namespace {

template <int PK, typename T>
KDOPS_CPU_CLONES T row_lse(const T* d, T xh, const T* yh, const T* h, int64_t k, T inv_eps, T p) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < k; ++j) {
    const T v = ot::lse_arg(h[j], ot::cost<PK>(d[j], xh, yh[j], p), inv_eps);
    mx = v > mx ? v : mx;
  }
  if (!(mx > -std::numeric_limits<T>::infinity())) return mx;  // every weight 0 (or NaN): passed on
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < k; ++j) sum += exp_(ot::lse_arg(h[j], ot::cost<PK>(d[j], xh, yh[j], p), inv_eps) - mx);
  return mx + std::log(sum);
}

// One pass instead of two: the row's previous potential gives the shift (-f_prev / eps is the previous LSE,
// and the potentials move little between iterations), exact as long as the shifted terms neither overflow
// nor all underflow; otherwise (first iterations, eps-scaling steps) the two-pass form above.
template <int PK, typename T>
KDOPS_CPU_CLONES T row_lse_shifted(const T* d, T xh, const T* yh, const T* h, int64_t k, T inv_eps, T p, T shift) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < k; ++j) sum += exp_(ot::lse_arg(h[j], ot::cost<PK>(d[j], xh, yh[j], p), inv_eps) - shift);
  if (sum > T(1e-20) && sum < T(1e20)) return shift + std::log(sum);
  return row_lse<PK, T>(d, xh, yh, h, k, inv_eps, p);
}

struct CpuDev {
  static void lse(const at::Tensor& d, const at::Tensor& xh, const at::Tensor& yh, const at::Tensor& h, double eps,
                  double p, bool given, at::Tensor& out) {
    const int64_t r = d.size(0), k = d.size(1);
    AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "sinkhorn_lse_cpu", [&] {
      const scalar_t* dp = d.const_data_ptr<scalar_t>();
      const scalar_t* xp = xh.const_data_ptr<scalar_t>();
      const scalar_t* yp = yh.const_data_ptr<scalar_t>();
      const scalar_t* hp = h.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const scalar_t inv_eps = scalar_t(1.0 / eps), e = scalar_t(eps), pp = scalar_t(p);
      auto rows = [&](auto pk) {
        constexpr int PK = decltype(pk)::value;
        at::parallel_for(0, r, std::max<int64_t>(1, 8192 / std::max<int64_t>(k, 1)), [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            // out holds the previous potential of the row (0 before the first update: a shift of 0)
            op[i] = -e * row_lse_shifted<PK, scalar_t>(dp + i * k, xp[i], yp, hp, k, inv_eps, pp, -op[i] * inv_eps);
          }
        });
      };
      ot::dispatch_power_kind(given, p, rows);
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_solve_cpu(const at::Tensor& x, const at::Tensor& y,
                                                                  const at::Tensor& loga, const at::Tensor& logb,
                                                                  double eps, double p, int64_t max_iter, double tol,
                                                                  double scaling, int64_t check_every, bool online,
                                                                  int64_t tile) {
  return ot::solve<CpuDev>(x, y, loga, logb, {eps, p, tol, scaling, max_iter, check_every, tile, online});
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("sinkhorn_solve", &kdops::cpu::sinkhorn_solve_cpu);
}
