// Host side of the lm family (kdops::fused_linear_kd and kdops::topk_kd), shared by the CPU and CUDA entry points:
// checks, and the loop over token chunks. The loop is written once, in ATen calls that run on either device
// (GEMMs through at::mm / addmm, so cuBLAS on CUDA), and calls the device's row kernel on each chunk's logits.
// Nothing of size tokens x vocabulary is allocated: per chunk the student's (and teacher's) logits live in a
// (chunk, V) buffer in the accumulation dtype, which the row kernel overwrites with the gradient of the chunk's
// loss with respect to those logits; the hidden-state gradients of the chunk and the weight gradients (in the
// accumulation dtype) follow from two GEMMs. 16-bit inputs are read through copies in the accumulation dtype
// (the weight once per call, the hidden states per chunk), or, for bf16 where the device has them, by GEMMs that
// read bf16 and keep the fp32 accumulator (Bf16Gemms); either way no logit is ever rounded to 16 bits.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "kdops/lm_math.h"

namespace kdops {
namespace lm {

// Bits of grad_mask: which inputs get a gradient.
enum GradBit : int64_t {
  kGradSH = 1, kGradSW = 2, kGradSB = 4, kGradTH = 8, kGradTW = 16, kGradTB = 32, kGradTL = 64
};

// One chunk as the row kernels see it: rows of the student's logits (in place: f on entry, d loss / dz on exit
// when grad_s), of the teacher's (likewise with grad_t), targets and row weights (null: none), and the row
// losses to write. The teacher pointer is null for top-k rows, which read ids and log-probs instead.
template <typename acc_t>
struct Chunk {
  acc_t* s;
  int64_t lds;
  acc_t* t;
  int64_t ldt;
  int64_t n, v;
  const int64_t* target;  // null: every row kept, no hard term
  int64_t ignore_index;
  const acc_t* w;         // null: weight 1
  int64_t w_stride;       // 0 for a broadcast weight
  acc_t* rows;            // (n,)
  bool grad_s, grad_t;
  const int64_t* ids;     // top-k only: (n, K)
  const acc_t* lps;       // top-k only: (n, K)
  int64_t k;
};

inline void check_matrix(const char* op, const char* name, const at::Tensor& t, int64_t cols, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.is_floating_point(), op, ": ", name, " must be a floating 2-d tensor ", what,
              ", got ", t.sizes(), " ", t.scalar_type());
  TORCH_CHECK(cols < 0 || t.size(1) == cols, op, ": ", name, " must have ", cols, " columns ", what, ", got ",
              t.sizes());
}

inline void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), ", got ", t.device());
}

inline void check_bias(const char* op, const char* name, const std::optional<at::Tensor>& b, int64_t rows,
                       const at::Tensor& ref) {
  if (!b.has_value()) return;
  TORCH_CHECK(b->dim() == 1 && b->size(0) == rows && b->is_floating_point(), op, ": ", name, " must be a floating (",
              rows, ",) tensor, got ", b->sizes(), " ", b->scalar_type());
  check_same(op, name, *b, ref);
}

template <typename acc_t>
Params<acc_t> make_params(double mix, double temperature, double soft, double hard, double s_cap, double t_cap,
                          double s_scale, double t_scale) {
  Params<acc_t> k;
  k.mix = acc_t(mix);
  k.log_mix = mix > 0.0 ? acc_t(std::log(mix)) : neg_inf<acc_t>();
  k.log_1m_mix = mix < 1.0 ? acc_t(std::log1p(-mix)) : neg_inf<acc_t>();
  k.one_m_mix = acc_t(1) - k.mix;
  k.inv_t = acc_t(1.0 / temperature);
  k.soft = acc_t(soft);
  k.hard = acc_t(hard);
  k.s_scale = acc_t(s_scale);
  k.s_cap = acc_t(s_cap);
  k.t_scale = acc_t(t_scale);
  k.t_cap = acc_t(t_cap);
  return k;
}

inline void check_scalars(const char* op, double temperature, double soft, double hard, double s_cap, double t_cap,
                          double s_scale, double t_scale, int64_t chunk_size) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, op, ": temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(std::isfinite(soft) && std::isfinite(hard), op, ": soft and hard weights must be finite, got ", soft,
              " and ", hard);
  TORCH_CHECK(std::isfinite(s_cap) && std::isfinite(t_cap), op, ": softcaps must be finite (<= 0: none), got ",
              s_cap, " and ", t_cap);
  TORCH_CHECK(std::isfinite(s_scale) && std::isfinite(t_scale), op, ": logit scales must be finite, got ", s_scale,
              " and ", t_scale);
  TORCH_CHECK(chunk_size >= 1, op, ": chunk_size must be >= 1, got ", chunk_size);
}

// The row weights (n,) as a pointer and stride; an expanded (stride 0) weight stays unmaterialised.
template <typename acc_t>
std::pair<at::Tensor, int64_t> prepare_weight(const char* op, const std::optional<at::Tensor>& w, int64_t n,
                                              const at::Tensor& ref, at::ScalarType acc) {
  if (!w.has_value()) return {at::Tensor(), 0};
  TORCH_CHECK(w->dim() == 1 && w->size(0) == n && w->is_floating_point(), op, ": row_weight must be a floating (",
              n, ",) tensor, got ", w->sizes(), " ", w->scalar_type());
  check_same(op, "row_weight", *w, ref);
  at::Tensor t = w->to(acc);
  if (t.stride(0) != 0) t = t.contiguous();
  return {t, t.stride(0)};
}

inline at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.scalar_type() == acc ? t.contiguous() : t.to(acc).contiguous();
}

inline at::Tensor empty0(const at::Tensor& ref, at::ScalarType acc) {
  return at::empty({0}, ref.options().dtype(acc));
}

inline void check_student(const char* op, const at::Tensor& sh, const at::Tensor& sw,
                          const std::optional<at::Tensor>& sb) {
  check_matrix(op, "student_hidden", sh, -1, "(tokens, Hs)");
  check_matrix(op, "student_weight", sw, sh.size(1), "(V, Hs)");
  check_same(op, "student_weight", sw, sh);
  check_bias(op, "student_bias", sb, sw.size(0), sh);
}

inline void check_target(const char* op, const std::optional<at::Tensor>& target, int64_t n, const at::Tensor& ref,
                         bool hard) {
  if (target.has_value()) {
    TORCH_CHECK(target->dim() == 1 && target->size(0) == n && target->scalar_type() == at::kLong, op,
                ": target must be int64 (", n, ",), got ", target->sizes(), " ", target->scalar_type());
    check_same(op, "target", *target, ref);
  }
  TORCH_CHECK(!hard || target.has_value(), op, ": hard_weight != 0 needs a target");
}

// The chunk of rows [r0, r0 + n) of the (chunk, V) logits buffer S, without teacher or top-k pointers.
template <typename acc_t>
Chunk<acc_t> make_chunk(const at::Tensor& S, int64_t r0, int64_t n, const at::Tensor& target, int64_t ignore_index,
                        const at::Tensor& w, int64_t w_stride, const at::Tensor& rows, bool grad_s) {
  Chunk<acc_t> ch;
  ch.s = S.data_ptr<acc_t>();
  ch.lds = S.size(1);
  ch.t = nullptr;
  ch.ldt = 0;
  ch.n = n;
  ch.v = S.size(1);
  ch.target = target.defined() ? target.data_ptr<int64_t>() + r0 : nullptr;
  ch.ignore_index = ignore_index;
  ch.w = w.defined() ? w.data_ptr<acc_t>() + r0 * w_stride : nullptr;
  ch.w_stride = w_stride;
  ch.rows = rows.data_ptr<acc_t>() + r0;
  ch.grad_s = grad_s;
  ch.grad_t = false;
  ch.ids = nullptr;
  ch.lps = nullptr;
  ch.k = 0;
  return ch;
}

// One side's gradients from the chunk's logit gradients G (n, vs): hidden rows [r0, r0 + n) = G W, and the weight
// (and bias, when g_b is not empty) accumulate G^T h (and the column sums of G).
inline void chunk_grads(const at::Tensor& G, const at::Tensor& W, const at::Tensor& h, int64_t r0, int64_t n,
                        int64_t vs, bool want_h, bool want_w, at::Tensor& g_h, at::Tensor& g_w, at::Tensor& g_b) {
  if (want_h) {
    at::Tensor out = g_h.narrow(0, r0, n);
    at::mm_out(out, G, W);
  }
  if (want_w) g_w.narrow(0, 0, vs).addmm_(G.t(), h);
  if (g_b.numel() > 0) g_b.narrow(0, 0, vs).add_(G.sum(0));
}

// GEMMs that read bf16 inputs as they are and give the fp32 accumulator (the CPU's are in csrc/cpu/bf16_gemm.h):
// B operands packed into words of bf16 pairs along K. A device without them passes none, and 16-bit inputs are
// then read through copies in the accumulation dtype.
struct Bf16Gemms {
  bool (*usable)();
  int64_t (*packed_words)(int64_t K, int64_t N);
  void (*pack_rows)(const uint16_t* W, int64_t N, int64_t K, int64_t ldw, uint32_t* out);  // B = W^T
  void (*pack_cols)(const uint16_t* W, int64_t K, int64_t N, int64_t ldw, uint32_t* out);  // B = W
  // G = hi + lo in bf16: B = [hi; lo] stacked along K (or hi alone; out null: none), and optionally hi and lo
  // row-major
  void (*pack_cols_f32)(const float* G, int64_t K, int64_t N, int64_t ldg, uint32_t* out, bool stacked,
                        uint16_t* hi_rows, uint16_t* lo_rows);
  void (*gemm)(const uint16_t* A, int64_t lda, const uint32_t* B, int64_t M, int64_t N, int64_t K, float* C,
               int64_t ldc, bool add);
};

// One side (student or teacher) of the chunk loop: its weight and bias as the GEMMs read them, the per-chunk
// logits GEMM and the gradient GEMMs. With bf16 hidden states and weight, fp32 accumulation and a device's
// Bf16Gemms, the GEMMs read the bf16 values directly: the logits are the GEMM's fp32 accumulator as before (no
// copy of the weight in fp32, no rounding of a logit). The chunk's fp32 logit gradients G enter the gradient
// GEMMs as two bf16 terms, G = hi + lo, one GEMM each, so those gradients are as accurate as with fp32 GEMMs
// (rounding G to bf16 alone doubles the error of the hidden-state gradient: 2.04x the fp32 path's, measured on
// the 16-bit test of python_tests/test_lm.py). The weight gradient accumulates in an (H, vs) fp32 buffer,
// written into g_w by finish().
template <typename acc_t>
struct Side {
  at::ScalarType acc;
  int64_t vs = 0, H = 0;
  const Bf16Gemms* fast = nullptr;
  at::Tensor w;       // (vs, H): the accumulation-dtype copy, or the bf16 weight itself on the fast path
  at::Tensor b;       // (vs,) bias in the accumulation dtype, or undefined
  at::Tensor packed;  // fast path: w packed as the logits GEMM's B (W^T)
  at::Tensor wcols;   // fast path, hidden-state gradient: w packed as that GEMM's B (W)
  at::Tensor g_hi, g_lo;  // fast path, hidden-state gradient: the chunk's G = hi + lo, row-major bf16
  at::Tensor gp;          // fast path, weight gradient: [hi; lo] packed as that GEMM's B
  at::Tensor hth;         // fast path, weight gradient: its A, [h^T | h^T] (H, 2 ce), each half padded to even
  at::Tensor gwt;         // fast path, weight gradient: (H, vs) in fp32

  Side(const Bf16Gemms* f, const at::Tensor& h_in, const at::Tensor& w_in, const std::optional<at::Tensor>& b_in,
       int64_t vs_, at::ScalarType acc_, int64_t c, bool want_h, bool want_w)
      : acc(acc_), vs(vs_), H(w_in.size(1)) {
    if (b_in.has_value()) b = as_acc(b_in->narrow(0, 0, vs), acc);
    const bool use = f != nullptr && acc == at::kFloat && h_in.scalar_type() == at::kBFloat16 &&
                     w_in.scalar_type() == at::kBFloat16 && f->usable();
    if (!use) {
      w = as_acc(w_in.narrow(0, 0, vs), acc);
      return;
    }
    fast = f;
    w = w_in.narrow(0, 0, vs).contiguous();
    const auto words = w.options().dtype(at::kInt);
    packed = at::empty({f->packed_words(H, vs)}, words);
    f->pack_rows(u16(w), vs, H, H, u32(packed));
    if (want_h) {
      wcols = at::empty({f->packed_words(vs, H)}, words);
      f->pack_cols(u16(w), vs, H, H, u32(wcols));
      g_hi = at::empty({c, vs}, w.options());
      g_lo = at::empty({c, vs}, w.options());
    }
    if (want_w) {
      const int64_t ce = c + (c & 1);
      gp = at::empty({f->packed_words(2 * ce, vs)}, words);
      hth = at::empty({H, 2 * ce}, w.options());
      gwt = at::zeros({H, vs}, w.options().dtype(at::kFloat));
    }
  }

  static const uint16_t* u16(const at::Tensor& t) { return static_cast<const uint16_t*>(t.const_data_ptr()); }
  static uint16_t* mut16(at::Tensor& t) { return static_cast<uint16_t*>(t.data_ptr()); }
  static uint32_t* u32(at::Tensor& t) { return static_cast<uint32_t*>(t.data_ptr()); }

  // Rows [r0, r0 + n) of the hidden states as the GEMMs read them.
  at::Tensor hidden(const at::Tensor& h_in, int64_t r0, int64_t n) const {
    return fast ? h_in.narrow(0, r0, n).contiguous() : as_acc(h_in.narrow(0, r0, n), acc);
  }

  // out (n, vs) = h W^T (+ b), in the accumulation dtype.
  void logits(at::Tensor& out, const at::Tensor& h) const {
    if (!fast) {
      if (b.defined()) at::addmm_out(out, b, h, w.t()); else at::mm_out(out, h, w.t());
      return;
    }
    at::Tensor p = packed;
    fast->gemm(u16(h), H, u32(p), h.size(0), vs, H, out.data_ptr<float>(), out.stride(0), false);
    if (b.defined()) out.add_(b);
  }

  // The gradients of the chunk's hidden rows [r0, r0 + n), of the weight and of the bias, from G (n, vs).
  void grads(const at::Tensor& G, const at::Tensor& h, int64_t r0, int64_t n, bool want_h, bool want_w,
             at::Tensor& g_h, at::Tensor& g_w, at::Tensor& g_b) {
    if (!fast) return chunk_grads(G, w, h, r0, n, vs, want_h, want_w, g_h, g_w, g_b);
    const float* g = G.const_data_ptr<float>();
    // one pass over G splits it: packed for the weight gradient, row-major for the hidden-state gradient
    if (want_w || want_h) {
      fast->pack_cols_f32(g, n, vs, G.stride(0), want_w ? u32(gp) : nullptr, true, want_h ? mut16(g_hi) : nullptr,
                          want_h ? mut16(g_lo) : nullptr);
    }
    if (want_h) {  // g_h rows = hi W + lo W
      float* out = g_h.data_ptr<float>() + r0 * g_h.stride(0);
      fast->gemm(u16(g_hi), vs, u32(wcols), n, H, vs, out, g_h.stride(0), false);
      fast->gemm(u16(g_lo), vs, u32(wcols), n, H, vs, out, g_h.stride(0), true);
    }
    if (want_w) {  // gwt += [h^T | h^T] [hi; lo], one pass over gwt
      const int64_t ne = n + (n & 1);
      at::Tensor a = hth.narrow(1, 0, 2 * ne);
      if (n & 1) a.zero_();
      a.narrow(1, 0, n).copy_(h.t());
      a.narrow(1, ne, n).copy_(h.t());
      fast->gemm(u16(a), a.stride(0), u32(gp), H, vs, 2 * ne, gwt.data_ptr<float>(), vs, true);
    }
    if (g_b.numel() > 0) g_b.narrow(0, 0, vs).add_(G.sum(0));
  }

  void finish(at::Tensor& g_w) const {
    if (gwt.defined()) g_w.narrow(0, 0, vs).copy_(gwt.t());
  }
};

// The scalar arguments both entry points (CPU, CUDA) check before dispatching.
inline void check_fused_scalars(int64_t divergence, double mix, double temperature, double soft, double hard,
                                double s_cap, double t_cap, double s_scale, double t_scale, int64_t chunk_size) {
  TORCH_CHECK(divergence >= 0 && divergence <= 5, "kdops.fused_linear_kd: divergence code must be in [0, 5], got ",
              divergence);
  check_scalars("kdops.fused_linear_kd", temperature, soft, hard, s_cap, t_cap, s_scale, t_scale, chunk_size);
  TORCH_CHECK(mix >= 0.0 && mix <= 1.0, "kdops.fused_linear_kd: beta / skew must be in [0, 1], got ", mix);
}

inline void check_topk_scalars(int64_t tail, double retemper, double temperature, double soft, double hard,
                               double s_cap, double s_scale, int64_t chunk_size) {
  TORCH_CHECK(tail >= 0 && tail <= 2, "kdops.topk_kd: tail code must be in [0, 2], got ", tail);
  check_scalars("kdops.topk_kd", temperature, soft, hard, s_cap, 0.0, s_scale, 1.0, chunk_size);
  TORCH_CHECK(std::isfinite(retemper) && retemper > 0.0, "kdops.topk_kd: the re-tempering ratio must be > 0, got ",
              retemper);
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor>;

// The chunk loop of fused_linear_kd. `rows_fn(Chunk<acc_t>&, const Params<acc_t>&)` is the device's row kernel.
template <typename acc_t, typename RowsFn>
Outputs fused_linear_kd_run(const at::Tensor& sh_in, const at::Tensor& sw_in, const std::optional<at::Tensor>& sb_in,
                            const std::optional<at::Tensor>& th_in, const std::optional<at::Tensor>& tw_in,
                            const std::optional<at::Tensor>& tb_in, const std::optional<at::Tensor>& tl_in,
                            const std::optional<at::Tensor>& target_in, const std::optional<at::Tensor>& w_in,
                            const Params<acc_t>& k, int64_t ignore_index, int64_t vocab_size, int64_t chunk_size,
                            int64_t grad_mask, RowsFn&& rows_fn, const Bf16Gemms* fast = nullptr) {
  constexpr const char* op = "kdops.fused_linear_kd";
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  check_student(op, sh_in, sw_in, sb_in);
  const int64_t N = sh_in.size(0), V = sw_in.size(0);
  const bool t_gemm = th_in.has_value();
  TORCH_CHECK(t_gemm != tl_in.has_value(), op, ": give either teacher_hidden and teacher_weight or teacher_logits");
  int64_t Vt;
  if (t_gemm) {
    TORCH_CHECK(tw_in.has_value(), op, ": teacher_hidden needs teacher_weight");
    check_matrix(op, "teacher_hidden", *th_in, -1, "(tokens, Ht)");
    TORCH_CHECK(th_in->size(0) == N, op, ": teacher_hidden must have ", N, " rows (one per token), got ",
                th_in->sizes());
    check_matrix(op, "teacher_weight", *tw_in, th_in->size(1), "(Vt, Ht)");
    check_same(op, "teacher_hidden", *th_in, sh_in);
    check_same(op, "teacher_weight", *tw_in, sh_in);
    Vt = tw_in->size(0);
    check_bias(op, "teacher_bias", tb_in, Vt, sh_in);
  } else {
    TORCH_CHECK(!tw_in.has_value() && !tb_in.has_value(), op,
                ": teacher_weight and teacher_bias go with teacher_hidden, not with teacher_logits");
    check_matrix(op, "teacher_logits", *tl_in, -1, "(tokens, Vt)");
    TORCH_CHECK(tl_in->size(0) == N, op, ": teacher_logits must have ", N, " rows, got ", tl_in->sizes());
    check_same(op, "teacher_logits", *tl_in, sh_in);
    Vt = tl_in->size(1);
  }
  const int64_t vs = vocab_size > 0 ? vocab_size : V;
  TORCH_CHECK(vocab_size > 0 || V == Vt, op, ": the student's vocabulary (", V, ") and the teacher's (", Vt,
              ") differ: pass vocab_size, the number of leading columns both share");
  TORCH_CHECK(vs >= 1 && vs <= V && vs <= Vt, op, ": vocab_size must be in [1, min(V, Vt)] = [1, ", std::min(V, Vt),
              "], got ", vs);
  check_target(op, target_in, N, sh_in, k.hard != acc_t(0));
  auto [w, w_stride] = prepare_weight<acc_t>(op, w_in, N, sh_in, acc);

  const auto opts = sh_in.options().dtype(acc);
  const bool grad_s = (grad_mask & (kGradSH | kGradSW | kGradSB)) != 0;
  const bool grad_t = (grad_mask & (kGradTH | kGradTW | kGradTB | kGradTL)) != 0;
  at::Tensor rows = at::empty({N}, opts);
  at::Tensor g_sh = (grad_mask & kGradSH) ? at::empty({N, sh_in.size(1)}, opts) : empty0(sh_in, acc);
  at::Tensor g_sw = (grad_mask & kGradSW) ? at::zeros({V, sw_in.size(1)}, opts) : empty0(sh_in, acc);
  at::Tensor g_sb = (grad_mask & kGradSB) && sb_in.has_value() ? at::zeros({V}, opts) : empty0(sh_in, acc);
  at::Tensor g_th = (grad_mask & kGradTH) && t_gemm ? at::empty({N, th_in->size(1)}, opts) : empty0(sh_in, acc);
  at::Tensor g_tw = (grad_mask & kGradTW) && t_gemm ? at::zeros({Vt, tw_in->size(1)}, opts) : empty0(sh_in, acc);
  at::Tensor g_tb = (grad_mask & kGradTB) && t_gemm && tb_in.has_value() ? at::zeros({Vt}, opts) : empty0(sh_in, acc);
  at::Tensor g_tl = (grad_mask & kGradTL) && !t_gemm ? at::zeros({N, Vt}, opts) : empty0(sh_in, acc);
  if (N == 0) return {rows.sum(), rows, g_sh, g_sw, g_sb, g_th, g_tw, g_tb, g_tl};

  const int64_t c = std::min(chunk_size, N);
  Side<acc_t> ss(fast, sh_in, sw_in, sb_in, vs, acc, c, g_sh.numel() > 0, g_sw.numel() > 0);
  std::optional<Side<acc_t>> ts;
  if (t_gemm) ts.emplace(fast, *th_in, *tw_in, tb_in, vs, acc, c, g_th.numel() > 0, g_tw.numel() > 0);
  const at::Tensor target = target_in.has_value() ? target_in->contiguous() : at::Tensor();
  at::Tensor buf_s = at::empty({c, vs}, opts);
  at::Tensor buf_t = at::empty({c, vs}, opts);
  for (int64_t r0 = 0; r0 < N; r0 += c) {
    const int64_t n = std::min(c, N - r0);
    at::Tensor S = buf_s.narrow(0, 0, n), T = buf_t.narrow(0, 0, n);
    const at::Tensor hs = ss.hidden(sh_in, r0, n);
    ss.logits(S, hs);
    at::Tensor ht;
    if (t_gemm) {
      ht = ts->hidden(*th_in, r0, n);
      ts->logits(T, ht);
    } else {
      T.copy_(tl_in->narrow(0, r0, n).narrow(1, 0, vs));
    }
    Chunk<acc_t> ch = make_chunk<acc_t>(S, r0, n, target, ignore_index, w, w_stride, rows, grad_s);
    ch.t = T.data_ptr<acc_t>();
    ch.ldt = vs;
    ch.grad_t = grad_t;
    rows_fn(ch, k);
    ss.grads(S, hs, r0, n, g_sh.numel() > 0, g_sw.numel() > 0, g_sh, g_sw, g_sb);
    if (t_gemm) ts->grads(T, ht, r0, n, g_th.numel() > 0, g_tw.numel() > 0, g_th, g_tw, g_tb);
    if (g_tl.numel() > 0) g_tl.narrow(0, r0, n).narrow(1, 0, vs).copy_(T);
  }
  ss.finish(g_sw);
  if (t_gemm) ts->finish(g_tw);
  at::Tensor total = w.defined() ? rows.mul(w).sum() : rows.sum();
  return {total, rows, g_sh, g_sw, g_sb, g_th, g_tw, g_tb, g_tl};
}

using TopkOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The chunk loop of topk_kd: the student's logits per chunk, the teacher's K ids and log-probs read as given.
template <typename acc_t, typename RowsFn>
TopkOutputs topk_kd_run(const at::Tensor& sh_in, const at::Tensor& sw_in, const std::optional<at::Tensor>& sb_in,
                        const at::Tensor& ids_in, const at::Tensor& lps_in, const std::optional<at::Tensor>& target_in,
                        const std::optional<at::Tensor>& w_in, const Params<acc_t>& k, int64_t ignore_index,
                        int64_t vocab_size, int64_t chunk_size, int64_t grad_mask, RowsFn&& rows_fn,
                        const Bf16Gemms* fast = nullptr) {
  constexpr const char* op = "kdops.topk_kd";
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  check_student(op, sh_in, sw_in, sb_in);
  const int64_t N = sh_in.size(0), V = sw_in.size(0);
  TORCH_CHECK(ids_in.dim() == 2 && ids_in.size(0) == N && ids_in.size(1) >= 1 && ids_in.scalar_type() == at::kLong,
              op, ": teacher_ids must be int64 (", N, ", K) with K >= 1, got ", ids_in.sizes(), " ",
              ids_in.scalar_type());
  TORCH_CHECK(lps_in.sizes() == ids_in.sizes() && lps_in.is_floating_point(), op,
              ": teacher_logprobs must be floating ", ids_in.sizes(), " like teacher_ids, got ", lps_in.sizes(), " ",
              lps_in.scalar_type());
  check_same(op, "teacher_ids", ids_in, sh_in);
  check_same(op, "teacher_logprobs", lps_in, sh_in);
  const int64_t vs = vocab_size > 0 ? vocab_size : V;
  TORCH_CHECK(vs >= 1 && vs <= V, op, ": vocab_size must be in [1, V] = [1, ", V, "], got ", vs);
  const int64_t K = ids_in.size(1);
  TORCH_CHECK(K <= vs, op, ": teacher_ids has K = ", K, " ids per token, more than the vocabulary (", vs, ")");
  check_target(op, target_in, N, sh_in, k.hard != acc_t(0));
  auto [w, w_stride] = prepare_weight<acc_t>(op, w_in, N, sh_in, acc);

  const auto opts = sh_in.options().dtype(acc);
  const bool grad_s = (grad_mask & (kGradSH | kGradSW | kGradSB)) != 0;
  at::Tensor rows = at::empty({N}, opts);
  at::Tensor g_sh = (grad_mask & kGradSH) ? at::empty({N, sh_in.size(1)}, opts) : empty0(sh_in, acc);
  at::Tensor g_sw = (grad_mask & kGradSW) ? at::zeros({V, sw_in.size(1)}, opts) : empty0(sh_in, acc);
  at::Tensor g_sb = (grad_mask & kGradSB) && sb_in.has_value() ? at::zeros({V}, opts) : empty0(sh_in, acc);
  if (N == 0) return {rows.sum(), rows, g_sh, g_sw, g_sb};

  const int64_t c = std::min(chunk_size, N);
  Side<acc_t> ss(fast, sh_in, sw_in, sb_in, vs, acc, c, g_sh.numel() > 0, g_sw.numel() > 0);
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor lps = as_acc(lps_in, acc);
  const at::Tensor target = target_in.has_value() ? target_in->contiguous() : at::Tensor();
  at::Tensor buf_s = at::empty({c, vs}, opts);
  for (int64_t r0 = 0; r0 < N; r0 += c) {
    const int64_t n = std::min(c, N - r0);
    at::Tensor S = buf_s.narrow(0, 0, n);
    const at::Tensor hs = ss.hidden(sh_in, r0, n);
    ss.logits(S, hs);
    Chunk<acc_t> ch = make_chunk<acc_t>(S, r0, n, target, ignore_index, w, w_stride, rows, grad_s);
    ch.ids = ids.data_ptr<int64_t>() + r0 * K;
    ch.lps = lps.data_ptr<acc_t>() + r0 * K;
    ch.k = K;
    rows_fn(ch, k);
    ss.grads(S, hs, r0, n, g_sh.numel() > 0, g_sw.numel() > 0, g_sh, g_sw, g_sb);
  }
  ss.finish(g_sw);
  at::Tensor total = w.defined() ? rows.mul(w).sum() : rows.sum();
  return {total, rows, g_sh, g_sw, g_sb};
}

}  // namespace lm
}  // namespace kdops
