// CPU kernels of the LogSum loss: L = log(sum |a - b|^alpha + eps) over all elements (b optional), with
// the power and the sum in fp32 (fp64 for fp64) so that fp16 / bf16 inputs do not overflow.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>

#include "cpu/cpu_utils.h"
#include "kdops/feature_host.h"
#include "kdops/feature_math.h"
#include "kdops/host_common.h"

namespace kdops {
namespace cpu {
namespace {

constexpr int64_t kGrain = 32768;

// The exact integer power K (1-4) is a compile-time constant (0: pow) through dispatch_small_int<4, 0>: with K
// known, abs_pow and abs_pow_grad fold to a few multiplies and the loops vectorise (with k read at run time
// they did not: the fp32 forward ran at a third of torch.compile's speed).

// Sums |a - b|^alpha over blocks of 256 in acc_t (vectorised), and the block sums in double: one long
// fp32 running sum per SIMD lane loses ~1e-4 relative over millions of terms (a test caught it).
template <typename scalar_t, typename acc_t, bool HasB, int K>
KDOPS_CPU_CLONES double power_sum(const scalar_t* a, const scalar_t* b, int64_t n, acc_t alpha) {
  constexpr int64_t kBlockSum = 256;
  double total = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlockSum) {
    const int64_t i1 = std::min(n, i0 + kBlockSum);
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t d = HasB ? to_acc(a[i]) - to_acc(b[i]) : to_acc(a[i]);
      sum += feature::abs_pow(d, alpha, K);
    }
    total += double(sum);
  }
  return total;
}

template <typename scalar_t, typename acc_t, bool HasB, bool WA, bool WB, int K>
KDOPS_CPU_CLONES void power_grad(const scalar_t* a, const scalar_t* b, int64_t n, acc_t alpha, acc_t coef,
                                 scalar_t* ga, scalar_t* gb) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t d = HasB ? to_acc(a[i]) - to_acc(b[i]) : to_acc(a[i]);
    const acc_t g = coef * feature::abs_pow_grad(d, alpha, K);
    if (WA) ga[i] = from_acc<scalar_t>(g);
    if (WB) gb[i] = from_acc<scalar_t>(-g);
  }
}

std::tuple<at::Tensor, at::Tensor> logsum_cpu(const at::Tensor& a_in, const std::optional<at::Tensor>& b_in,
                                              double alpha, double eps) {
  const feature::LogsumCall c = feature::prepare_logsum(a_in, b_in, alpha, eps);
  const at::Tensor &a = c.a, &b = c.b;
  const int k = feature::integer_power(alpha);
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "logsum_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    dispatch_small_int<4, 0>(k, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      total = at::parallel_reduce(
          int64_t(0), a.numel(), kGrain, 0.0,
          [&](int64_t i0, int64_t i1, double partial) {
            return partial + (bp ? power_sum<scalar_t, acc_t, true, K>(ap + i0, bp + i0, i1 - i0, acc_t(alpha))
                                 : power_sum<scalar_t, acc_t, false, K>(ap + i0, nullptr, i1 - i0, acc_t(alpha)));
          },
          [](double x, double y) { return x + y; });
    });
  });
  const auto opts = a.options().dtype(c.acc_type);
  return {at::full({}, std::log(total + eps), opts), at::full({}, total, opts)};
}

std::tuple<at::Tensor, at::Tensor> logsum_backward_cpu(const at::Tensor& grad, const at::Tensor& a_in,
                                                       const std::optional<at::Tensor>& b_in, const at::Tensor& total,
                                                       double alpha, double eps, bool a_grad, bool b_grad) {
  const feature::LogsumCall c =
      feature::prepare_logsum_backward(grad, a_in, b_in, total, alpha, eps, a_grad, b_grad);
  advise_huge_pages(c.ga);
  advise_huge_pages(c.gb);
  const at::Tensor &a = c.a, &b = c.b, &ga = c.ga, &gb = c.gb;
  if (a.numel() == 0 || !(a_grad || b_grad)) return {ga, gb};
  const double coef = grad.item<double>() / (total.item<double>() + eps);
  const int k = feature::integer_power(alpha);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "logsum_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gap = a_grad ? ga.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gbp = b_grad ? gb.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_small_int<4, 0>(k, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      dispatch_grad_flags(a_grad, b_grad, [&](auto wa, auto wb) {
        constexpr bool WA = decltype(wa)::value, WB = decltype(wb)::value;
        at::parallel_for(0, a.numel(), kGrain, [&](int64_t i0, int64_t i1) {
          if (bp) {
            power_grad<scalar_t, acc_t, true, WA, WB, K>(ap + i0, bp + i0, i1 - i0, acc_t(alpha), acc_t(coef),
                                                         WA ? gap + i0 : nullptr, WB ? gbp + i0 : nullptr);
          } else {
            power_grad<scalar_t, acc_t, false, WA, false, K>(ap + i0, nullptr, i1 - i0, acc_t(alpha), acc_t(coef),
                                                             WA ? gap + i0 : nullptr, nullptr);
          }
        });
      });
    });
  });
  return {ga, gb};
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("logsum", &kdops::cpu::logsum_cpu);
  m.impl("logsum_backward", &kdops::cpu::logsum_backward_cpu);
}
