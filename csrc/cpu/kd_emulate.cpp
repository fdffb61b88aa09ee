// Host emulation of the CUDA forward of kd_div, so that the CPU test suite executes the device-only math
// (kd::push, the online one-exp update, and kd::merge in a block-reduction tree) on machines without a GPU.
// Each of `threads` virtual threads folds its strided share of a row with kd::push, exactly as a CUDA
// thread does; the states are then merged in the order of CUB's block reduction (cpu/block_emulate.h). Test use
// only.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu/block_emulate.h"
#include "kdops/kd_host.h"
#include "kdops/kd_math.h"

namespace kdops {
namespace cpu {
namespace {

using kd::Divergence;
using kd::RowState;

template <typename scalar_t, Divergence D>
void emulate_rows(const kd::KdCall& c, double temperature, int64_t ignore_index, int64_t threads) {
  const scalar_t inv_t = scalar_t(1.0 / temperature);
  const scalar_t* student = c.s.const_data_ptr<scalar_t>();
  const scalar_t* teacher = c.t.const_data_ptr<scalar_t>();
  const int64_t* target = c.target_ptr();
  scalar_t* loss = c.out0.mutable_data_ptr<scalar_t>();
  scalar_t* stats = c.out1.mutable_data_ptr<scalar_t>();
  for (int64_t r = 0; r < c.N; ++r) {
    scalar_t* st_row = stats + r * kd::kNumStats;
    const int64_t y = target != nullptr ? target[r] : -1;
    if (target != nullptr && y == ignore_index) {
      loss[r] = 0;
      std::fill(st_row, st_row + kd::kNumStats, scalar_t(0));
      continue;
    }
    TORCH_CHECK(D != Divergence::DKD || (y >= 0 && y < c.C), "target out of range");
    const scalar_t* s = student + r * c.C;
    const scalar_t* t = teacher + r * c.C;
    const int64_t skip = D == Divergence::DKD ? y : -1;
    std::vector<RowState<scalar_t>> states(threads, RowState<scalar_t>::empty());
    for (int64_t tid = 0; tid < threads; ++tid) {
      for (int64_t k = tid; k < c.C; k += threads) {
        if (k != skip) kd::push(states[tid], s[k], t[k], inv_t);
      }
    }
    const RowState<scalar_t> state =
        block_reduce_emulated(states, [&](const RowState<scalar_t>& a, const RowState<scalar_t>& b) {
          return kd::merge(a, b, inv_t);
        });
    const scalar_t xs_y = skip >= 0 ? s[skip] : scalar_t(0), xt_y = skip >= 0 ? t[skip] : scalar_t(0);
    scalar_t value = kd::finish_row<D>(state, inv_t, scalar_t(c.w1), scalar_t(c.w2), xs_y, xt_y, st_row);
    if (D == Divergence::JSD) {
      const scalar_t w1 = scalar_t(c.w1), w2 = scalar_t(c.w2);
      std::vector<std::pair<scalar_t, scalar_t>> sums(threads, {scalar_t(0), scalar_t(0)});
      for (int64_t tid = 0; tid < threads; ++tid) {
        for (int64_t k = tid; k < c.C; k += threads) {
          kd::jsd_accumulate(s[k], t[k], st_row, inv_t, w1, w2, sums[tid].first, sums[tid].second);
        }
      }
      const auto total = block_reduce_emulated(sums, [](const auto& a, const auto& b) {
        return std::make_pair(a.first + b.first, a.second + b.second);
      });
      value = kd::jsd_finish(total.first, total.second, scalar_t(c.w1), st_row);
    }
    loss[r] = value;
  }
}

std::tuple<at::Tensor, at::Tensor> kd_div_emulate_device(const at::Tensor& student, const at::Tensor& teacher,
                                                         const std::optional<at::Tensor>& target, double temperature,
                                                         std::string_view divergence, double alpha, double beta,
                                                         int64_t ignore_index, int64_t threads) {
  TORCH_CHECK(threads >= 1, "kdops._kd_div_emulate_device: threads must be >= 1, got ", threads);
  TORCH_CHECK(student.scalar_type() == at::kFloat || student.scalar_type() == at::kDouble,
              "kdops._kd_div_emulate_device: float32 or float64 only");
  kd::KdCall c = kd::prepare_forward(student, teacher, target, temperature, divergence, alpha, beta);
  if (c.N == 0 || c.C == 0) return {c.out0, c.out1};
  AT_DISPATCH_FLOATING_TYPES(c.s.scalar_type(), "kd_div_emulate_device", [&] {
    kd::dispatch_divergence(c.div, [&](auto dc) {
      emulate_rows<scalar_t, decltype(dc)::value>(c, temperature, ignore_index, threads);
    });
  });
  return {c.out0, c.out1};
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("_kd_div_emulate_device", &kdops::cpu::kd_div_emulate_device);
}
