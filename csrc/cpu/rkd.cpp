// CPU kernels of the fused RKD angle loss: the O(b^3) triplet passes over Gram entries, one vertex a (forward,
// per-row sums) or one row j of dG (the G_jk part of the gradient) per task, vectorised over k. No (b, b, d)
// difference tensor and no b^3 angle tensor is formed.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cpu/cpu_utils.h"
#include "kdops/rkd_host.h"
#include "kdops/rkd_math.h"

namespace kdops {
namespace cpu {
namespace {

template <typename T>
struct Rows {
  const T *gs, *gt, *us, *ut;
  int64_t b;
};

// The rows and scalars of the triplets (a, j, *) on both sides: psi_s(k) and psi_t(k) for k = 0..b-1.
template <typename T>
struct Fan {
  const T *gsj, *gtj, *gsa, *gta, *usa, *uta;
  T gs_aj, gs_aa, us_aj, gt_aj, gt_aa, ut_aj;
  Fan(const Rows<T>& m, int64_t a, int64_t j)
      : gsj(m.gs + j * m.b), gtj(m.gt + j * m.b), gsa(m.gs + a * m.b), gta(m.gt + a * m.b), usa(m.us + a * m.b),
        uta(m.ut + a * m.b), gs_aj(gsa[j]), gs_aa(gsa[a]), us_aj(usa[j]), gt_aj(gta[j]), gt_aa(gta[a]),
        ut_aj(uta[j]) {}
};

// sum_k huber(psi_s - psi_t) for vertex a and point j
template <typename T>
KDOPS_CPU_CLONES T triplet_row_loss(const Rows<T>& m, int64_t a, int64_t j) {
  const int64_t b = m.b;
  const Fan<T> f(m, a, j);
  const T *gsj = f.gsj, *gtj = f.gtj, *gsa = f.gsa, *gta = f.gta, *usa = f.usa, *uta = f.uta;
  const T gs_aj = f.gs_aj, gs_aa = f.gs_aa, us_aj = f.us_aj, gt_aj = f.gt_aj, gt_aa = f.gt_aa, ut_aj = f.ut_aj;
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < b; ++k) {
    const T ps = rkd::psi(gsj[k], gs_aj, gsa[k], gs_aa, us_aj, usa[k]);
    const T pt = rkd::psi(gtj[k], gt_aj, gta[k], gt_aa, ut_aj, uta[k]);
    sum += rkd::huber(ps - pt);
  }
  return sum;
}

// rw = u_aj sum_k r u_ak and rq = sum_k psi r for both sides, r = c huber'(psi_s - psi_t) (teacher: -r)
template <typename T>
KDOPS_CPU_CLONES void triplet_row_sums(const Rows<T>& m, int64_t a, int64_t j, T c, T* out4) {
  const int64_t b = m.b;
  const Fan<T> f(m, a, j);
  const T *gsj = f.gsj, *gtj = f.gtj, *gsa = f.gsa, *gta = f.gta, *usa = f.usa, *uta = f.uta;
  const T gs_aj = f.gs_aj, gs_aa = f.gs_aa, us_aj = f.us_aj, gt_aj = f.gt_aj, gt_aa = f.gt_aa, ut_aj = f.ut_aj;
  T ws = 0, qs = 0, wt = 0, qt = 0;
#pragma omp simd reduction(+ : ws, qs, wt, qt)
  for (int64_t k = 0; k < b; ++k) {
    const T ps = rkd::psi(gsj[k], gs_aj, gsa[k], gs_aa, us_aj, usa[k]);
    const T pt = rkd::psi(gtj[k], gt_aj, gta[k], gt_aa, ut_aj, uta[k]);
    const T r = c * rkd::huber_grad(ps - pt);
    ws += r * usa[k];
    qs += r * ps;
    wt -= r * uta[k];
    qt -= r * pt;
  }
  out4[0] = ws * us_aj;
  out4[1] = qs;
  out4[2] = wt * ut_aj;
  out4[3] = qt;
}

// dg[j, k] += r u_aj u_ak over every vertex a (row j belongs to this task)
template <typename T>
KDOPS_CPU_CLONES void triplet_cols(const Rows<T>& m, int64_t j, T c, T* dgs_j, T* dgt_j) {
  const int64_t b = m.b;
  const T* gsj = m.gs + j * b;
  const T* gtj = m.gt + j * b;
  for (int64_t a = 0; a < b; ++a) {
    const Fan<T> f(m, a, j);
    const T *gsa = f.gsa, *gta = f.gta, *usa = f.usa, *uta = f.uta;
    const T gs_aj = f.gs_aj, gs_aa = f.gs_aa, us_aj = f.us_aj, gt_aj = f.gt_aj, gt_aa = f.gt_aa, ut_aj = f.ut_aj;
    if (us_aj == T(0) && ut_aj == T(0)) continue;  // every psi with this pair is 0 on both sides
#pragma omp simd
    for (int64_t k = 0; k < b; ++k) {
      const T ps = rkd::psi(gsj[k], gs_aj, gsa[k], gs_aa, us_aj, usa[k]);
      const T pt = rkd::psi(gtj[k], gt_aj, gta[k], gt_aa, ut_aj, uta[k]);
      const T r = c * rkd::huber_grad(ps - pt);
      dgs_j[k] += r * us_aj * usa[k];
      dgt_j[k] -= r * ut_aj * uta[k];
    }
  }
}

template <typename T>
Rows<T> rows_of(const at::Tensor& gs, const at::Tensor& gt, const at::Tensor& us, const at::Tensor& ut) {
  return {gs.const_data_ptr<T>(), gt.const_data_ptr<T>(), us.const_data_ptr<T>(), ut.const_data_ptr<T>(),
          gs.size(0)};
}

struct CpuDev {
  static at::Tensor forward(const at::Tensor& gs, const at::Tensor& gt, const at::Tensor& us, const at::Tensor& ut) {
    const int64_t b = gs.size(0);
    at::Tensor partial = at::empty({b}, gs.options().dtype(at::kDouble));
    double* pp = partial.mutable_data_ptr<double>();
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "rkd_angle_cpu", [&] {
      const Rows<scalar_t> m = rows_of<scalar_t>(gs, gt, us, ut);
      at::parallel_for(0, b, 1, [&](int64_t a0, int64_t a1) {
        for (int64_t a = a0; a < a1; ++a) {
          double s = 0;  // b^2 row sums per vertex, summed in double
          for (int64_t j = 0; j < b; ++j) s += triplet_row_loss<scalar_t>(m, a, j);
          pp[a] = s;
        }
      });
    });
    return partial.sum().to(gs.scalar_type());
  }

  static void rows(const at::Tensor& gs, const at::Tensor& gt, const at::Tensor& us, const at::Tensor& ut, double c,
                   at::Tensor& rws, at::Tensor& rqs, at::Tensor& rwt, at::Tensor& rqt) {
    const int64_t b = gs.size(0);
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "rkd_angle_rows_cpu", [&] {
      const Rows<scalar_t> m = rows_of<scalar_t>(gs, gt, us, ut);
      scalar_t *ws = rws.mutable_data_ptr<scalar_t>(), *qs = rqs.mutable_data_ptr<scalar_t>();
      scalar_t *wt = rwt.mutable_data_ptr<scalar_t>(), *qt = rqt.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, b, 1, [&](int64_t a0, int64_t a1) {
        scalar_t o[4];
        for (int64_t a = a0; a < a1; ++a) {
          for (int64_t j = 0; j < b; ++j) {
            triplet_row_sums<scalar_t>(m, a, j, scalar_t(c), o);
            ws[a * b + j] = o[0];
            qs[a * b + j] = o[1];
            wt[a * b + j] = o[2];
            qt[a * b + j] = o[3];
          }
        }
      });
    });
  }

  static void cols(const at::Tensor& gs, const at::Tensor& gt, const at::Tensor& us, const at::Tensor& ut, double c,
                   at::Tensor& dgs, at::Tensor& dgt) {
    const int64_t b = gs.size(0);
    AT_DISPATCH_FLOATING_TYPES(gs.scalar_type(), "rkd_angle_cols_cpu", [&] {
      const Rows<scalar_t> m = rows_of<scalar_t>(gs, gt, us, ut);
      scalar_t *ds = dgs.mutable_data_ptr<scalar_t>(), *dt = dgt.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, b, 1, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) triplet_cols<scalar_t>(m, j, scalar_t(c), ds + j * b, dt + j * b);
      });
    });
  }
};

at::Tensor rkd_angle_cpu(const at::Tensor& gs, const at::Tensor& gt) {
  return rkd::angle_forward<CpuDev>(gs, gt);
}

std::tuple<at::Tensor, at::Tensor> rkd_angle_backward_cpu(const at::Tensor& grad, const at::Tensor& gs,
                                                          const at::Tensor& gt, bool need_s, bool need_t) {
  return rkd::angle_backward<CpuDev>(grad, gs, gt, need_s, need_t);
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("rkd_angle", &kdops::cpu::rkd_angle_cpu);
  m.impl("rkd_angle_backward", &kdops::cpu::rkd_angle_backward_cpu);
}
