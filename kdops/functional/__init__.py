"""kdops losses, functional form: one module per family, every public function re-exported here.

| family | module | losses |
|---|---|---|
| ``kd`` | :mod:`kdops.functional.kd` | ``kd_loss``, ``reverse_kd_loss``, ``jsd_loss``, ``dkd_loss``, ``mutual_kd_loss`` |
| ``feature`` | :mod:`kdops.functional.feature` | ``margin_relu``, ``partial_l2_loss``, ``hint_loss``, ``logsum_loss`` |
| ``relational`` | :mod:`kdops.functional.relational` | FKD, SP, RKD, PKT, CC, AT, NST, FSP and the Gram primitives |
| ``distribution`` | :mod:`kdops.functional.distribution` | exact / Gaussian W2, Gaussian KL, MMD, class-conditional, joint |
| ``ot`` | :mod:`kdops.functional.ot` | ``sinkhorn`` |
| ``contrastive`` | :mod:`kdops.functional.contrastive` | ``crd_nce_loss`` (CRD) |
| ``lm`` | :mod:`kdops.functional.lm` | ``fused_linear_kd_loss``, ``topk_kd_loss`` (lm_head fused with the divergence) |

Student first, teacher second, everywhere. Each module's docstring gives its family's conventions (rows,
reductions, dtypes); each function's docstring its formula.
"""

from kdops.functional.contrastive import CRD_REDUCTIONS, crd_nce_loss  # noqa: F401
from kdops.functional.distribution import (  # noqa: F401
    class_conditional_wasserstein, gaussian_kl, gaussian_wasserstein, joint_wasserstein, mmd, wasserstein_exact)
from kdops.functional.feature import FEATURE_REDUCTIONS, hint_loss, logsum_loss, margin_relu, partial_l2_loss  # noqa: F401
from kdops.functional.kd import REDUCTIONS, dkd_loss, jsd_loss, kd_loss, mutual_kd_loss, reverse_kd_loss  # noqa: F401
from kdops.functional.lm import LM_DIVERGENCES, LM_REDUCTIONS, TOPK_TAILS, fused_linear_kd_loss, topk_kd_loss  # noqa: F401
from kdops.functional.ot import sinkhorn  # noqa: F401
from kdops.functional.relational import (  # noqa: F401
    angle_tensor, at_loss, cc_loss, fkd_loss, fsp_loss, fsp_matrix, gram, nst_loss, pairwise_distance, pkt_loss,
    rkd_angle_loss, rkd_distance_loss, rkd_loss, sp_loss)
