// Schemas of the distribution-matching ops (KD2M's metric family). Only MMD is a fused kernel: the exact,
// Gaussian and class-conditional losses are compositions of ATen ops and POT (kdops/functional/distribution.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdops, m) {
  // Biased (V-statistic) MMD^2 between point clouds x (n, d) and y (m, d):
  // mean k(x, x') + mean k(y, y') - 2 mean k(x, y). kernel: linear | rbf | poly.
  // rbf: exp(-|x - y|^2 / (2 sigma^2)) with sigma = bandwidth, or when bandwidth <= 0 the mean distance over
  // all pairs i != j of the pooled cloud [x; y]. poly: (gamma <x, y> + coef0)^degree.
  // Returns (loss, sigma, weights): loss and sigma 0-dim in the accumulation dtype, sigma 0 for the other
  // kernels. save_weights (rbf, poly) is a bit set: 1 keeps the weight matrices of x's gradient, 2 those of
  // y's, so that the backward needs no Gram GEMMs; weights holds them flattened as [W_xy | W_xx | W_yy]
  // (n m, then n n with bit 1, then m m with bit 2). With 0 it is empty and the backward recomputes them.
  m.def(
      "mmd(Tensor x, Tensor y, str kernel, float gamma, float coef0, int degree, float bandwidth, int save_weights) "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Gradients of grad * mmd with the bandwidth sigma held fixed (as returned by the forward), from the
  // forward's weights when it kept them (saved_weights: the forward's save_weights).
  m.def(
      "mmd_backward(Tensor grad, Tensor x, Tensor y, Tensor sigma, Tensor weights, int saved_weights, str kernel, "
      "float gamma, float coef0, int degree, bool x_grad, bool y_grad) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}
