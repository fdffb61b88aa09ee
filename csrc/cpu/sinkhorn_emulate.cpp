// Host emulation of the CUDA row kernel of the Sinkhorn solver, so that the CPU test suite executes its block
// algorithm on machines without a GPU: for each row, `threads` virtual threads run kdops/ot_math.h's
// lse_thread_max over their strided share, the maxima are reduced in CUB's order (cpu/block_emulate.h) and
// shared, the threads run lse_thread_sum, the sums are reduced likewise, and lse_block_finish gives the
// potential: the same functions, in the same order, as csrc/cuda/sinkhorn.cu. The iteration loop is ot::solve,
// as on either device. Test use only.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/block_emulate.h"
#include "kdops/ot_host.h"
#include "kdops/ot_math.h"

namespace kdops {
namespace cpu {
namespace {

int64_t emulated_threads = 256;  // set per call by sinkhorn_solve_emulate_device (tests run it serially)

struct EmulatedDev {
  static void lse(const at::Tensor& d, const at::Tensor& xh, const at::Tensor& yh, const at::Tensor& h, double eps,
                  double p, bool given, at::Tensor& out) {
    const int64_t r = d.size(0), k = d.size(1), threads = emulated_threads;
    AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "sinkhorn_lse_emulate", [&] {
      using T = scalar_t;
      const T* dp = d.const_data_ptr<T>();
      const T* xp = xh.const_data_ptr<T>();
      const T* yp = yh.const_data_ptr<T>();
      const T* hp = h.const_data_ptr<T>();
      T* op = out.mutable_data_ptr<T>();
      const T inv_eps = T(1.0 / eps), e = T(eps), pp = T(p);
      auto rows = [&](auto pk) {
        constexpr int PK = decltype(pk)::value;
        std::vector<T> part(threads);
        for (int64_t i = 0; i < r; ++i) {
          const T* row = dp + i * k;
          for (int64_t tid = 0; tid < threads; ++tid) {
            part[tid] = ot::lse_thread_max<PK>(row, xp[i], yp, hp, k, inv_eps, pp, tid, threads);
          }
          const T mx = block_reduce_emulated(part, [](T a, T b) { return a > b ? a : b; });
          T sum = 0;
          if (ot::lse_needs_sum(mx)) {
            for (int64_t tid = 0; tid < threads; ++tid) {
              part[tid] = ot::lse_thread_sum<PK>(row, xp[i], yp, hp, k, inv_eps, pp, mx, tid, threads);
            }
            sum = block_reduce_emulated(part, [](T a, T b) { return a + b; });
          }
          op[i] = ot::lse_block_finish(mx, sum, e);
        }
      };
      ot::dispatch_power_kind(given, p, rows);
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_solve_emulate_device(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& loga, const at::Tensor& logb, double eps, double p,
    int64_t max_iter, double tol, double scaling, int64_t check_every, bool online, int64_t tile, int64_t threads) {
  TORCH_CHECK(threads >= 1, "kdops._sinkhorn_solve_emulate_device: threads must be >= 1, got ", threads);
  emulated_threads = threads;
  return ot::solve<EmulatedDev>(x, y, loga, logb, {eps, p, tol, scaling, max_iter, check_every, tile, online});
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("_sinkhorn_solve_emulate_device", &kdops::cpu::sinkhorn_solve_emulate_device);
}
