// Launch geometry shared by the CUDA kernels: 256-thread blocks, and grid-stride loops over at most 65535
// blocks for element-wise kernels.
#pragma once

#include <algorithm>
#include <cstdint>

namespace kdops {
namespace cuda {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

}  // namespace cuda
}  // namespace kdops
