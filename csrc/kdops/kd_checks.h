// Host-side argument checks and parsing shared by the CPU and CUDA entry points of the KD ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <ATen/OpMathType.h>

#include <string_view>
#include <type_traits>
#include <utility>

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

}  // namespace kd
}  // namespace kdops
