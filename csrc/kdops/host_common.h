// Host-side helpers shared by the entry points of every op family.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

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

namespace detail {
template <int kOther, typename F, int... Ks>
void dispatch_small_int(int64_t v, F& fn, std::integer_sequence<int, Ks...>) {
  const bool hit = ((v == Ks ? (fn(std::integral_constant<int, Ks>{}), true) : false) || ...);
  if (!hit) fn(std::integral_constant<int, kOther>{});
}
}  // namespace detail

// Calls fn(std::integral_constant<int, v>) for v in 0..kMax, else fn(std::integral_constant<int, kOther>), so
// that a loop is specialised (unrolled, branch-free) on a small integer known only at run time.
template <int kMax, int kOther, typename F>
void dispatch_small_int(int64_t v, F&& fn) {
  detail::dispatch_small_int<kOther>(v, fn, std::make_integer_sequence<int, kMax + 1>{});
}

}  // namespace kdops
