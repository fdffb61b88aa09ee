// Host-side glue shared by the CPU and CUDA entry points of kdops::crd_nce: checks and output allocation.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace kdops {
namespace contrastive {

struct CrdCall {
  at::Tensor anchor, memory, index, normalizer;  // contiguous
  int64_t b, d, k1, n_bank;                     // rows, width, index columns (k + 1), memory rows
  at::ScalarType acc;
  at::Tensor loss, z_out, grad;  // (b,), (), (b, d) or (0,), all in acc
};

inline CrdCall prepare_crd(const at::Tensor& anchor, const at::Tensor& memory, const at::Tensor& index,
                           const at::Tensor& normalizer, double temperature, int64_t n_data, double eps,
                           bool anchor_grad) {
  constexpr const char* op = "kdops.crd_nce";
  TORCH_CHECK(anchor.dim() == 2 && at::isFloatingType(anchor.scalar_type()), op,
              ": anchor must be a floating (b, d) tensor, got ", anchor.sizes(), " in ", anchor.scalar_type());
  TORCH_CHECK(memory.dim() == 2 && memory.size(1) == anchor.size(1), op, ": memory must be (N, ", anchor.size(1),
              ") to match anchor, got ", memory.sizes());
  TORCH_CHECK(memory.scalar_type() == anchor.scalar_type() && memory.device() == anchor.device(), op,
              ": memory must be ", anchor.scalar_type(), " on ", anchor.device(), " like anchor, got ",
              memory.scalar_type(), " on ", memory.device());
  TORCH_CHECK(index.dim() == 2 && index.size(0) == anchor.size(0) && index.size(1) >= 1 &&
                  index.scalar_type() == at::kLong && index.device() == anchor.device(),
              op, ": index must be int64 (", anchor.size(0), ", k + 1) on ", anchor.device(), ", got ", index.sizes(),
              " ", index.scalar_type(), " on ", index.device());
  TORCH_CHECK(normalizer.numel() == 1 && at::isFloatingType(normalizer.scalar_type()) &&
                  normalizer.device() == anchor.device(),
              op, ": normalizer must be one floating value on ", anchor.device(), ", got ", normalizer.sizes(), " ",
              normalizer.scalar_type(), " on ", normalizer.device());
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), op, ": temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(n_data >= 1, op, ": n_data must be >= 1, got ", n_data);
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  CrdCall c;
  c.b = anchor.size(0);
  c.d = anchor.size(1);
  c.k1 = index.size(1);
  c.n_bank = memory.size(0);
  TORCH_CHECK(c.n_bank >= 1 || c.b == 0, op, ": memory has no rows to index");
  TORCH_CHECK(c.k1 > 1 || eps > 0.0, op, ": without negatives (index of one column) eps must be > 0");
  c.anchor = anchor.contiguous();
  c.memory = memory.contiguous();
  c.index = index.contiguous();
  c.acc = at::toOpMathType(anchor.scalar_type());
  c.normalizer = normalizer.reshape({}).to(c.acc);
  auto opts = anchor.options().dtype(c.acc);
  c.loss = at::empty({c.b}, opts);
  c.z_out = at::empty({}, opts);
  c.grad = anchor_grad ? at::empty({c.b, c.d}, opts) : at::empty({0}, opts);
  return c;
}

}  // namespace contrastive
}  // namespace kdops
