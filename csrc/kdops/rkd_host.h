// Host side of the fused RKD angle loss, shared by the CPU and CUDA entry points. Inputs are the Gram
// matrices G = X X^T of student and teacher (b x b, from an ATen GEMM the caller differentiates); the op
// returns mean over the b^3 triplets of smooth-L1(psi_s - psi_t) and, in its backward, dL/dG for each side.
// `Dev` supplies the O(b^3) passes:
//   Dev::forward(gs, gt, us, ut) -> 0-dim sum of the smooth-L1 terms (accumulation dtype);
//   Dev::rows(gs, gt, us, ut, c, rws, rqs, rwt, rqt): per (a, j): rw = u_aj sum_k r u_ak, rq = sum_k psi r
//       with r = c * huber'(psi_s - psi_t) (negated for the teacher);
//   Dev::cols(gs, gt, us, ut, c, dgs, dgt): dg[j, k] = sum_a r u_aj u_ak (the G_jk part of the gradient).
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/diag_embed.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <limits>
#include <tuple>

namespace kdops {
namespace rkd {

inline void check_grams(const at::Tensor& gs, const at::Tensor& gt) {
  TORCH_CHECK(gs.dim() == 2 && gs.size(0) == gs.size(1) && gt.sizes() == gs.sizes(),
              "kdops.rkd_angle: student and teacher Gram matrices must both be (b, b), got ", gs.sizes(), " and ",
              gt.sizes());
  TORCH_CHECK(gs.scalar_type() == gt.scalar_type() &&
                  (gs.scalar_type() == at::kFloat || gs.scalar_type() == at::kDouble),
              "kdops.rkd_angle: Gram matrices must be float32 or float64 and of one dtype");
  TORCH_CHECK(gs.device() == gt.device(), "kdops.rkd_angle: Gram matrices must be on one device");
}

// u[a, j] = 1 / |x_j - x_a| from the Gram matrix ((b, b) or batched (B, b, b)), 0 where the pair is degenerate: a
// distance under 1e-12 (where F.normalize gives the zero vector) or a squared distance within the cancellation
// noise of the identity |x_a|^2 + |x_j|^2 - 2 <x_a, x_j> (16 ulp of the squared norms).
inline at::Tensor inverse_distances(const at::Tensor& g) {
  const at::Tensor diag = g.diagonal(0, -2, -1);
  const at::Tensor norms = diag.unsqueeze(-1) + diag.unsqueeze(-2);
  const at::Tensor sq = norms - 2 * g;
  const double ulp = g.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                     : double(std::numeric_limits<float>::epsilon());
  const at::Tensor degenerate = (sq <= norms * (16 * ulp)) | (sq < 1e-24);
  return at::where(degenerate, at::zeros_like(g), at::rsqrt(sq.clamp_min(1e-24)));
}

template <class Dev>
at::Tensor angle_forward(const at::Tensor& gs_in, const at::Tensor& gt_in) {
  check_grams(gs_in, gt_in);
  const at::Tensor gs = gs_in.contiguous(), gt = gt_in.contiguous();
  const int64_t b = gs.size(0);
  if (b == 0) return at::zeros({}, gs.options());
  const at::Tensor total = Dev::forward(gs, gt, inverse_distances(gs), inverse_distances(gt));
  return total / (double(b) * double(b) * double(b));
}

// One side's dL/dG ((b, b) or batched) from its per-row sums and its G_jk part, for a weight r[a, j, k] symmetric
// in (j, k): rw[a, j] = u_aj sum_k r u_ak, rq[a, j] = sum_k psi r, dg[j, k] = sum_a r u_aj u_ak.
inline at::Tensor assemble(const at::Tensor& u, const at::Tensor& rw, const at::Tensor& rq, const at::Tensor& dg) {
  const at::Tensor ds = -(u * u) * rq;  // dL/dS[a, j], S the squared distance
  const at::Tensor diag = rw.sum(-1) + ds.sum(-1) + ds.sum(-2);
  return dg - 2 * rw - 2 * ds + at::diag_embed(diag);
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor> angle_backward(const at::Tensor& grad, const at::Tensor& gs_in,
                                                  const at::Tensor& gt_in, bool need_s, bool need_t) {
  check_grams(gs_in, gt_in);
  const at::Tensor gs = gs_in.contiguous(), gt = gt_in.contiguous();
  const int64_t b = gs.size(0);
  if (b == 0 || !(need_s || need_t)) return {at::zeros_like(gs), at::zeros_like(gt)};
  const at::Tensor us = inverse_distances(gs), ut = inverse_distances(gt);
  const double c = 1.0 / (double(b) * double(b) * double(b));
  at::Tensor rws = at::empty_like(gs), rqs = at::empty_like(gs), rwt = at::empty_like(gs), rqt = at::empty_like(gs);
  at::Tensor dgs = at::zeros_like(gs), dgt = at::zeros_like(gs);
  Dev::rows(gs, gt, us, ut, c, rws, rqs, rwt, rqt);
  Dev::cols(gs, gt, us, ut, c, dgs, dgt);
  const at::Tensor g = grad.to(gs.scalar_type());
  at::Tensor out_s = need_s ? assemble(us, rws, rqs, dgs) * g : at::zeros_like(gs);
  at::Tensor out_t = need_t ? assemble(ut, rwt, rqt, dgt) * g : at::zeros_like(gt);
  return {out_s, out_t};
}

}  // namespace rkd
}  // namespace kdops
