// bf16 x bf16 -> fp32 GEMMs on VDPBF16PS (see bf16_gemm.h).
//
// VDPBF16PS adds to each fp32 lane the dot product of a pair of bf16 values from each operand. So B is packed
// into panels of kPanel columns, each a (K/2, kPanel) array of words holding the pair (B(2i, n), B(2i + 1, n));
// a row of A, read as words, gives the matching pair (A(m, 2i), A(m, 2i + 1)) to broadcast. A tile of MR rows by
// the panel's 32 columns lives in 2 MR zmm registers over a block of K; the panel's block (kKBlock pairs, 16 KiB)
// stays in L1 across the MR-row tiles of a task. Odd K: the last pair's upper half is 0 in the packed B and
// never read from A.
//
// fp32 operands (the logits' gradients) are split into two bf16 terms, hi = bf16(x) and lo = bf16(x - hi), which
// carry 16 of its bits; a GEMM against each, both accumulating in fp32, then errs as an fp32 GEMM does.
#include "cpu/bf16_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
// GCC's _mm512_undefined_* inside the conversion intrinsics trip -Wmaybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define KDOPS_HAVE_BF16_KERNEL 1
#define KDOPS_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define KDOPS_HAVE_BF16_KERNEL 0
#endif

namespace kdops {
namespace cpu {
namespace bf16 {

namespace {
constexpr int kMR = 8;            // rows of a register tile: 16 accumulators
constexpr int64_t kKBlock = 128;  // pairs of K per block: a panel's block is 128 x 32 words = 16 KiB
constexpr int64_t kMBlock = 128;  // rows of A per task
}  // namespace

bool available() {
#if KDOPS_HAVE_BF16_KERNEL
  static const bool ok = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
#else
  return false;
#endif
}

int64_t packed_words(int64_t K, int64_t N) {
  return ((N + kPanel - 1) / kPanel) * ((K + 1) / 2) * kPanel;
}

void pack_rows(const uint16_t* W, int64_t N, int64_t K, int64_t ldw, uint32_t* out) {
  const int64_t K2 = (K + 1) / 2, P = (N + kPanel - 1) / kPanel;
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      uint32_t* o = out + p * K2 * kPanel;
      for (int64_t c = 0; c < kPanel; ++c) {
        const int64_t n = p * kPanel + c;
        if (n >= N) {
          for (int64_t i = 0; i < K2; ++i) o[i * kPanel + c] = 0;
          continue;
        }
        const uint16_t* w = W + n * ldw;
        for (int64_t i = 0; i < K / 2; ++i) o[i * kPanel + c] = uint32_t(w[2 * i]) | (uint32_t(w[2 * i + 1]) << 16);
        if (K & 1) o[(K2 - 1) * kPanel + c] = w[K - 1];
      }
    }
  });
}

void pack_cols(const uint16_t* W, int64_t K, int64_t N, int64_t ldw, uint32_t* out) {
  const int64_t K2 = (K + 1) / 2, P = (N + kPanel - 1) / kPanel;
  at::parallel_for(0, K2, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const uint16_t* r0 = W + 2 * i * ldw;
      const uint16_t* r1 = 2 * i + 1 < K ? r0 + ldw : nullptr;
      for (int64_t p = 0; p < P; ++p) {
        uint32_t* o = out + (p * K2 + i) * kPanel;
        const int64_t nc = std::min(kPanel, N - p * kPanel);
        for (int64_t c = 0; c < nc; ++c) {
          const int64_t n = p * kPanel + c;
          o[c] = uint32_t(r0[n]) | (r1 ? uint32_t(r1[n]) << 16 : 0u);
        }
        for (int64_t c = nc; c < kPanel; ++c) o[c] = 0;
      }
    }
  });
}

#if KDOPS_HAVE_BF16_KERNEL
namespace {

KDOPS_BF16_TARGET __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// x = hi + lo in bf16, hi rounded to nearest even, lo the rounded remainder; returned zero-extended to 32 bits.
KDOPS_BF16_TARGET inline void split16(__m512 x, __m512i& hi, __m512i& lo) {
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(x);
  hi = _mm512_cvtepu16_epi32(h);
  const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16));
  lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(x, back)));
}

// Pairs [i0, i1) of rows of G, 32 columns at a time: two rows of fp32 split into bf16 hi and lo, interleaved
// into words (unless out is null): hi at pair i of each panel, lo (stacked) at pair K2 + i; and row-major hi and
// lo when asked.
KDOPS_BF16_TARGET void pack_cols_rows(const float* G, int64_t K, int64_t N, int64_t ldg, uint32_t* out, bool stacked,
                                      uint16_t* hi_rows, uint16_t* lo_rows, int64_t i0, int64_t i1) {
  const int64_t K2 = (K + 1) / 2, P = (N + kPanel - 1) / kPanel, stride = stacked ? 2 * K2 : K2;
  for (int64_t i = i0; i < i1; ++i) {
    const float* r0 = G + 2 * i * ldg;
    const float* r1 = 2 * i + 1 < K ? r0 + ldg : nullptr;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t at = (p * stride + i) * kPanel;
      for (int h = 0; h < 2; ++h) {
        const int64_t col = p * kPanel + 16 * h;
        const __mmask16 m = lanes(N - col);
        __m512i ah, al, bh, bl;
        split16(_mm512_maskz_loadu_ps(m, r0 + col), ah, al);
        split16(r1 ? _mm512_maskz_loadu_ps(m, r1 + col) : _mm512_setzero_ps(), bh, bl);
        if (out) _mm512_storeu_si512(out + at + 16 * h, _mm512_or_si512(ah, _mm512_slli_epi32(bh, 16)));
        if (out && stacked)
          _mm512_storeu_si512(out + at + K2 * kPanel + 16 * h, _mm512_or_si512(al, _mm512_slli_epi32(bl, 16)));
        if (hi_rows) {
          const int64_t o = 2 * i * N + col;
          _mm256_mask_storeu_epi16(hi_rows + o, m, _mm512_cvtepi32_epi16(ah));
          _mm256_mask_storeu_epi16(lo_rows + o, m, _mm512_cvtepi32_epi16(al));
          if (r1) {
            _mm256_mask_storeu_epi16(hi_rows + o + N, m, _mm512_cvtepi32_epi16(bh));
            _mm256_mask_storeu_epi16(lo_rows + o + N, m, _mm512_cvtepi32_epi16(bl));
          }
        }
      }
    }
  }
}

// C tile (MR x nc, nc <= 32) (+)= A rows (pairs [0, full) and, with tail, the low half of pair `full`) x panel B.
template <int MR>
KDOPS_BF16_TARGET void tile(const uint16_t* A, int64_t lda, const uint32_t* B, int64_t full, bool tail, float* C,
                            int64_t ldc, int64_t nc, bool add) {
  const __mmask16 m0 = lanes(nc), m1 = lanes(nc - 16);
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    c0[r] = add ? _mm512_maskz_loadu_ps(m0, C + r * ldc) : _mm512_setzero_ps();
    c1[r] = add ? _mm512_maskz_loadu_ps(m1, C + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < full; ++i) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + i * kPanel);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(B + i * kPanel + 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      uint32_t w;
      std::memcpy(&w, A + r * lda + 2 * i, sizeof(w));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(int(w));
      c0[r] = _mm512_dpbf16_ps(c0[r], a, b0);
      c1[r] = _mm512_dpbf16_ps(c1[r], a, b1);
    }
  }
  if (tail) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + full * kPanel);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(B + full * kPanel + 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(int(uint32_t(A[r * lda + 2 * full])));
      c0[r] = _mm512_dpbf16_ps(c0[r], a, b0);
      c1[r] = _mm512_dpbf16_ps(c1[r], a, b1);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(C + r * ldc, m0, c0[r]);
    _mm512_mask_storeu_ps(C + r * ldc + 16, m1, c1[r]);
  }
}

using TileFn = void (*)(const uint16_t*, int64_t, const uint32_t*, int64_t, bool, float*, int64_t, int64_t, bool);
constexpr TileFn kTiles[kMR] = {tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>, tile<7>, tile<8>};

// One task: rows [m0, m1) of C against panel p, over all of K.
void task(const uint16_t* A, int64_t lda, const uint32_t* B, int64_t m0, int64_t m1, int64_t p, int64_t N, int64_t K,
          float* C, int64_t ldc, bool add) {
  const int64_t K2 = (K + 1) / 2, nc = std::min(kPanel, N - p * kPanel);
  const uint32_t* Bp = B + p * K2 * kPanel;
  for (int64_t k0 = 0; k0 < K2; k0 += kKBlock) {
    const int64_t k1 = std::min(K2, k0 + kKBlock);
    const bool tail = (K & 1) && k1 == K2;
    const int64_t full = (tail ? k1 - 1 : k1) - k0;
    for (int64_t m = m0; m < m1; m += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, m1 - m);
      kTiles[mr - 1](A + m * lda + 2 * k0, lda, Bp + k0 * kPanel, full, tail, C + m * ldc + p * kPanel, ldc, nc,
                     add || k0 > 0);
    }
  }
}

}  // namespace
#endif

void pack_cols_f32(const float* G, int64_t K, int64_t N, int64_t ldg, uint32_t* out, bool stacked, uint16_t* hi_rows,
                   uint16_t* lo_rows) {
#if KDOPS_HAVE_BF16_KERNEL
  at::parallel_for(0, (K + 1) / 2, 8, [&](int64_t i0, int64_t i1) {
    pack_cols_rows(G, K, N, ldg, out, stacked, hi_rows, lo_rows, i0, i1);
  });
#else
  TORCH_INTERNAL_ASSERT(false, "kdops: the bf16 GEMM kernels are not built on this platform");
#endif
}

void gemm(const uint16_t* A, int64_t lda, const uint32_t* B, int64_t M, int64_t N, int64_t K, float* C, int64_t ldc,
          bool add) {
#if KDOPS_HAVE_BF16_KERNEL
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum: C = 0, or C as it is
    if (!add)
      for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.0f);
    return;
  }
  const int64_t P = (N + kPanel - 1) / kPanel, MB = (M + kMBlock - 1) / kMBlock;
  // Consecutive tasks (one thread's share) keep the larger operand's block: A's rows when A is the larger
  // (the weight-gradient GEMM, M = vocabulary), else B's panel (the logits GEMM, N = vocabulary).
  const bool a_major = M * K >= N * K;
  at::parallel_for(0, P * MB, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = a_major ? t / P : t % MB, p = a_major ? t % P : t / MB;
      task(A, lda, B, i * kMBlock, std::min(M, (i + 1) * kMBlock), p, N, K, C, ldc, add);
    }
  });
#else
  TORCH_INTERNAL_ASSERT(false, "kdops: the bf16 GEMM kernels are not built on this platform");
#endif
}

}  // namespace bf16
}  // namespace cpu
}  // namespace kdops
