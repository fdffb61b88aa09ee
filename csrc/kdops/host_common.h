// Host-side helpers shared by the entry points of every op family.
#pragma once

#include <type_traits>

namespace kdops {

// Calls fn(std::bool_constant<first>, std::bool_constant<second>) for the two "wants gradient" flags of a
// backward op, so kernels are specialised on which outputs they write. At least one flag is true.
template <typename F>
void dispatch_grad_flags(bool first, bool second, F&& fn) {
  if (first && second) {
    fn(std::true_type{}, std::true_type{});
  } else if (first) {
    fn(std::true_type{}, std::false_type{});
  } else {
    fn(std::false_type{}, std::true_type{});
  }
}

}  // namespace kdops
