// Schemas of the distribution-matching ops (KD2M's metric family). Only MMD is a fused kernel: the exact,
// Gaussian and class-conditional losses are compositions of ATen ops and POT (kdops/distribution.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdops, m) {
  // Biased (V-statistic) MMD^2 between point clouds x (n, d) and y (m, d):
  // mean k(x, x') + mean k(y, y') - 2 mean k(x, y). kernel: linear | rbf | poly.
  // rbf: exp(-|x - y|^2 / (2 sigma^2)) with sigma = bandwidth, or when bandwidth <= 0 the mean distance over
  // all pairs i != j of the pooled cloud [x; y]. poly: (gamma <x, y> + coef0)^degree.
  // Returns (loss, sigma), both 0-dim in the accumulation dtype; sigma is 0 for the other kernels.
  m.def(
      "mmd(Tensor x, Tensor y, str kernel, float gamma, float coef0, int degree, float bandwidth) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Gradients of grad * mmd with the bandwidth sigma held fixed (as returned by the forward).
  m.def(
      "mmd_backward(Tensor grad, Tensor x, Tensor y, Tensor sigma, str kernel, float gamma, float coef0, int degree, "
      "bool x_grad, bool y_grad) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}
