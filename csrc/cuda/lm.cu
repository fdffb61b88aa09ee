// CUDA row kernels of the lm family (kdops::fused_linear_kd, kdops::topk_kd), the math in lm_math.h and the chunk
// loop (cuBLAS GEMMs through ATen) in lm_host.h. One block per row of the chunk (grid-stride over rows): block
// reductions (CUB) give the maxima, the exp-sums and, for the divergences without a closed form, the sums of their
// terms; then each thread overwrites its strided share of the row's logits with their gradient. No host sync:
// a target or teacher id that is out of range (or repeated, for top-k) cannot raise here, so the row's loss is NaN.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <limits>

#include "kdops/lm_host.h"
#include "kdops/lm_math.h"

namespace kdops {
namespace cuda {
namespace {

using lm::Div;
using lm::Params;
using lm::Tail;

constexpr int kBlock = 256;
constexpr int64_t kMaxRowBlocks = 65535;
constexpr int64_t kMaxTopK = 1024;  // teacher ids per token held in shared memory

unsigned row_blocks(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(n, kMaxRowBlocks)));
}

template <typename acc_t>
struct Reducer {
  using BR = cub::BlockReduce<acc_t, kBlock>;
  typename BR::TempStorage& tmp;
  acc_t& slot;
  __device__ acc_t sum(acc_t x) {
    const acc_t r = BR(tmp).Sum(x);
    if (threadIdx.x == 0) slot = r;
    __syncthreads();
    const acc_t v = slot;
    __syncthreads();
    return v;
  }
  __device__ acc_t max(acc_t x) {
    const acc_t r = BR(tmp).Reduce(x, [](acc_t a, acc_t b) { return a > b ? a : b; });
    if (threadIdx.x == 0) slot = r;
    __syncthreads();
    const acc_t v = slot;
    __syncthreads();
    return v;
  }
};

template <typename acc_t>
__device__ void fill_row(acc_t* x, int64_t n, acc_t v) {
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) x[j] = v;
}

template <Div D, typename acc_t>
__global__ void __launch_bounds__(kBlock) kd_rows_kernel(lm::Chunk<acc_t> c, Params<acc_t> kp) {
  __shared__ typename Reducer<acc_t>::BR::TempStorage tmp;
  __shared__ acc_t slot;
  __shared__ int64_t arg;
  Reducer<acc_t> red{tmp, slot};
  const bool u = kp.hard != acc_t(0) && kp.inv_t != acc_t(1);
  const bool tr_s = kp.s_cap > acc_t(0) || kp.s_scale != acc_t(1);
  const bool tr_t = kp.t_cap > acc_t(0) || kp.t_scale != acc_t(1);
  const int64_t V = c.v;
  for (int64_t r = blockIdx.x; r < c.n; r += gridDim.x) {
    acc_t* s = c.s + r * c.lds;
    acc_t* t = c.t + r * c.ldt;
    const int64_t y = c.target != nullptr ? c.target[r] : -1;
    const bool ignored = c.target != nullptr && y == c.ignore_index;
    if (ignored || (c.target != nullptr && (y < 0 || y >= V))) {
      if (threadIdx.x == 0) c.rows[r] = ignored ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
      if (c.grad_s) fill_row(s, V, acc_t(0));
      if (c.grad_t) fill_row(t, V, acc_t(0));
      continue;
    }
    acc_t ms = neg_inf<acc_t>(), mt = neg_inf<acc_t>();
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      acc_t fs = s[j], ft = t[j];
      if (tr_s) s[j] = fs = lm::transform(fs, kp.s_scale, kp.s_cap);
      if (tr_t) t[j] = ft = lm::transform(ft, kp.t_scale, kp.t_cap);
      ms = max_of(ms, fs);
      mt = max_of(mt, ft);
    }
    ms = red.max(ms);  // the reductions' barriers also order the transform's writes before the reads below
    mt = red.max(mt);
    const acc_t fy = y >= 0 ? s[y] : acc_t(0);
    acc_t d0 = 0, shift = 0;
    if (D == Div::KL || D == Div::ReverseKL) {  // the log-ratio at a maximum (any one of tied maxima will do)
      if (threadIdx.x == 0) arg = 0;
      __syncthreads();
      const acc_t* x = D == Div::KL ? t : s;
      const acc_t m = D == Div::KL ? mt : ms;
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x)
        if (x[j] == m) arg = j;
      __syncthreads();
      const int64_t j = arg;
      d0 = D == Div::KL ? (t[j] - s[j]) * kp.inv_t : (s[j] - t[j]) * kp.inv_t;
      shift = D == Div::KL ? d0 : -d0;
      __syncthreads();
    }
    acc_t zs = 0, zt = 0, zu = 0, cr = 0;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      const acc_t es = exp_((s[j] - ms) * kp.inv_t), et = exp_((t[j] - mt) * kp.inv_t);
      zs += es;
      zt += et;
      if (u) zu += exp_(s[j] - ms);
      if (D == Div::KL) cr += lm::pmul(et, (t[j] - s[j]) * kp.inv_t - d0);
      if (D == Div::ReverseKL) cr += lm::pmul(es, (s[j] - t[j]) * kp.inv_t - d0);
    }
    lm::RowStats<acc_t> st{ms, mt, red.sum(zs), red.sum(zt), u ? red.sum(zu) : acc_t(0),
                           lm::has_closed_sums<D>() ? red.sum(cr) : acc_t(0), d0, shift};
    const acc_t ls = log_(st.zs), lt = log_(st.zt), lu = u ? log_(st.zu) : ls;
    const acc_t izs = acc_t(1) / st.zs, izt = acc_t(1) / st.zt;  // q = e / Z (see cpu/lm.cpp)
    acc_t value, sa, sb;
    if (lm::has_closed_sums<D>()) {
      value = lm::closed_value<D>(st, ms * kp.inv_t + ls, mt * kp.inv_t + lt);
      lm::closed_sums<D>(st, sa, sb);
    } else {
      acc_t v_ = 0, a_ = 0, b_ = 0;
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
        const acc_t lq = (s[j] - ms) * kp.inv_t - ls, lp = (t[j] - mt) * kp.inv_t - lt;
        acc_t v, a, b;
        lm::terms<D>(lq, lp, (s[j] - t[j]) * kp.inv_t, exp_((s[j] - ms) * kp.inv_t) * izs,
                     exp_((t[j] - mt) * kp.inv_t) * izt, kp, v, a, b);
        v_ += v, a_ += a, b_ += b;
      }
      value = red.sum(v_);
      sa = red.sum(a_);
      sb = red.sum(b_);
      value = value > acc_t(0) ? value : acc_t(0);
    }
    if (threadIdx.x == 0) {
      acc_t row = kp.soft * value;
      if (y >= 0 && kp.hard != acc_t(0)) row += kp.hard * (ms + lu - fy);
      c.rows[r] = row;
    }
    if (!c.grad_s && !c.grad_t) continue;
    const acc_t w = c.w != nullptr ? c.w[r * c.w_stride] : acc_t(1);
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      const acc_t fs = s[j], ft = t[j];
      const acc_t lq = (fs - ms) * kp.inv_t - ls, lp = (ft - mt) * kp.inv_t - lt;
      const acc_t q = exp_((fs - ms) * kp.inv_t) * izs, p = exp_((ft - mt) * kp.inv_t) * izt;
      acc_t v, a, b;
      lm::terms<D>(lq, lp, (fs - ft) * kp.inv_t + shift, q, p, kp, v, a, b);
      const acc_t su = u ? exp_(fs - ms - lu) : q;
      s[j] = lm::student_grad(a, q, sa, su, fs, w, kp);
      if (c.grad_t) t[j] = lm::teacher_grad(b, p, sb, ft, w, kp);
    }
    __syncthreads();
    if (threadIdx.x == 0 && y >= 0 && kp.hard != acc_t(0)) {
      s[y] -= w * kp.hard * lm::transform_slope(fy, kp.s_scale, kp.s_cap);
    }
    __syncthreads();
  }
}

// Top-k rows. The K ids' logits are set aside in shared memory and their places in the row set to -inf, so that
// one pass gives the exp-sum outside K (the tail mass R without a 1 - Q cancellation); the dense gradient pass then
// writes 0 there and the K entries are written last.
template <Tail TL, typename acc_t>
__global__ void __launch_bounds__(kBlock) topk_rows_kernel(lm::Chunk<acc_t> c, Params<acc_t> kp) {
  __shared__ typename Reducer<acc_t>::BR::TempStorage tmp;
  __shared__ acc_t slot;
  __shared__ lm::TopkRow<acc_t> sh_side;
  extern __shared__ unsigned char smem_raw[];
  acc_t* fk = reinterpret_cast<acc_t*>(smem_raw);  // (K,) the K ids' f
  acc_t* lp = fk + c.k;                             // (K,) the teacher's (re-tempered) log-probs
  Reducer<acc_t> red{tmp, slot};
  const bool u = kp.hard != acc_t(0) && kp.inv_t != acc_t(1);
  const bool tr_s = kp.s_cap > acc_t(0) || kp.s_scale != acc_t(1);
  const bool retemper = kp.mix != acc_t(1);
  const int64_t V = c.v, K = c.k;
  for (int64_t r = blockIdx.x; r < c.n; r += gridDim.x) {
    acc_t* s = c.s + r * c.lds;
    const int64_t* ids = c.ids + r * K;
    const acc_t* lps = c.lps + r * K;
    const int64_t y = c.target != nullptr ? c.target[r] : -1;
    const bool ignored = c.target != nullptr && y == c.ignore_index;
    // Ids out of range or repeated, and targets out of range, make the row NaN.
    acc_t bad = (c.target != nullptr && !ignored && (y < 0 || y >= V)) ? acc_t(1) : acc_t(0);
    for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
      const int64_t id = ids[i];
      if (id < 0 || id >= V) bad = acc_t(1);
      for (int64_t e = 0; e < i; ++e) bad = ids[e] == id ? acc_t(1) : bad;
    }
    bad = ignored ? acc_t(0) : red.max(bad);
    if (ignored || bad > acc_t(0)) {
      if (threadIdx.x == 0) c.rows[r] = ignored ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
      if (c.grad_s) fill_row(s, V, acc_t(0));
      continue;
    }
    if (tr_s) {
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) s[j] = lm::transform(s[j], kp.s_scale, kp.s_cap);
    }
    __syncthreads();
    const acc_t fy = y >= 0 ? s[y] : acc_t(0);
    for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
      fk[i] = s[ids[i]];
      lp[i] = lps[i];  // re-tempered by topk_side
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < K; i += blockDim.x) s[ids[i]] = neg_inf<acc_t>();
    __syncthreads();
    acc_t m = neg_inf<acc_t>(), mk = neg_inf<acc_t>();
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) m = max_of(m, s[j]);
    for (int64_t i = threadIdx.x; i < K; i += blockDim.x) mk = max_of(mk, fk[i]);
    const acc_t mo = red.max(m);  // the maximum outside K (the K places hold -inf); -inf when K = V
    const acc_t ms = max_of(mo, red.max(mk));
    const acc_t so = lm::finite_or_zero(mo);
    acc_t zo = 0, zk = 0, zu = 0;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      zo += exp_((s[j] - so) * kp.inv_t);
      if (u) zu += exp_(s[j] - ms);
    }
    for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
      zk += exp_((fk[i] - ms) * kp.inv_t);
      if (u) zu += exp_(fk[i] - ms);
    }
    zo = red.sum(zo);  // against mo: the tail mass keeps its digits, and its log stays finite
    const acc_t zs = zo * exp_((so - ms) * kp.inv_t) + red.sum(zk);
    const acc_t ls = log_(zs), lu = u ? log_(red.sum(zu)) : ls, izs = acc_t(1) / zs;
    const acc_t log_r = (so - ms) * kp.inv_t + log_(zo) - ls;  // log of the student's mass outside K
    if (threadIdx.x == 0) {  // the K-long teacher side, serially (K is small next to V)
      sh_side = lm::topk_side<TL>(lp, fk, K, V, ms, ls, log_r, retemper, kp);
      acc_t row = kp.soft * sh_side.value;
      if (y >= 0 && kp.hard != acc_t(0)) row += kp.hard * (ms + lu - fy);
      c.rows[r] = row;
    }
    __syncthreads();
    if (!c.grad_s) continue;
    const acc_t w = c.w != nullptr ? c.w[r * c.w_stride] : acc_t(1);
    const lm::TopkRow<acc_t> side = sh_side;
    const acc_t c_out = side.c_out, c_r = side.c_r;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      const acc_t f = s[j];
      const acc_t lq = (f - ms) * kp.inv_t - ls;
      const acc_t q = exp_((f - ms) * kp.inv_t) * izs;
      const acc_t su = u ? exp_(f - ms - lu) : q;
      const acc_t soft = c_r != acc_t(0) ? c_out * q + c_r * exp_(lq - log_r) : c_out * q;
      // f = -inf at the K ids: q = su = 0 there, and the entry is overwritten below.
      s[j] = f != neg_inf<acc_t>()
                 ? w * (kp.soft * kp.inv_t * soft + kp.hard * su) * lm::transform_slope(f, kp.s_scale, kp.s_cap)
                 : acc_t(0);
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
      const acc_t lq = (fk[i] - ms) * kp.inv_t - ls, q = exp_((fk[i] - ms) * kp.inv_t) * izs;
      const acc_t soft = lm::topk_soft_at<TL>(side, lp[i], lq, q, K == V);
      const acc_t su = u ? exp_(fk[i] - ms - lu) : q;
      s[ids[i]] = w * (kp.soft * kp.inv_t * soft + kp.hard * su) * lm::transform_slope(fk[i], kp.s_scale, kp.s_cap);
    }
    __syncthreads();
    if (threadIdx.x == 0 && y >= 0 && kp.hard != acc_t(0)) {
      s[y] -= w * kp.hard * lm::transform_slope(fy, kp.s_scale, kp.s_cap);
    }
    __syncthreads();
  }
}

template <typename acc_t>
void kd_rows_cuda(Div d, lm::Chunk<acc_t>& c, const Params<acc_t>& kp) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned grid = row_blocks(c.n);
  switch (d) {
    case Div::KL: kd_rows_kernel<Div::KL><<<grid, kBlock, 0, stream>>>(c, kp); break;
    case Div::ReverseKL: kd_rows_kernel<Div::ReverseKL><<<grid, kBlock, 0, stream>>>(c, kp); break;
    case Div::JSD: kd_rows_kernel<Div::JSD><<<grid, kBlock, 0, stream>>>(c, kp); break;
    case Div::SkewKL: kd_rows_kernel<Div::SkewKL><<<grid, kBlock, 0, stream>>>(c, kp); break;
    case Div::SkewReverseKL: kd_rows_kernel<Div::SkewReverseKL><<<grid, kBlock, 0, stream>>>(c, kp); break;
    case Div::TVD: kd_rows_kernel<Div::TVD><<<grid, kBlock, 0, stream>>>(c, kp); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void topk_rows_cuda(Tail t, lm::Chunk<acc_t>& c, const Params<acc_t>& kp) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned grid = row_blocks(c.n);
  const size_t smem = static_cast<size_t>(2 * c.k) * sizeof(acc_t);
  switch (t) {
    case Tail::Renormalize: topk_rows_kernel<Tail::Renormalize><<<grid, kBlock, smem, stream>>>(c, kp); break;
    case Tail::Zero: topk_rows_kernel<Tail::Zero><<<grid, kBlock, smem, stream>>>(c, kp); break;
    case Tail::Bucket: topk_rows_kernel<Tail::Bucket><<<grid, kBlock, smem, stream>>>(c, kp); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

lm::Outputs fused_linear_kd_cuda(const at::Tensor& sh, const at::Tensor& sw, const std::optional<at::Tensor>& sb,
                                 const std::optional<at::Tensor>& th, const std::optional<at::Tensor>& tw,
                                 const std::optional<at::Tensor>& tb, const std::optional<at::Tensor>& tl,
                                 const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& row_weight,
                                 int64_t divergence, double mix, double temperature, double soft, double hard,
                                 int64_t ignore_index, int64_t vocab_size, double s_cap, double t_cap, double s_scale,
                                 double t_scale, int64_t chunk_size, int64_t grad_mask) {
  lm::check_fused_scalars(divergence, mix, temperature, soft, hard, s_cap, t_cap, s_scale, t_scale, chunk_size);
  const c10::cuda::CUDAGuard guard(sh.device());
  const Div d = static_cast<Div>(divergence);
  if (sh.scalar_type() == at::kDouble) {
    const auto kp = lm::make_params<double>(mix, temperature, soft, hard, s_cap, t_cap, s_scale, t_scale);
    return lm::fused_linear_kd_run<double>(sh, sw, sb, th, tw, tb, tl, target, row_weight, kp, ignore_index,
                                           vocab_size, chunk_size, grad_mask,
                                           [&](auto& c, const auto& k) { kd_rows_cuda(d, c, k); });
  }
  const auto kp = lm::make_params<float>(mix, temperature, soft, hard, s_cap, t_cap, s_scale, t_scale);
  return lm::fused_linear_kd_run<float>(sh, sw, sb, th, tw, tb, tl, target, row_weight, kp, ignore_index, vocab_size,
                                        chunk_size, grad_mask, [&](auto& c, const auto& k) { kd_rows_cuda(d, c, k); });
}

lm::TopkOutputs topk_kd_cuda(const at::Tensor& sh, const at::Tensor& sw, const std::optional<at::Tensor>& sb,
                             const at::Tensor& ids, const at::Tensor& lps, const std::optional<at::Tensor>& target,
                             const std::optional<at::Tensor>& row_weight, int64_t tail, double retemper,
                             double temperature, double soft, double hard, int64_t ignore_index, int64_t vocab_size,
                             double s_cap, double s_scale, int64_t chunk_size, int64_t grad_mask) {
  lm::check_topk_scalars(tail, retemper, temperature, soft, hard, s_cap, s_scale, chunk_size);
  TORCH_CHECK(ids.dim() != 2 || ids.size(1) <= kMaxTopK, "kdops.topk_kd: on CUDA teacher_ids may have at most ",
              kMaxTopK, " ids per token, got ", ids.dim() == 2 ? ids.size(1) : 0);
  const c10::cuda::CUDAGuard guard(sh.device());
  const Tail t = static_cast<Tail>(tail);
  if (sh.scalar_type() == at::kDouble) {
    const auto kp = lm::make_params<double>(retemper, temperature, soft, hard, s_cap, 0.0, s_scale, 1.0);
    return lm::topk_kd_run<double>(sh, sw, sb, ids, lps, target, row_weight, kp, ignore_index, vocab_size, chunk_size,
                                   grad_mask, [&](auto& c, const auto& k) { topk_rows_cuda(t, c, k); });
  }
  const auto kp = lm::make_params<float>(retemper, temperature, soft, hard, s_cap, 0.0, s_scale, 1.0);
  return lm::topk_kd_run<float>(sh, sw, sb, ids, lps, target, row_weight, kp, ignore_index, vocab_size, chunk_size,
                                grad_mask, [&](auto& c, const auto& k) { topk_rows_cuda(t, c, k); });
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("fused_linear_kd", &kdops::cuda::fused_linear_kd_cuda);
  m.impl("topk_kd", &kdops::cuda::topk_kd_cuda);
}
