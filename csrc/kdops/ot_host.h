// Host side of the Sinkhorn solver, shared by the CPU and CUDA entry points: checks, the GEMMs (ATen) and the
// iteration loop. `Dev::lse(D, xh, yh, h, eps, p, given, out)` is the fused per-device kernel: for each row i
// of the Gram block D (r x k) it writes out_i = -eps * log sum_k exp(h_k - c(D_ik, xh_i, yh_k) / eps), or with
// `given` the block is the cost itself.
//
// tensorized: the cost C and its transpose are formed once (one GEMM); each iteration is two kernel calls into
// buffers allocated before the loop. online: D is recomputed per tile of `tile` rows into one reused buffer, so
// memory is O(tile * (n + m) + (n + m) * d) and the n x m cost is never stored.
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/cdist.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace kdops {
namespace ot {

struct SolveOptions {
  double eps, p, tol, scaling;
  int64_t max_iter, check_every, tile;
  bool online;
};

inline void check_solve(const at::Tensor& x, const at::Tensor& y, const at::Tensor& loga, const at::Tensor& logb,
                        const SolveOptions& o) {
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3, "kdops.sinkhorn_solve: x and y must be (B, n, d) and (B, m, d)");
  TORCH_CHECK(x.size(0) == y.size(0) && x.size(2) == y.size(2),
              "kdops.sinkhorn_solve: x and y must share B and d, got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(loga.sizes() == x.sizes().slice(0, 2) && logb.sizes() == y.sizes().slice(0, 2),
              "kdops.sinkhorn_solve: log weights must be (B, n) and (B, m)");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && x.scalar_type() == loga.scalar_type() &&
                  x.scalar_type() == logb.scalar_type(),
              "kdops.sinkhorn_solve: x, y and the log weights must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "kdops.sinkhorn_solve: float32 or float64 inputs expected (the Python API casts)");
  TORCH_CHECK(x.device() == y.device() && x.device() == loga.device() && x.device() == logb.device(),
              "kdops.sinkhorn_solve: all inputs must be on one device");
  TORCH_CHECK(o.eps > 0 && std::isfinite(o.eps), "kdops.sinkhorn_solve: eps must be finite and > 0, got ", o.eps);
  TORCH_CHECK(o.p >= 1, "kdops.sinkhorn_solve: p must be >= 1, got ", o.p);
  TORCH_CHECK(o.max_iter >= 1, "kdops.sinkhorn_solve: max_iter must be >= 1");
  TORCH_CHECK(o.scaling == 0 || (o.scaling > 0 && o.scaling < 1),
              "kdops.sinkhorn_solve: scaling must be in (0, 1) (0: off), got ", o.scaling);
  TORCH_CHECK(o.check_every >= 1 && o.tile >= 1, "kdops.sinkhorn_solve: check_every and tile must be >= 1");
}

// The cost |x - y|^p / p of a block of rows of a against the rows of b, for p != 2: from the direct distance
// (the Gram identity would lose half the digits of |x - y| at nearly coincident points).
inline at::Tensor direct_cost(const at::Tensor& a, const at::Tensor& b, double p) {
  at::Tensor c = at::cdist(a, b, 2.0, /*compute_mode=*/2);  // 2: never through a GEMM
  if (p == 1.0) return c;
  return c.pow_(p).div_(p);
}

// One half-iteration: out (rows of a) <- -eps * LSE over the columns of b, for every row. The online backend
// recomputes the block per tile of rows: the Gram block (the kernel forms the cost from it) for p = 2, the cost
// itself otherwise.
template <class Dev>
void update(const at::Tensor& a, const at::Tensor& b, const at::Tensor& full, const at::Tensor& ah,
            const at::Tensor& bh, const at::Tensor& h, double eps, double p, const SolveOptions& o, at::Tensor& buf,
            at::Tensor& out) {
  if (!o.online) {
    Dev::lse(full, ah, bh, h, eps, p, true, out);
    return;
  }
  const int64_t rows = a.size(0);
  const at::Tensor bt = b.t();
  for (int64_t r0 = 0; r0 < rows; r0 += o.tile) {
    const int64_t r1 = std::min(rows, r0 + o.tile);
    at::Tensor o_slice = out.narrow(0, r0, r1 - r0);
    if (p != 2.0) {
      Dev::lse(direct_cost(a.narrow(0, r0, r1 - r0), b, p), ah.narrow(0, r0, r1 - r0), bh, h, eps, p, true, o_slice);
      continue;
    }
    at::Tensor d = buf.narrow(0, 0, r1 - r0);
    at::mm_out(d, a.narrow(0, r0, r1 - r0), bt);
    Dev::lse(d, ah.narrow(0, r0, r1 - r0), bh, h, eps, p, false, o_slice);
  }
}

// The cost |x - y|^p / p (n x m): for p = 2 from one GEMM, as the kernels would compute it (ot_math.h);
// otherwise from the direct distance (direct_cost).
inline at::Tensor cost_matrix(const at::Tensor& x, const at::Tensor& y, const at::Tensor& xh, const at::Tensor& yh,
                              double p) {
  if (p != 2.0) return direct_cost(x, y, p);
  return (xh.unsqueeze(1) + yh.unsqueeze(0)).sub_(at::mm(x, y.t())).clamp_min_(0);
}

// Upper bound of the cost over the pairs, for the first eps of eps-scaling: (max|x| + max|y|)^p / p.
inline double cost_bound(const at::Tensor& xh, const at::Tensor& yh, double p) {
  const double rx = std::sqrt(2.0 * xh.max().item<double>()), ry = std::sqrt(2.0 * yh.max().item<double>());
  return std::pow(rx + ry, p) / p;
}

// Returns the dual potentials (f (B, n), g (B, m)) after the iterations, and the number of iterations run
// per problem (B,) as int64 on the host device.
template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> solve(const at::Tensor& x_in, const at::Tensor& y_in,
                                                     const at::Tensor& loga_in, const at::Tensor& logb_in,
                                                     const SolveOptions& o) {
  check_solve(x_in, y_in, loga_in, logb_in, o);
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const at::Tensor loga = loga_in.contiguous(), logb = logb_in.contiguous();
  const int64_t B = x.size(0), n = x.size(1), m = y.size(1);
  at::Tensor f = at::zeros({B, n}, x.options()), g = at::zeros({B, m}, x.options());
  at::Tensor iters = at::zeros({B}, x.options().dtype(at::kLong).device(at::kCPU));
  if (B == 0 || n == 0 || m == 0) return {f, g, iters};
  const at::Tensor xh = (x * x).sum(-1).mul_(0.5), yh = (y * y).sum(-1).mul_(0.5);
  at::Tensor ha = at::empty({n}, x.options()), hb = at::empty({m}, x.options());
  at::Tensor f_prev = at::empty({n}, x.options());
  at::Tensor d, dt, buf_r, buf_c;
  if (o.online) {
    if (o.p == 2.0) {
      buf_r = at::empty({std::min(n, o.tile), m}, x.options());
      buf_c = at::empty({std::min(m, o.tile), n}, x.options());
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor xb = x[b], yb = y[b], la = loga[b], lb = logb[b], xhb = xh[b], yhb = yh[b];
    at::Tensor fb = f[b], gb = g[b];
    if (!o.online) {
      d = cost_matrix(xb, yb, xhb, yhb, o.p);
      dt = d.t().contiguous();
    }
    const double eps0 = o.scaling > 0 ? std::max(o.eps, cost_bound(xhb, yhb, o.p)) : o.eps;
    double e = eps0;
    int64_t it = 0;
    bool have_prev = false;
    while (it < o.max_iter) {
      at::add_out(hb, lb, gb, 1.0 / e);  // h_j = log b_j + g_j / eps
      update<Dev>(xb, yb, d, xhb, yhb, hb, e, o.p, o, buf_r, fb);
      at::add_out(ha, la, fb, 1.0 / e);
      update<Dev>(yb, xb, dt, yhb, xhb, ha, e, o.p, o, buf_c, gb);
      ++it;
      const bool annealed = e <= o.eps;
      if (!annealed) {
        e = std::max(o.eps, e * o.scaling);
        continue;
      }
      // Convergence: the change of f over one iteration, looked at every check_every iterations only
      // (one host sync per check).
      if (o.tol > 0) {
        if (have_prev && it % o.check_every == 0) {
          if ((fb - f_prev).abs().max().item<double>() < o.tol) break;
          have_prev = false;
        }
        if ((it + 1) % o.check_every == 0) {
          f_prev.copy_(fb);
          have_prev = true;
        }
      }
    }
    iters.data_ptr<int64_t>()[b] = it;
  }
  return {f, g, iters};
}

}  // namespace ot
}  // namespace kdops
