// Host emulations of the relational ops' CUDA kernels, for the CPU test suite on machines without a GPU. Each
// runs the device's decomposition with the same per-thread functions that the .cu files compile (the *_share
// / *_entry / *_column functions of kdops/<op>_math.h): one virtual block per row (or per pair of rows) of
// `threads` virtual threads, their shares reduced in CUB's order (cpu/block_emulate.h) and, where the kernel
// shares the result through shared memory, handed to every thread; second kernels run after the first has
// finished, as the launch order guarantees on the device. Test use only.
//   gram_transform_backward (csrc/cuda/gram.cu), fkd_gram (fkd.cu), pkt_gram (pkt.cu), rkd_angle (rkd.cu).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu/block_emulate.h"
#include "kdops/fkd_math.h"
#include "kdops/gram_host.h"
#include "kdops/gram_math.h"
#include "kdops/pkt_math.h"
#include "kdops/rkd_host.h"
#include "kdops/rkd_math.h"

namespace kdops {
namespace cpu {
namespace {

template <typename T>
T sum_emulated(const std::vector<T>& shares) {
  return block_reduce_emulated(shares, [](T a, T b) { return a + b; });
}

void check_threads(const char* op, int64_t threads) {
  TORCH_CHECK(threads >= 1, op, ": threads must be >= 1, got ", threads);
}

at::Tensor gram_transform_backward_emulate_device(const at::Tensor& grad_in, const at::Tensor& gram_in,
                                                  const at::Tensor& out_in, int64_t kind, int64_t threads) {
  check_threads("kdops._gram_transform_backward_emulate_device", threads);
  gram::check_gram_transform("kdops._gram_transform_backward_emulate_device", gram_in, kind);
  TORCH_CHECK(grad_in.sizes() == gram_in.sizes() && out_in.sizes() == gram_in.sizes(),
              "kdops._gram_transform_backward_emulate_device: grad and out must match gram's shape ",
              gram_in.sizes());
  const at::Tensor g = gram_in.contiguous(), out = out_in.contiguous();
  const at::Tensor dout = grad_in.to(g.scalar_type()).contiguous();
  at::Tensor dg = at::empty(g.sizes(), g.options());
  const int64_t n = g.size(-1), rows = n == 0 ? 0 : g.numel() / n;
  if (rows == 0) return dg;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gram_transform_backward_emulate", [&] {
    using T = scalar_t;
    const T *dp = dout.const_data_ptr<T>(), *op = out.const_data_ptr<T>(), *gp = g.const_data_ptr<T>();
    T* dgp = dg.mutable_data_ptr<T>();
    std::vector<T> rho(rows), share(threads);
    for (int64_t r = 0; r < rows; ++r) {  // the rows kernel: one block per row
      for (int64_t tid = 0; tid < threads; ++tid) {
        share[tid] = gram_ops::backward_row_share(dp, op, gp, n, int(kind), r, tid, threads, dgp);
      }
      rho[r] = sum_emulated(share);
    }
    for (int64_t r = 0; r < rows; ++r) gram_ops::backward_diag(dp, op, gp, n, int(kind), r, rho.data(), dgp);
  });
  return dg;
}


// ---- FKD (fkd_rows_kernel, fkd_diag_kernel)
struct FkdEmulated {
  static at::Tensor forward(const at::Tensor& gs, const at::Tensor& kt, bool cosine, double fr_weight,
                            int64_t fr_power, int64_t threads) {
    const int64_t b = gs.size(0);
    at::Tensor rows = at::empty({2, b}, gs.options());
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "fkd_gram_emulate", [&] {
      using T = scalar_t;
      T* rp = rows.mutable_data_ptr<T>();
      std::vector<T> share(threads);
      for (int64_t i = 0; i < b; ++i) {
        for (int64_t tid = 0; tid < threads; ++tid) {
          share[tid] = fkd::row_share<0>(gs.const_data_ptr<T>(), kt.const_data_ptr<T>(), b, cosine, T(0), false,
                                         false, i, tid, threads, static_cast<T*>(nullptr), static_cast<T*>(nullptr));
        }
        rp[i] = sum_emulated(share);
        rp[b + i] = fkd::row_fr(gs.const_data_ptr<T>(), b, int(fr_power), i);
      }
    });
    return rows[0].sum() / (double(b) * double(b - 1)) + rows[1].sum() * (fr_weight / double(b));
  }

  static void backward(const at::Tensor& gs, const at::Tensor& kt, bool need_s, bool need_t, at::Tensor& dgs,
                       at::Tensor& dkt, bool cosine, double fr_weight, int64_t fr_power, int64_t threads) {
    const int64_t b = gs.size(0);
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "fkd_gram_backward_emulate", [&] {
      using T = scalar_t;
      const T cf = T(1.0 / (double(b) * double(b - 1)));
      std::vector<T> rho(b), share(threads);
      for (int64_t i = 0; i < b; ++i) {
        for (int64_t tid = 0; tid < threads; ++tid) {
          share[tid] = fkd::row_share<1>(gs.const_data_ptr<T>(), kt.const_data_ptr<T>(), b, cosine, cf, need_s,
                                         need_t, i, tid, threads, dgs.mutable_data_ptr<T>(), dkt.mutable_data_ptr<T>());
        }
        rho[i] = sum_emulated(share);
      }
      if (need_s) {
        for (int64_t i = 0; i < b; ++i) {
          fkd::diag_entry(gs.const_data_ptr<T>(), b, cosine, int(fr_power), T(fr_weight / double(b)), rho.data(),
                          dgs.mutable_data_ptr<T>(), i);
        }
      }
    });
  }
};

at::Tensor fkd_gram_emulate_device(const at::Tensor& gs, const at::Tensor& kt, bool cosine, double fr_weight,
                                   int64_t fr_power, int64_t threads) {
  check_threads("kdops._fkd_gram_emulate_device", threads);
  gram::check_fkd_args("kdops._fkd_gram_emulate_device", gs, fr_weight, fr_power);
  return gram::forward<FkdEmulated>("kdops._fkd_gram_emulate_device", gs, kt, cosine, fr_weight, fr_power, threads);
}

std::tuple<at::Tensor, at::Tensor> fkd_gram_backward_emulate_device(const at::Tensor& grad, const at::Tensor& gs,
                                                                    const at::Tensor& kt, bool cosine,
                                                                    double fr_weight, int64_t fr_power, bool need_s,
                                                                    bool need_t, int64_t threads) {
  check_threads("kdops._fkd_gram_backward_emulate_device", threads);
  gram::check_fkd_args("kdops._fkd_gram_backward_emulate_device", gs, fr_weight, fr_power);
  return gram::backward<FkdEmulated>("kdops._fkd_gram_backward_emulate_device", grad, gs, kt, need_s, need_t,
                                     cosine, fr_weight, fr_power, threads);
}

// ---- PKT (pkt_rows_kernel, pkt_diag_kernel)
template <typename T>
pkt::Pair<T> pair_sum_emulated(const std::vector<pkt::Pair<T>>& shares) {
  return block_reduce_emulated(shares, [](const pkt::Pair<T>& a, const pkt::Pair<T>& b) { return pkt::pair_sum(a, b); });
}

struct PktEmulated {
  template <int Mode, typename T>
  static void rows(const T* gs, const T* gt, int64_t b, T eps, T cf, bool want_s, bool want_t, int64_t threads,
                   T* rows_out, T* dgs, T* dgt, T* rho_s, T* rho_t) {
    std::vector<pkt::Pair<T>> share(threads);
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t tid = 0; tid < threads; ++tid) share[tid] = pkt::affinity_share(gs, gt, b, eps, i, tid, threads);
      const pkt::Pair<T> r = pair_sum_emulated(share);
      const T irs = T(1) / r.a, irt = T(1) / r.b;
      for (int64_t tid = 0; tid < threads; ++tid) {
        share[tid] = pkt::term_share<Mode>(gs, gt, b, eps, i, irs, irt, tid, threads);
      }
      const pkt::Pair<T> w = pair_sum_emulated(share);
      if (Mode == 0) {
        rows_out[i] = w.a;
        continue;
      }
      for (int64_t tid = 0; tid < threads; ++tid) {
        share[tid] = pkt::grad_share(gs, gt, b, eps, cf, want_s, want_t, i, irs, irt, w.a, w.b, tid, threads, dgs, dgt);
      }
      const pkt::Pair<T> rho = pair_sum_emulated(share);
      rho_s[i] = rho.a;
      rho_t[i] = rho.b;
    }
  }

  static at::Tensor forward(const at::Tensor& gs, const at::Tensor& gt, double eps, int64_t threads) {
    const int64_t b = gs.size(0);
    at::Tensor rows_out = at::empty({b}, gs.options());
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "pkt_gram_emulate", [&] {
      using T = scalar_t;
      rows<0, T>(gs.const_data_ptr<T>(), gt.const_data_ptr<T>(), b, T(eps), T(0), false, false, threads,
                 rows_out.mutable_data_ptr<T>(), nullptr, nullptr, nullptr, nullptr);
    });
    return rows_out.sum() / (double(b) * double(b));
  }

  static void backward(const at::Tensor& gs, const at::Tensor& gt, bool need_s, bool need_t, at::Tensor& dgs,
                       at::Tensor& dgt, double eps, int64_t threads) {
    const int64_t b = gs.size(0);
    at::Tensor rho = at::empty({2, b}, gs.options());
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "pkt_gram_backward_emulate", [&] {
      using T = scalar_t;
      T* rp = rho.mutable_data_ptr<T>();
      rows<1, T>(gs.const_data_ptr<T>(), gt.const_data_ptr<T>(), b, T(eps), T(1.0 / (double(b) * double(b))), need_s,
                 need_t, threads, nullptr, dgs.mutable_data_ptr<T>(), dgt.mutable_data_ptr<T>(), rp, rp + b);
      for (int64_t j = 0; j < b; ++j) {
        if (need_s) pkt::diag_column(gs.const_data_ptr<T>(), b, T(eps), rp, dgs.mutable_data_ptr<T>(), j);
        if (need_t) pkt::diag_column(gt.const_data_ptr<T>(), b, T(eps), rp + b, dgt.mutable_data_ptr<T>(), j);
      }
    });
  }
};

at::Tensor pkt_gram_emulate_device(const at::Tensor& gs, const at::Tensor& gt, double eps, int64_t threads) {
  check_threads("kdops._pkt_gram_emulate_device", threads);
  gram::check_nonnegative("kdops._pkt_gram_emulate_device", "eps", eps);
  return gram::forward<PktEmulated>("kdops._pkt_gram_emulate_device", gs, gt, eps, threads);
}

std::tuple<at::Tensor, at::Tensor> pkt_gram_backward_emulate_device(const at::Tensor& grad, const at::Tensor& gs,
                                                                    const at::Tensor& gt, double eps, bool need_s,
                                                                    bool need_t, int64_t threads) {
  check_threads("kdops._pkt_gram_backward_emulate_device", threads);
  gram::check_nonnegative("kdops._pkt_gram_backward_emulate_device", "eps", eps);
  return gram::backward<PktEmulated>("kdops._pkt_gram_backward_emulate_device", grad, gs, gt, need_s, need_t, eps,
                                     threads);
}

// ---- RKD angle (rows_kernel, cols_kernel)
int64_t rkd_threads = 128;  // set per call by the entry points below (tests call them serially)

struct RkdEmulated {
  template <int Mode, typename T>
  static void pairs(const T* gs, const T* gt, const T* us, const T* ut, int64_t b, T c, T* const* outs) {
    constexpr int kSums = Mode == 0 ? 1 : 4;
    std::vector<T> share(rkd_threads);
    std::vector<T> parts(4 * rkd_threads);
    for (int64_t pair = 0; pair < b * b; ++pair) {
      const int64_t a = pair / b, j = pair % b;
      for (int64_t tid = 0; tid < rkd_threads; ++tid) {
        rkd::pair_share<Mode>(gs, gt, us, ut, b, c, a, j, tid, rkd_threads, &parts[4 * tid]);
      }
      T sums[4] = {0, 0, 0, 0};
      for (int q = 0; q < kSums; ++q) {
        for (int64_t tid = 0; tid < rkd_threads; ++tid) share[tid] = parts[4 * tid + q];
        sums[q] = sum_emulated(share);
      }
      rkd::pair_outputs<Mode>(us, ut, b, a, j, sums);
      for (int q = 0; q < kSums; ++q) outs[q][pair] = sums[q];
    }
  }

  static at::Tensor forward(const at::Tensor& gs, const at::Tensor& gt, const at::Tensor& us, const at::Tensor& ut) {
    const int64_t b = gs.size(0);
    at::Tensor partial = at::empty({b * b}, gs.options());
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "rkd_angle_emulate", [&] {
      using T = scalar_t;
      T* outs[4] = {partial.mutable_data_ptr<T>(), nullptr, nullptr, nullptr};
      pairs<0, T>(gs.const_data_ptr<T>(), gt.const_data_ptr<T>(), us.const_data_ptr<T>(), ut.const_data_ptr<T>(), b,
                  T(0), outs);
    });
    return partial.sum();
  }

  static void rows(const at::Tensor& gs, const at::Tensor& gt, const at::Tensor& us, const at::Tensor& ut, double c,
                   at::Tensor& rws, at::Tensor& rqs, at::Tensor& rwt, at::Tensor& rqt) {
    const int64_t b = gs.size(0);
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "rkd_angle_rows_emulate", [&] {
      using T = scalar_t;
      T* outs[4] = {rws.mutable_data_ptr<T>(), rqs.mutable_data_ptr<T>(), rwt.mutable_data_ptr<T>(),
                    rqt.mutable_data_ptr<T>()};
      pairs<1, T>(gs.const_data_ptr<T>(), gt.const_data_ptr<T>(), us.const_data_ptr<T>(), ut.const_data_ptr<T>(), b,
                  T(c), outs);
    });
  }

  static void cols(const at::Tensor& gs, const at::Tensor& gt, const at::Tensor& us, const at::Tensor& ut, double c,
                   at::Tensor& dgs, at::Tensor& dgt) {
    const int64_t b = gs.size(0);
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "rkd_angle_cols_emulate", [&] {
      using T = scalar_t;
      for (int64_t j = 0; j < b; ++j) {
        for (int64_t k = 0; k < b; ++k) {
          rkd::cols_entry(gs.const_data_ptr<T>(), gt.const_data_ptr<T>(), us.const_data_ptr<T>(),
                          ut.const_data_ptr<T>(), b, T(c), j, k, dgs.mutable_data_ptr<T>(), dgt.mutable_data_ptr<T>());
        }
      }
    });
  }
};

at::Tensor rkd_angle_emulate_device(const at::Tensor& gs, const at::Tensor& gt, int64_t threads) {
  check_threads("kdops._rkd_angle_emulate_device", threads);
  rkd_threads = threads;
  return rkd::angle_forward<RkdEmulated>(gs, gt);
}

std::tuple<at::Tensor, at::Tensor> rkd_angle_backward_emulate_device(const at::Tensor& grad, const at::Tensor& gs,
                                                                     const at::Tensor& gt, bool need_s, bool need_t,
                                                                     int64_t threads) {
  check_threads("kdops._rkd_angle_backward_emulate_device", threads);
  rkd_threads = threads;
  return rkd::angle_backward<RkdEmulated>(grad, gs, gt, need_s, need_t);
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("_gram_transform_backward_emulate_device", &kdops::cpu::gram_transform_backward_emulate_device);
  m.impl("_fkd_gram_emulate_device", &kdops::cpu::fkd_gram_emulate_device);
  m.impl("_fkd_gram_backward_emulate_device", &kdops::cpu::fkd_gram_backward_emulate_device);
  m.impl("_pkt_gram_emulate_device", &kdops::cpu::pkt_gram_emulate_device);
  m.impl("_pkt_gram_backward_emulate_device", &kdops::cpu::pkt_gram_backward_emulate_device);
  m.impl("_rkd_angle_emulate_device", &kdops::cpu::rkd_angle_emulate_device);
  m.impl("_rkd_angle_backward_emulate_device", &kdops::cpu::rkd_angle_backward_emulate_device);
}
