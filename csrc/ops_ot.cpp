// Schemas of the optimal-transport ops.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(kdops, m) {
  // Log-domain Sinkhorn between point clouds x (B, n, d) and y (B, m, d) with log weights (B, n), (B, m) and
  // cost |x - y|^p / p: all iterations in one call. Returns the dual potentials f (B, n), g (B, m) and the
  // iterations run per problem (B,) (int64, on the CPU). scaling in (0, 1) anneals eps from the cost bound
  // (0: off); tol > 0 stops when f changes by less than tol over one iteration, checked every check_every
  // iterations. online: the cost is recomputed per tile of `tile` rows, never stored.
  m.def(
      "sinkhorn_solve(Tensor x, Tensor y, Tensor loga, Tensor logb, float eps, float p, int max_iter, float tol, "
      "float scaling, int check_every, bool online, int tile) -> (Tensor, Tensor, Tensor)");
  // Test only: sinkhorn_solve with the CUDA row kernel's block algorithm (strided per-thread passes, CUB-order
  // reductions) run on the host by `threads` virtual threads.
  m.def(
      "_sinkhorn_solve_emulate_device(Tensor x, Tensor y, Tensor loga, Tensor logb, float eps, float p, "
      "int max_iter, float tol, float scaling, int check_every, bool online, int tile, int threads) "
      "-> (Tensor, Tensor, Tensor)");
}
