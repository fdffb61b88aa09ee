// Host emulation of a CUDA thread block's reduction, for the *_emulate test ops: the reduction order of
// cub::BlockReduce's default algorithm (BLOCK_REDUCE_WARP_REDUCTIONS). Each warp of 32 threads reduces its
// values with shuffles at offsets 1, 2, 4, 8, 16 (lane i takes lane i + offset: a pairwise tree whose result
// lands in lane 0); thread 0 then folds the warps' aggregates one after another, in warp order. With the same
// operands in the same order, an emulated reduction is the device's up to the device's own instructions.
#pragma once

#include <cstddef>
#include <vector>

namespace kdops {
namespace cpu {

template <typename T, typename Op>
T block_reduce_emulated(std::vector<T> v, Op&& op) {
  constexpr size_t kWarp = 32;
  T total{};
  for (size_t w0 = 0; w0 < v.size(); w0 += kWarp) {
    const size_t lanes = v.size() - w0 < kWarp ? v.size() - w0 : kWarp;
    for (size_t offset = 1; offset < lanes; offset *= 2) {
      for (size_t i = 0; i + offset < lanes; i += 2 * offset) v[w0 + i] = op(v[w0 + i], v[w0 + i + offset]);
    }
    total = w0 == 0 ? v[0] : op(total, v[w0]);
  }
  return total;
}

}  // namespace cpu
}  // namespace kdops
