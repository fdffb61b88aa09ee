// CPU kernels of the attention-transfer map: e[b, hw] = sum (or mean) over channels of |f[b, c, hw]|^p in one
// read of the map, and its backward p |f|^(p-1) sign(f) e_grad in one read and one write; the normalisation
// and the loss on the small (b, HW) maps stay in ATen.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/cpu_utils.h"
#include "kdops/feature_math.h"
#include "kdops/gram_host.h"

namespace kdops {
namespace cpu {
namespace {

constexpr int64_t kSpan = 512;  // hw positions per task: the channel loop re-reads this span's accumulators

template <typename T>
KDOPS_CPU_CLONES void channel_sum(const T* f, int64_t C, int64_t hw, int64_t h0, int64_t h1, T p, int ip, T scale,
                                  T* out) {
  T acc[kSpan];
  const int64_t n = h1 - h0;
  for (int64_t i = 0; i < n; ++i) acc[i] = 0;
  for (int64_t c = 0; c < C; ++c) {
    const T* fc = f + c * hw + h0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] += feature::abs_pow(fc[i], p, ip);
  }
  for (int64_t i = 0; i < n; ++i) out[h0 + i] = acc[i] * scale;
}

template <typename T>
KDOPS_CPU_CLONES void channel_grad(const T* f, const T* g, int64_t C, int64_t hw, T p, int ip, T scale, T* out) {
  for (int64_t c = 0; c < C; ++c) {
    const T* fc = f + c * hw;
    T* oc = out + c * hw;
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) oc[i] = feature::abs_pow_grad(fc[i], p, ip) * g[i] * scale;
  }
}

at::Tensor at_map_cpu(const at::Tensor& f_in, double p, bool mean) {
  gram::check_at_map("kdops.at_map", f_in, p);
  const at::Tensor f = f_in.contiguous();
  const int64_t B = f.size(0), C = f.size(1), hw = f.size(2);
  at::Tensor out = at::empty({B, hw}, f.options());
  if (B == 0 || hw == 0) return out;
  const int64_t spans = (hw + kSpan - 1) / kSpan;
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "at_map_cpu", [&] {
    using T = scalar_t;
    const T* fp = f.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    const T scale = mean && C > 0 ? T(1.0 / double(C)) : T(1);
    const int ip = feature::integer_power(p);
    at::parallel_for(0, B * spans, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t bi = k / spans, h0 = (k % spans) * kSpan, h1 = std::min(hw, h0 + kSpan);
        channel_sum<T>(fp + bi * C * hw, C, hw, h0, h1, T(p), ip, scale, op + bi * hw);
      }
    });
  });
  return out;
}

at::Tensor at_map_backward_cpu(const at::Tensor& grad_in, const at::Tensor& f_in, double p, bool mean) {
  gram::check_at_map("kdops.at_map_backward", f_in, p);
  const at::Tensor f = f_in.contiguous();
  const int64_t B = f.size(0), C = f.size(1), hw = f.size(2);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == B && grad_in.size(1) == hw,
              "kdops.at_map_backward: grad must be (b, HW) = (", B, ", ", hw, "), got ", grad_in.sizes());
  const at::Tensor g = grad_in.to(f.scalar_type()).contiguous();
  at::Tensor out = at::empty(f.sizes(), f.options());
  advise_huge_pages(out);
  if (f.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "at_map_backward_cpu", [&] {
    using T = scalar_t;
    const T *fp = f.const_data_ptr<T>(), *gp = g.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    const T scale = mean ? T(1.0 / double(C)) : T(1);
    const int ip = feature::integer_power(p);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t bi = b0; bi < b1; ++bi) {
        channel_grad<T>(fp + bi * C * hw, gp + bi * hw, C, hw, T(p), ip, scale, op + bi * C * hw);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("at_map", &kdops::cpu::at_map_cpu);
  m.impl("at_map_backward", &kdops::cpu::at_map_backward_cpu);
}
