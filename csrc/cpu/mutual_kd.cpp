// CPU kernels of the mutual-learning op (mutual_kd and mutual_kd_backward), the math in kd_math.h (namespace
// kd::mutual). Per row: each peer's stats (max, then the log of the sum of exponentials), then one pass over the
// classes in chunks that forms the N peers' log-probabilities, S and E of the chunk, and folds every peer's
// terms: N exponentials per logit for all N values (the forward keeps them from the stats pass), not N^2.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/cpu_utils.h"
#include "kdops/common.h"
#include "kdops/kd_host.h"
#include "kdops/kd_math.h"

namespace kdops {
namespace cpu {
namespace {

namespace mu = kd::mutual;

// Classes per chunk: the N peers' log-probabilities of a chunk stay in L1/L2 while every peer's terms are folded.
constexpr int64_t kMutualChunk = 256;

int64_t mutual_grain(int64_t N, int64_t C) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(N * C, 1));
}

template <typename acc_t>
KDOPS_CPU_CLONES acc_t chunk_max(const acc_t* z, int64_t n) {
  acc_t m = neg_inf<acc_t>();
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < n; ++c) m = z[c] > m ? z[c] : m;
  return m;
}

// Writes e_c = exp((z_c - m) / T) of a chunk and returns their sum.
template <typename acc_t>
KDOPS_CPU_CLONES acc_t chunk_exp_store(const acc_t* z, int64_t n, acc_t inv_t, acc_t m, acc_t* e) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < n; ++c) {
    e[c] = exp_((z[c] - m) * inv_t);
    s += e[c];
  }
  return s;
}

// The stats of one peer's row, its largest logit m and log Z, Z = sum_c e_c, with e_c = exp((z_c - m) / T)
// kept in `e` for the value pass (one exponential per logit in the forward).
template <typename scalar_t, typename acc_t>
void row_stats(const scalar_t* z, int64_t C, acc_t inv_t, ChunkReader<scalar_t, acc_t>& reader, acc_t* stats,
               acc_t* e) {
  acc_t m = neg_inf<acc_t>();
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(C, c0 + kChunk) - c0;
    m = std::max(m, chunk_max(reader.read(z + c0, n), n));
  }
  acc_t s = 0;
  if (m > neg_inf<acc_t>()) {  // (every logit -inf, or NaN: passed on)
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t n = std::min(C, c0 + kChunk) - c0;
      s += chunk_exp_store(reader.read(z + c0, n), n, inv_t, m, e + c0);
    }
  }
  stats[0] = m;
  stats[1] = std::log(s);
}

// Forward: one peer's chunk folded into S and E from its kept e_c, its log-probabilities kept in `logp`.
template <typename acc_t>
KDOPS_CPU_CLONES void chunk_fold(const acc_t* z, const acc_t* e, int64_t n, acc_t inv_t, const acc_t* stats,
                                 acc_t* logp, acc_t* S, acc_t* E) {
  const acc_t m = stats[0], log_z = stats[1], inv_z = acc_t(1) / std::exp(log_z);
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const acc_t l = mu::log_prob(z[c], inv_t, m, log_z);
    const acc_t q = e[c] * inv_z;
    logp[c] = l;
    S[c] += q;
    E[c] += mu::plogp(q, l);
  }
}

// Backward: one peer's probabilities of a chunk, kept in `p` and folded into S.
template <typename acc_t>
KDOPS_CPU_CLONES void chunk_probs(const acc_t* z, int64_t n, acc_t inv_t, const acc_t* stats, acc_t* p, acc_t* S) {
  const acc_t m = stats[0], log_z = stats[1];
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    p[c] = exp_(mu::log_prob(z[c], inv_t, m, log_z));
    S[c] += p[c];
  }
}

template <typename acc_t>
KDOPS_CPU_CLONES acc_t chunk_value(const acc_t* E, const acc_t* S, const acc_t* logp, int64_t n) {
  acc_t v = 0;
#pragma omp simd reduction(+ : v)
  for (int64_t c = 0; c < n; ++c) v += mu::value_term(E[c], S[c], logp[c]);
  return v;
}

template <typename acc_t>
KDOPS_CPU_CLONES void chunk_grad(const acc_t* p, const acc_t* S, int64_t n, acc_t g, acc_t n_peers, acc_t* out) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) out[c] = mu::grad_term(g, n_peers, p[c], S[c]);
}

// z[j]: peer j's logits (R, C); out, stats: (N, R) and (N, R, 2).
template <typename scalar_t>
void forward_rows(const std::vector<const scalar_t*>& z, int64_t R, int64_t C, double temperature, double scale,
                  scalar_t* out, at::opmath_type<scalar_t>* stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = static_cast<int64_t>(z.size());
  const acc_t inv_t = acc_t(1) / acc_t(temperature);
  at::parallel_for(0, R, mutual_grain(N, C), [&](int64_t r0, int64_t r1) {
    ChunkReader<scalar_t, acc_t> reader;
    std::vector<acc_t> e(N * C), logp(N * kMutualChunk), value(N);
    acc_t S[kMutualChunk], E[kMutualChunk];
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t j = 0; j < N; ++j) {
        row_stats(z[j] + r * C, C, inv_t, reader, stats + (j * R + r) * mu::kMutualStats, e.data() + j * C);
      }
      std::fill(value.begin(), value.end(), acc_t(0));
      for (int64_t c0 = 0; c0 < C; c0 += kMutualChunk) {
        const int64_t n = std::min(C, c0 + kMutualChunk) - c0;
        std::fill(S, S + n, acc_t(0));
        std::fill(E, E + n, acc_t(0));
        for (int64_t j = 0; j < N; ++j) {
          chunk_fold(reader.read(z[j] + r * C + c0, n), e.data() + j * C + c0, n, inv_t,
                     stats + (j * R + r) * mu::kMutualStats, logp.data() + j * kMutualChunk, S, E);
        }
        for (int64_t i = 0; i < N; ++i) value[i] += chunk_value(E, S, logp.data() + i * kMutualChunk, n);
      }
      for (int64_t i = 0; i < N; ++i) {
        out[i * R + r] = static_cast<scalar_t>(kd::nonnegative(value[i]) * acc_t(scale));
      }
    }
  });
}

template <typename scalar_t>
void backward_rows(const scalar_t* grad, const std::vector<const scalar_t*>& z, const at::opmath_type<scalar_t>* stats,
                   int64_t R, int64_t C, double temperature, double scale, const std::vector<scalar_t*>& gz) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = static_cast<int64_t>(z.size());
  const acc_t inv_t = acc_t(1) / acc_t(temperature), n_peers = acc_t(N);
  at::parallel_for(0, R, mutual_grain(N, C), [&](int64_t r0, int64_t r1) {
    ChunkReader<scalar_t, acc_t> reader;
    ChunkWriter<scalar_t, acc_t> writer;
    std::vector<acc_t> p(N * kMutualChunk);
    acc_t S[kMutualChunk];
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c0 = 0; c0 < C; c0 += kMutualChunk) {
        const int64_t n = std::min(C, c0 + kMutualChunk) - c0;
        std::fill(S, S + n, acc_t(0));
        for (int64_t j = 0; j < N; ++j) {
          chunk_probs(reader.read(z[j] + r * C + c0, n), n, inv_t, stats + (j * R + r) * mu::kMutualStats,
                      p.data() + j * kMutualChunk, S);
        }
        for (int64_t i = 0; i < N; ++i) {
          scalar_t* dst = gz[i] + r * C + c0;
          const acc_t g = acc_t(grad[i * R + r]) * acc_t(scale) * inv_t;
          chunk_grad(p.data() + i * kMutualChunk, S, n, g, n_peers, writer.dest(dst));
          writer.flush(dst, n);
        }
      }
    }
  });
}

template <typename scalar_t>
std::vector<const scalar_t*> peer_pointers(const std::vector<at::Tensor>& peers) {
  std::vector<const scalar_t*> out;
  for (const at::Tensor& t : peers) out.push_back(t.const_data_ptr<scalar_t>());
  return out;
}

std::tuple<at::Tensor, at::Tensor> mutual_kd_cpu(at::TensorList logits, double temperature, double scale) {
  const kd::MutualCall c = kd::prepare_mutual(logits, temperature, "mutual_kd");
  at::Tensor out = at::empty({c.N, c.R}, c.peers[0].options());
  at::Tensor stats = at::empty({c.N, c.R, mu::kMutualStats}, c.peers[0].options().dtype(c.acc));
  if (c.R == 0) return {out, stats};
  if (c.C == 0) {
    out.zero_();
    stats.fill_(-std::numeric_limits<double>::infinity());
    return {out, stats};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "mutual_kd_cpu", [&] {
    forward_rows<scalar_t>(peer_pointers<scalar_t>(c.peers), c.R, c.C, temperature, scale,
                           out.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<at::opmath_type<scalar_t>>());
  });
  return {out, stats};
}

std::vector<at::Tensor> mutual_kd_backward_cpu(const at::Tensor& grad, at::TensorList logits, const at::Tensor& stats,
                                               double temperature, double scale) {
  const kd::MutualCall c = kd::prepare_mutual(logits, temperature, "mutual_kd_backward");
  kd::check_mutual_backward(grad, c, stats);
  const at::Tensor g = grad.contiguous(), st = stats.contiguous();
  std::vector<at::Tensor> gz = kd::empty_peer_grads(c);
  if (c.R > 0 && c.C > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "mutual_kd_backward_cpu", [&] {
      std::vector<scalar_t*> dst;
      for (at::Tensor& t : gz) dst.push_back(t.mutable_data_ptr<scalar_t>());
      backward_rows<scalar_t>(g.const_data_ptr<scalar_t>(), peer_pointers<scalar_t>(c.peers),
                              st.const_data_ptr<at::opmath_type<scalar_t>>(), c.R, c.C, temperature, scale, dst);
    });
  }
  return gz;
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("mutual_kd", &kdops::cpu::mutual_kd_cpu);
  m.impl("mutual_kd_backward", &kdops::cpu::mutual_kd_backward_cpu);
}
