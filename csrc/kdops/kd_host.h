// Host-side glue shared by the CPU and CUDA entry points of the KD ops: argument checks, parsing,
// output allocation and the compile-time dispatch of divergence and gradient flags.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <string_view>
#include <tuple>
#include <vector>
#include <type_traits>
#include <utility>

#include "kdops/host_common.h"
#include "kdops/kd_math.h"

namespace kdops {
namespace kd {

inline Divergence parse_divergence(std::string_view name) {
  if (name == "kl") return Divergence::KL;
  if (name == "reverse_kl") return Divergence::ReverseKL;
  if (name == "jsd") return Divergence::JSD;
  if (name == "dkd") return Divergence::DKD;
  TORCH_CHECK(false, "kdops.kd_div: divergence must be one of 'kl', 'reverse_kl', 'jsd', 'dkd', got '", name, "'");
}

// Validates the forward arguments; returns the number of classes C (last dim).
inline int64_t check_forward(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                             double temperature, Divergence div, double alpha, double beta) {
  TORCH_CHECK(student.dim() >= 1, "kdops.kd_div: student must have at least 1 dimension (..., C), got a scalar");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "kdops.kd_div: student and teacher must have the same shape, got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "kdops.kd_div: student and teacher must have the same dtype, got ",
              student.scalar_type(), " and ", teacher.scalar_type());
  TORCH_CHECK(at::isFloatingType(student.scalar_type()), "kdops.kd_div: student must be a floating tensor, got ",
              student.scalar_type());
  TORCH_CHECK(student.device() == teacher.device(), "kdops.kd_div: student and teacher must be on the same device, got ",
              student.device(), " and ", teacher.device());
  TORCH_CHECK(temperature > 0.0, "kdops.kd_div: temperature must be > 0, got ", temperature);
  if (div == Divergence::JSD) {
    TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "kdops.kd_div: beta must be in [0, 1] for jsd, got ", beta);
  }
  if (div == Divergence::DKD) {
    TORCH_CHECK(target.has_value(), "kdops.kd_div: dkd needs a target tensor");
  }
  if (target.has_value()) {
    const at::Tensor& y = *target;
    TORCH_CHECK(y.scalar_type() == at::kLong, "kdops.kd_div: target must be int64, got ", y.scalar_type());
    TORCH_CHECK(y.sizes() == student.sizes().slice(0, student.dim() - 1),
                "kdops.kd_div: target must have the shape of student without its last dim ",
                student.sizes().slice(0, student.dim() - 1), ", got ", y.sizes());
    TORCH_CHECK(y.device() == student.device(), "kdops.kd_div: target must be on the device of student (",
                student.device(), "), got ", y.device());
  }
  (void)alpha;
  return student.size(-1);
}

// (w1, w2) as the kernels take them: jsd (beta, 1 - beta), dkd (alpha, beta), otherwise unused.
inline std::pair<double, double> divergence_weights(Divergence div, double alpha, double beta) {
  if (div == Divergence::JSD) return {beta, 1.0 - beta};
  if (div == Divergence::DKD) return {alpha, beta};
  return {0.0, 0.0};
}

inline void check_backward(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& stats) {
  const auto rows = student.sizes().slice(0, student.dim() - 1);
  TORCH_CHECK(grad.sizes() == rows, "kdops.kd_div_backward: grad must have shape ", rows, ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == student.scalar_type(), "kdops.kd_div_backward: grad must have dtype ",
              student.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK(stats.dim() == student.dim() && stats.sizes().slice(0, stats.dim() - 1) == rows &&
                  stats.size(-1) == kNumStats,
              "kdops.kd_div_backward: stats must have shape ", rows, " + (", kNumStats, ",), got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == at::toOpMathType(student.scalar_type()),
              "kdops.kd_div_backward: stats must have dtype ", at::toOpMathType(student.scalar_type()), ", got ",
              stats.scalar_type());
  TORCH_CHECK(grad.device() == student.device() && stats.device() == student.device(),
              "kdops.kd_div_backward: grad and stats must be on the device of student");
}

// Calls fn(std::integral_constant<Divergence, d>) so kernels are specialised per divergence.
template <typename F>
void dispatch_divergence(Divergence d, F&& fn) {
  switch (d) {
    case Divergence::KL: return fn(std::integral_constant<Divergence, Divergence::KL>{});
    case Divergence::ReverseKL: return fn(std::integral_constant<Divergence, Divergence::ReverseKL>{});
    case Divergence::JSD: return fn(std::integral_constant<Divergence, Divergence::JSD>{});
    case Divergence::DKD: return fn(std::integral_constant<Divergence, Divergence::DKD>{});
  }
}

// Checked, contiguous inputs of kd_div / kd_div_backward and their allocated outputs.
struct KdCall {
  Divergence div;
  int64_t C, N;    // classes, rows
  double w1, w2;   // see divergence_weights
  at::Tensor s, t;
  std::optional<at::Tensor> y;
  at::Tensor out0, out1;  // forward: (loss, stats); backward: (grad_s, grad_t), (0,)-shaped when not wanted

  const int64_t* target_ptr() const { return y ? y->const_data_ptr<int64_t>() : nullptr; }
};

inline KdCall prepare(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                      double temperature, std::string_view divergence, double alpha, double beta) {
  KdCall c;
  c.div = parse_divergence(divergence);
  c.C = check_forward(student, teacher, target, temperature, c.div, alpha, beta);
  std::tie(c.w1, c.w2) = divergence_weights(c.div, alpha, beta);
  c.s = student.contiguous();
  c.t = teacher.contiguous();
  if (target.has_value()) c.y = target->contiguous();
  c.N = c.C > 0 ? student.numel() / c.C : 0;
  return c;
}

inline KdCall prepare_forward(const at::Tensor& student, const at::Tensor& teacher,
                              const std::optional<at::Tensor>& target, double temperature,
                              std::string_view divergence, double alpha, double beta) {
  KdCall c = prepare(student, teacher, target, temperature, divergence, alpha, beta);
  const auto rows = student.sizes().slice(0, student.dim() - 1);
  c.out0 = at::empty(rows, student.options());
  std::vector<int64_t> stats_shape(rows.begin(), rows.end());
  stats_shape.push_back(kNumStats);
  c.out1 = at::empty(stats_shape, student.options().dtype(at::toOpMathType(student.scalar_type())));
  if (c.N == 0 || c.C == 0) {
    c.out0.zero_();
    c.out1.zero_();
  }
  return c;
}

inline KdCall prepare_backward(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                               const std::optional<at::Tensor>& target, const at::Tensor& stats, double temperature,
                               std::string_view divergence, double alpha, double beta, bool student_grad,
                               bool teacher_grad) {
  KdCall c = prepare(student, teacher, target, temperature, divergence, alpha, beta);
  check_backward(grad, student, stats);
  c.out0 = student_grad ? at::empty(student.sizes(), student.options()) : at::empty({0}, student.options());
  c.out1 = teacher_grad ? at::empty(teacher.sizes(), teacher.options()) : at::empty({0}, teacher.options());
  return c;
}

// The peers of mutual_kd / mutual_kd_backward: N >= 2 logits tensors (R, C) of one shape, dtype and device, made
// contiguous (no copy when they are), and the opmath dtype of their stats (N, R, 2).
struct MutualCall {
  std::vector<at::Tensor> peers;
  int64_t N, R, C;
  at::ScalarType dtype, acc;
};

inline MutualCall prepare_mutual(at::TensorList logits, double temperature, const char* op) {
  TORCH_CHECK(logits.size() >= 2, "kdops.", op, ": at least 2 peers are needed, got ", logits.size());
  const at::Tensor& first = logits[0];
  TORCH_CHECK(at::isFloatingType(first.scalar_type()), "kdops.", op, ": logits must be floating tensors, got ",
              first.scalar_type());
  TORCH_CHECK(first.dim() == 2, "kdops.", op, ": each peer's logits must be (rows, classes), got ", first.sizes());
  TORCH_CHECK(temperature > 0.0, "kdops.", op, ": temperature must be > 0, got ", temperature);
  MutualCall c;
  for (size_t j = 0; j < logits.size(); ++j) {
    const at::Tensor& z = logits[j];
    TORCH_CHECK(z.sizes() == first.sizes() && z.scalar_type() == first.scalar_type() &&
                    z.device() == first.device(),
                "kdops.", op, ": every peer's logits must match peer 0 (", first.sizes(), ", ", first.scalar_type(),
                ", ", first.device(), "), got ", z.sizes(), ", ", z.scalar_type(), ", ", z.device(), " at peer ", j);
    c.peers.push_back(z.contiguous());
  }
  c.N = static_cast<int64_t>(logits.size());
  c.R = first.size(0);
  c.C = first.size(1);
  c.dtype = first.scalar_type();
  c.acc = at::toOpMathType(c.dtype);
  return c;
}

inline void check_mutual_backward(const at::Tensor& grad, const MutualCall& c, const at::Tensor& stats) {
  const std::vector<int64_t> peer_rows{c.N, c.R};
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(peer_rows) && grad.scalar_type() == c.dtype,
              "kdops.mutual_kd_backward: grad must be ", at::IntArrayRef(peer_rows), " in ", c.dtype, ", got ",
              grad.sizes(), " in ", grad.scalar_type());
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == c.N && stats.size(1) == c.R &&
                  stats.size(2) == mutual::kMutualStats && stats.scalar_type() == c.acc,
              "kdops.mutual_kd_backward: stats must be (", c.N, ", ", c.R, ", ", mutual::kMutualStats, ") in ",
              c.acc, ", got ", stats.sizes(), " in ", stats.scalar_type());
  TORCH_CHECK(grad.device() == c.peers[0].device() && stats.device() == c.peers[0].device(),
              "kdops.mutual_kd_backward: grad and stats must be on the device of the logits");
}

// The gradients of the N peers, one tensor (R, C) each.
inline std::vector<at::Tensor> empty_peer_grads(const MutualCall& c) {
  std::vector<at::Tensor> out;
  for (int64_t j = 0; j < c.N; ++j) out.push_back(at::empty({c.R, c.C}, c.peers[0].options()));
  return out;
}

}  // namespace kd
}  // namespace kdops
