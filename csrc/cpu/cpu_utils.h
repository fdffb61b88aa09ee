// CPU helpers shared by the kdops CPU kernels.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

// Hot loops are compiled twice, for x86-64-v3 (AVX2 + FMA) and baseline, and picked at load time, so one
// binary vectorises on current CPUs and still runs on old ones.
// (Measured here: the AVX-512 clone runs the exp-heavy loops twice as fast as the AVX2 one.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KDOPS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KDOPS_CPU_CLONES
#endif

namespace kdops {
namespace cpu {

// Rows are processed in chunks that stay in L1 (the fallback two-pass path reads a chunk twice), and
// chunks in blocks that prefetch the inputs kPrefetchAhead elements ahead: the exp-heavy loops leave the
// hardware prefetcher behind (1024 x 32000 fp32 forward, 2 threads: 37 -> 19 ms in a standalone test).
constexpr int64_t kChunk = 2048;
constexpr int64_t kBlock = 64;
constexpr int64_t kPrefetchAhead = 1024;

template <typename T>
inline void prefetch_block(const T* s, const T* t) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = 0; i < kBlock; i += kLine) {
    __builtin_prefetch(s + i);
    __builtin_prefetch(t + i);
  }
}

// Gives a chunk of input as acc_t: a pointer into the input when no conversion is needed, else a copy.
template <typename scalar_t, typename acc_t>
struct ChunkReader {
  acc_t buf[std::is_same_v<scalar_t, acc_t> ? 1 : kChunk];
  const acc_t* read(const scalar_t* p, int64_t n) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return p;
    } else {
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(p[i]);
      return buf;
    }
  }
};

// Gives a chunk-sized acc_t destination that `flush` writes back to the output in its dtype.
template <typename scalar_t, typename acc_t>
struct ChunkWriter {
  acc_t buf[std::is_same_v<scalar_t, acc_t> ? 1 : kChunk];
  acc_t* dest(scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return p;
    } else {
      return buf;
    }
  }
  void flush(scalar_t* p, int64_t n) {
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(buf[i]);
    }
  }
};

}  // namespace cpu
}  // namespace kdops
