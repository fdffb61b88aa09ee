// CPU helpers shared by the kdops CPU kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <c10/util/bit_cast.h>
#include <cstddef>
#include <cstdlib>
#include <cstdint>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// Hot loops are compiled twice, for x86-64-v3 (AVX2 + FMA) and baseline, and picked at load time, so one
// binary vectorises on current CPUs and still runs on old ones.
// (Measured here: the AVX-512 clone runs the exp-heavy loops twice as fast as the AVX2 one.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KDOPS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KDOPS_CPU_CLONES
#endif

// GCC tunes the x86-64-v4 clone above for 256-bit vectors. Loops over 16-bit data run faster with all 512 bits:
// measured on the bf16 partial L2 loop with 64 to 3136-element planes, 10-25% less time on warm buffers and
// about a third less when the output's pages are fresh. Such loops get a second build with KDOPS_CPU_WIDE,
// chosen at run time where cpu_has_wide_build(). The loop itself must carry the attribute: a target_clones
// function cannot take a vector width, and a loop inlined into a KDOPS_CPU_WIDE function keeps 256 bits. So
// the loops are written once in an .inc file included under each attribute (see partial_l2.cpp).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KDOPS_CPU_WIDE __attribute__((target("arch=x86-64-v4,prefer-vector-width=512")))
#define KDOPS_CPU_HAS_WIDE_BUILD 1
#else
#define KDOPS_CPU_WIDE
#define KDOPS_CPU_HAS_WIDE_BUILD 0
#endif

namespace kdops {
namespace cpu {

// Asks the kernel to back the 2 MiB-aligned interior of a fresh, not yet written output with transparent huge pages
// (where THP is in "madvise" mode). Outputs above glibc's largest mmap threshold (32 MiB) come from a new mmap on
// every call, and on first write every 4 KiB page faults: measured here, filling a new 125 MiB tensor took 44 ms
// with 4 KiB pages and 9 ms with huge pages (medians). Smaller outputs are usually recycled heap memory and are left
// alone. On this virtual machine the first huge-page faults of a process, and some later ones, stalled for
// 0.1-0.7 s; KDOPS_CPU_HUGE_PAGES=0 turns the advice off.
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kHugeMin = size_t(32) << 20;

inline bool huge_pages_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("KDOPS_CPU_HUGE_PAGES");
    return v == nullptr || v[0] != '0';
  }();
  return on;
}

inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (p == nullptr || bytes < kHugeMin || !huge_pages_enabled()) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHugePage - 1) & ~(uintptr_t(kHugePage) - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(uintptr_t(kHugePage) - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// The same for a freshly allocated output tensor (any type with data_ptr() and nbytes()).
template <typename TensorT>
inline void advise_huge_pages(const TensorT& out) {
  advise_huge_pages(out.data_ptr(), out.nbytes());
}

inline bool cpu_has_wide_build() {
#if KDOPS_CPU_HAS_WIDE_BUILD
  static const bool ok = __builtin_cpu_supports("x86-64-v4");
  return ok;
#else
  return false;
#endif
}

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

// Chunk conversions between the 16-bit storage types and float, written branch-free so that the compiler
// vectorises them (c10's scalar conversions, with their branches, do not; GCC 12 does not vectorise
// _Float16 either). bf16 is the top half of a float, rounded to nearest even on the way back. fp16 uses
// the exponent-rebias tricks of F. Giesen's public-domain half conversions: subnormals, inf and NaN
// included, round to nearest even.
namespace {

inline float half_bits_to_float(uint32_t h) {
  const float magic = c10::bit_cast<float>(uint32_t(254 - 15) << 23);       // 2^112
  const float was_inf_nan = c10::bit_cast<float>(uint32_t(127 + 16) << 23);  // 2^16
  float o = c10::bit_cast<float>((h & 0x7fffu) << 13) * magic;
  uint32_t bits = c10::bit_cast<uint32_t>(o);
  bits = o >= was_inf_nan ? (bits | (uint32_t(255) << 23)) : bits;
  return c10::bit_cast<float>(bits | ((h & 0x8000u) << 16));
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t f_inf = uint32_t(255) << 23, f16_max = uint32_t(127 + 16) << 23;
  const uint32_t denorm_magic_bits = uint32_t((127 - 15) + (23 - 10) + 1) << 23;
  uint32_t u = c10::bit_cast<uint32_t>(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  const uint32_t inf_nan = u > f_inf ? 0x7e00u : 0x7c00u;
  const uint32_t sub = c10::bit_cast<uint32_t>(c10::bit_cast<float>(u) + c10::bit_cast<float>(denorm_magic_bits)) -
                       denorm_magic_bits;
  const uint32_t normal = (u + (uint32_t(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
  const uint32_t o = u >= f16_max ? inf_nan : (u < (uint32_t(113) << 23) ? sub : normal);
  return uint16_t(o | (sign >> 16));
}

template <typename T>
KDOPS_CPU_CLONES void load_floats(const T* p, float* out, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* u = reinterpret_cast<const uint16_t*>(p);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      out[i] = c10::bit_cast<float>(uint32_t(u[i]) << 16);
    }
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = half_bits_to_float(h[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
  }
}

template <typename T>
KDOPS_CPU_CLONES void store_floats(const float* in, T* p, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint16_t* u = reinterpret_cast<uint16_t*>(p);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t bits = c10::bit_cast<uint32_t>(in[i]);
      const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
      u[i] = in[i] != in[i] ? uint16_t(0x7FC0) : uint16_t(rounded);
    }
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    uint16_t* h = reinterpret_cast<uint16_t*>(p);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) h[i] = float_to_half_bits(in[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(in[i]);
  }
}

// One element as float / from float, for loops that convert in place instead of through a chunk buffer;
// the same branch-free conversions as above, so these loops vectorise too.
inline float to_acc(c10::BFloat16 x) { return c10::bit_cast<float>(uint32_t(x.x) << 16); }
inline float to_acc(c10::Half x) { return half_bits_to_float(x.x); }
inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }

template <typename T>
inline T from_acc(float v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t bits = c10::bit_cast<uint32_t>(v);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return c10::BFloat16(v != v ? uint16_t(0x7FC0) : uint16_t(rounded), c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return c10::Half(float_to_half_bits(v), c10::Half::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

template <typename T>
inline T from_acc(double v) {
  return static_cast<T>(v);
}

}  // namespace

// Gives a chunk of input as acc_t: a pointer into the input when no conversion is needed, else a copy.
template <typename scalar_t, typename acc_t>
struct ChunkReader {
  acc_t buf[std::is_same_v<scalar_t, acc_t> ? 1 : kChunk];
  const acc_t* read(const scalar_t* p, int64_t n) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return p;
    } else {
      load_floats(p, buf, n);
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
    if constexpr (!std::is_same_v<scalar_t, acc_t>) store_floats(buf, p, n);
  }
};

}  // namespace cpu
}  // namespace kdops
