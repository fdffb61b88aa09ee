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

#include "cpu/cpu_utils.h"
#include "kdops/common.h"
#include "kdops/ot_host.h"
#include "kdops/ot_math.h"

namespace kdops {
namespace cpu {
namespace {

template <typename T>
KDOPS_CPU_CLONES T row_lse(const T* d, T xh, const T* yh, const T* h, int64_t k, T inv_eps, T p) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < k; ++j) {
    const T v = ot::lse_arg(h[j], ot::cost(d[j], xh, yh[j], p), inv_eps);
    mx = v > mx ? v : mx;
  }
  if (!(mx > -std::numeric_limits<T>::infinity())) return mx;  // every weight 0 (or NaN): passed on
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < k; ++j) sum += exp_(ot::lse_arg(h[j], ot::cost(d[j], xh, yh[j], p), inv_eps) - mx);
  return mx + std::log(sum);
}

struct CpuDev {
  static void lse(const at::Tensor& d, const at::Tensor& xh, const at::Tensor& yh, const at::Tensor& h, double eps,
                  double p, at::Tensor& out) {
    const int64_t r = d.size(0), k = d.size(1);
    AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "sinkhorn_lse_cpu", [&] {
      const scalar_t* dp = d.const_data_ptr<scalar_t>();
      const scalar_t* xp = xh.const_data_ptr<scalar_t>();
      const scalar_t* yp = yh.const_data_ptr<scalar_t>();
      const scalar_t* hp = h.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const scalar_t inv_eps = scalar_t(1.0 / eps), e = scalar_t(eps), pp = scalar_t(p);
      at::parallel_for(0, r, std::max<int64_t>(1, 8192 / std::max<int64_t>(k, 1)), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) op[i] = -e * row_lse<scalar_t>(dp + i * k, xp[i], yp, hp, k, inv_eps, pp);
      });
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
