// Schema of the contrastive family's op (CRD's NCE loss). Kernels register per device in csrc/cpu and
// csrc/cuda; autograd and fake (meta) kernels are registered from Python (kdops/_ops/contrastive.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdops, m) {
  // CRD's NCE loss per anchor row, scored against the memory rows named by `index` (b, k + 1; column 0 the
  // positive) without gathering them: x_ij = <memory[index_ij], anchor_i> / temperature, P = exp(x) / Z,
  // row loss -log(P_i0 / (P_i0 + c + eps)) - sum_{j >= 1} log(c / (P_ij + c + eps)), c = k / n_data.
  // `normalizer` holds Z; a value <= 0 means "not set": Z = mean(exp(x)) * n_data of this batch.
  // Returns (row losses (b,), the Z used (), d(row loss)/d(anchor) (b, d), or (0,) without anchor_grad), all in
  // the accumulation dtype. The memory gets no gradient (its rows are a fixed target, as published).
  m.def(
      "crd_nce(Tensor anchor, Tensor memory, Tensor index, Tensor normalizer, float temperature, int n_data, "
      "float eps, bool anchor_grad) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}
