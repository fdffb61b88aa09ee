// CPU kernels of the Gram-matrix primitives (see kdops/gram_math.h): the cosine kernel and the (squared)
// pairwise distances as one pass over G, and their backward as one pass over the rows that also gathers the
// row and column sums for the diagonal (column sums per thread, added at the end).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/cpu_utils.h"
#include "kdops/gram_host.h"
#include "kdops/gram_math.h"

namespace kdops {
namespace cpu {
namespace {

// diag[r] = G_ii and scale[r] = c_i for every row r of the batch
template <typename T>
void diagonals(const T* g, int64_t rows, int64_t n, T* diag, T* scale) {
  for (int64_t r = 0; r < rows; ++r) {
    diag[r] = g[(r / n) * n * n + (r % n) * n + r % n];
    scale[r] = gram_ops::cosine_scale(diag[r]);
  }
}

template <typename T>
KDOPS_CPU_CLONES void row_forward(int kind, const T* g, const T* d, const T* c, T gii, T ci, int64_t n, int64_t i,
                                  T* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = gram_ops::forward(kind, g[j], gii, d[j], ci, c[j], j == i);
}

template <typename T>
KDOPS_CPU_CLONES T row_backward(int kind, const T* dout, const T* out, const T* g, const T* d, const T* c, T gii,
                                T ci, int64_t n, int64_t i, T* dg, T* col) {
  T rho = 0;
#pragma omp simd reduction(+ : rho)
  for (int64_t j = 0; j < n; ++j) {
    T contrib;
    dg[j] = gram_ops::direct_grad(kind, dout[j], out[j], g[j], gii, d[j], ci, c[j], j == i, contrib);
    rho += contrib;
    col[j] += contrib;
  }
  return rho;
}

int64_t row_grain(int64_t n) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1));
}

at::Tensor gram_transform_cpu(const at::Tensor& gram_in, int64_t kind) {
  gram::check_gram_transform("kdops.gram_transform", gram_in, kind);
  const at::Tensor g = gram_in.contiguous();
  at::Tensor out = at::empty(g.sizes(), g.options());
  const int64_t n = g.size(-1), rows = n == 0 ? 0 : g.numel() / n;
  if (rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gram_transform_cpu", [&] {
    using T = scalar_t;
    const T* gp = g.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    std::vector<T> buf(2 * rows);
    diagonals(gp, rows, n, buf.data(), buf.data() + rows);
    const T *d = buf.data(), *c = d + rows;
    at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b0 = (r / n) * n, i = r % n;
        row_forward<T>(int(kind), gp + r * n, d + b0, c + b0, d[r], c[r], n, i, op + r * n);
      }
    });
  });
  return out;
}

at::Tensor gram_transform_backward_cpu(const at::Tensor& grad_in, const at::Tensor& gram_in, const at::Tensor& out_in,
                                       int64_t kind) {
  gram::check_gram_transform("kdops.gram_transform_backward", gram_in, kind);
  TORCH_CHECK(grad_in.sizes() == gram_in.sizes() && out_in.sizes() == gram_in.sizes(),
              "kdops.gram_transform_backward: grad and out must match gram's shape ", gram_in.sizes());
  const at::Tensor g = gram_in.contiguous(), out = out_in.contiguous();
  const at::Tensor dout = grad_in.to(g.scalar_type()).contiguous();
  at::Tensor dg = at::empty(g.sizes(), g.options());
  const int64_t n = g.size(-1), rows = n == 0 ? 0 : g.numel() / n;
  if (rows == 0) return dg;
  const int threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gram_transform_backward_cpu", [&] {
    using T = scalar_t;
    const T *gp = g.const_data_ptr<T>(), *op = out.const_data_ptr<T>(), *dp = dout.const_data_ptr<T>();
    T* dgp = dg.mutable_data_ptr<T>();
    // diagonals and scales (2 rows), row sums (rows), per-thread column sums (rows each)
    std::vector<T> buf(3 * rows + rows * threads, T(0));
    diagonals(gp, rows, n, buf.data(), buf.data() + rows);
    const T *d = buf.data(), *c = d + rows;
    T *rho = buf.data() + 2 * rows, *cols = rho + rows;
    at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
      T* col = cols + rows * at::get_thread_num();
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b0 = (r / n) * n, i = r % n;
        rho[r] = row_backward<T>(int(kind), dp + r * n, op + r * n, gp + r * n, d + b0, c + b0, d[r], c[r], n, i,
                                 dgp + r * n, col + b0);
      }
    });
    for (int64_t r = 0; r < rows; ++r) {
      T kappa = 0;
      for (int th = 0; th < threads; ++th) kappa += cols[rows * th + r];
      dgp[r * n + r % n] += gram_ops::diag_factor(int(kind), d[r]) * (rho[r] + kappa);
    }
  });
  return dg;
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("gram_transform", &kdops::cpu::gram_transform_cpu);
  m.impl("gram_transform_backward", &kdops::cpu::gram_transform_backward_cpu);
}
