// CPU kernels of the angle-tensor primitive psi[a, j, k] (see kdops/rkd_math.h) from a (batched) Gram matrix:
// the forward writes psi once, vectorised over k (no (n, n, d) differences and no b^3 temporaries); the
// backward takes any incoming gradient W through the same row and column passes as the RKD angle loss (W
// symmetrised in (j, k) where psi's dependence is symmetric) and rkd_host.h's assembly.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu/cpu_utils.h"
#include "kdops/gram_host.h"
#include "kdops/rkd_host.h"
#include "kdops/rkd_math.h"

namespace kdops {
namespace cpu {
namespace {

// One batch's (n, n) Gram matrix, its inverse distances and, backward, the incoming gradient (n, n, n).
template <typename T>
struct Slice {
  const T *g, *u, *w;
  int64_t n;
};

template <typename T>
KDOPS_CPU_CLONES void psi_row(const Slice<T>& m, int64_t a, int64_t j, T* out) {
  const int64_t n = m.n;
  const T *gj = m.g + j * n, *ga = m.g + a * n, *ua = m.u + a * n;
  const T g_aj = ga[j], g_aa = ga[a], u_aj = ua[j];
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = rkd::psi(gj[k], g_aj, ga[k], g_aa, u_aj, ua[k]);
}

// r = (W[a, j, k] + W[a, k, j]) / 2; rw = u_aj sum_k r u_ak, rq = sum_k psi r
template <typename T>
KDOPS_CPU_CLONES void psi_row_sums(const Slice<T>& m, int64_t a, int64_t j, T& rw, T& rq) {
  const int64_t n = m.n;
  const T *gj = m.g + j * n, *ga = m.g + a * n, *ua = m.u + a * n, *wj = m.w + (a * n + j) * n;
  const T* wa = m.w + a * n * n;
  const T g_aj = ga[j], g_aa = ga[a], u_aj = ua[j];
  T x = 0, y = 0;
#pragma omp simd reduction(+ : x, y)
  for (int64_t k = 0; k < n; ++k) {
    const T r = T(0.5) * (wj[k] + wa[k * n + j]);
    x += r * ua[k];
    y += r * rkd::psi(gj[k], g_aj, ga[k], g_aa, u_aj, ua[k]);
  }
  rw = x * u_aj;
  rq = y;
}

// dg[j, k] = sum_a W[a, j, k] u_aj u_ak: G_jk enters psi[a, j, k] only (G_kj is another input), so this part
// takes W as it is
template <typename T>
KDOPS_CPU_CLONES void psi_cols(const Slice<T>& m, int64_t j, T* dg_j) {
  const int64_t n = m.n;
  for (int64_t k = 0; k < n; ++k) dg_j[k] = 0;
  for (int64_t a = 0; a < n; ++a) {
    const T *ua = m.u + a * n, *wj = m.w + (a * n + j) * n;
    const T u_aj = ua[j];
    if (u_aj == T(0)) continue;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) dg_j[k] += wj[k] * u_aj * ua[k];
  }
}

at::Tensor angle_tensor_gram_cpu(const at::Tensor& gram_in) {
  gram::check_gram_transform("kdops.angle_tensor_gram", gram_in, 0);
  const at::Tensor g = gram_in.contiguous(), u = rkd::inverse_distances(g);
  const int64_t n = g.size(-1), batches = g.dim() == 3 ? g.size(0) : 1;
  std::vector<int64_t> shape(g.sizes().begin(), g.sizes().end());
  shape.push_back(n);
  at::Tensor out = at::empty(shape, g.options());
  if (n == 0 || batches == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "angle_tensor_gram_cpu", [&] {
    using T = scalar_t;
    const T *gp = g.const_data_ptr<T>(), *up = u.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    at::parallel_for(0, batches * n, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t bi = r / n, a = r % n;
        const Slice<T> m{gp + bi * n * n, up + bi * n * n, nullptr, n};
        for (int64_t j = 0; j < n; ++j) psi_row(m, a, j, op + (r * n + j) * n);
      }
    });
  });
  return out;
}

at::Tensor angle_tensor_gram_backward_cpu(const at::Tensor& grad_in, const at::Tensor& gram_in) {
  gram::check_gram_transform("kdops.angle_tensor_gram_backward", gram_in, 0);
  const at::Tensor g = gram_in.contiguous(), u = rkd::inverse_distances(g);
  const int64_t n = g.size(-1), batches = g.dim() == 3 ? g.size(0) : 1;
  TORCH_CHECK(grad_in.dim() == g.dim() + 1 && grad_in.size(-1) == n && grad_in.numel() == batches * n * n * n,
              "kdops.angle_tensor_gram_backward: grad must be the angle tensor's shape, got ", grad_in.sizes());
  const at::Tensor w = grad_in.to(g.scalar_type()).contiguous();
  at::Tensor rw = at::empty_like(g), rq = at::empty_like(g), dg = at::empty_like(g);
  if (n == 0 || batches == 0) return at::zeros_like(g);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "angle_tensor_gram_backward_cpu", [&] {
    using T = scalar_t;
    const T *gp = g.const_data_ptr<T>(), *up = u.const_data_ptr<T>(), *wp = w.const_data_ptr<T>();
    T *rwp = rw.mutable_data_ptr<T>(), *rqp = rq.mutable_data_ptr<T>(), *dgp = dg.mutable_data_ptr<T>();
    auto slice = [&](int64_t bi) { return Slice<T>{gp + bi * n * n, up + bi * n * n, wp + bi * n * n * n, n}; };
    at::parallel_for(0, batches * n, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const Slice<T> m = slice(r / n);
        const int64_t a = r % n;
        for (int64_t j = 0; j < n; ++j) psi_row_sums(m, a, j, rwp[r * n + j], rqp[r * n + j]);
      }
    });
    at::parallel_for(0, batches * n, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) psi_cols(slice(r / n), r % n, dgp + r * n);
    });
  });
  return rkd::assemble(u, rw, rq, dg);
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("angle_tensor_gram", &kdops::cpu::angle_tensor_gram_cpu);
  m.impl("angle_tensor_gram_backward", &kdops::cpu::angle_tensor_gram_backward_cpu);
}
