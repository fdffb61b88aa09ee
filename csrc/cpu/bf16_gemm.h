// bf16 x bf16 -> fp32 GEMMs for CPUs with AVX512-BF16 (csrc/cpu/bf16_gemm.cpp).
//
// The lm family needs GEMMs that read bf16 inputs as they are and keep the fp32 accumulator as the result: the
// logits must not be rounded to 16 bits. ATen has no such GEMM that runs at bf16 speed here (torch.mm rounds its
// bf16 output; MKL's cblas_gemm_bf16bf16f32 and the brgemm fallback run no faster than an fp32 GEMM on this AMD
// CPU), so these are kdops' own: a register-blocked kernel on VDPBF16PS, the B operand packed into column panels
// of pairs along K.
#pragma once

#include <cstdint>

namespace kdops {
namespace cpu {
namespace bf16 {

constexpr int64_t kPanel = 32;  // columns of B per packed panel (two 16-lane vectors)

// Whether this CPU runs the kernels (AVX512-BF16 and AVX512-BW).
bool available();

// Words (uint32) a packed B of K x N takes: one pair of bf16 along K per word, panels of kPanel columns.
int64_t packed_words(int64_t K, int64_t N);

// B(k, n) = W[n * ldw + k]: W is (N, K) row-major bf16 (the layout of an lm_head weight, B = W^T).
void pack_rows(const uint16_t* W, int64_t N, int64_t K, int64_t ldw, uint32_t* out);

// B(k, n) = W[k * ldw + n]: W is (K, N) row-major bf16 (B = the lm_head weight itself).
void pack_cols(const uint16_t* W, int64_t K, int64_t N, int64_t ldw, uint32_t* out);

// G is (K, N) row-major fp32, split as G = hi + lo in bf16 (hi = G rounded to nearest even, lo = the remainder
// rounded). Packs B(k, n) = hi(k, n), or with stacked the (2 K2 x 2, N) B of hi stacked over lo along K
// (K2 = ceil(K / 2) pairs each; packed_words(4 K2, N) words), so that one GEMM against A = [a | a] (each half
// K rounded up to even, the pad column 0) sums a hi + a lo. hi_rows and lo_rows (both or neither): the split
// also written row-major (row stride N), in the same pass over G; out null: only those.
void pack_cols_f32(const float* G, int64_t K, int64_t N, int64_t ldg, uint32_t* out, bool stacked, uint16_t* hi_rows,
                   uint16_t* lo_rows);

// C (M x N, fp32, row stride ldc) = A B, or += A B when add. A is (M, K) row-major bf16 (row stride lda).
// B is packed by one of the above. K = 0 gives C = 0 (or leaves C as it is when add). Subnormal bf16 inputs count
// as 0 (VDPBF16PS treats them so).
void gemm(const uint16_t* A, int64_t lda, const uint32_t* B, int64_t M, int64_t N, int64_t K, float* C, int64_t ldc,
          bool add);

}  // namespace bf16
}  // namespace cpu
}  // namespace kdops
