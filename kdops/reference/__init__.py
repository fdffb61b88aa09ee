"""Pure-PyTorch reference losses: the definitions the kdops ops are tested and benchmarked against, one
module per family (the same names and signatures as :mod:`kdops.functional`), every function re-exported here.
No fusion, no tricks: each is written the way the published code computes it.
"""

from kdops.reference.contrastive import crd_nce_loss  # noqa: F401
from kdops.reference.distribution import (  # noqa: F401
    class_conditional_wasserstein, gaussian_kl, gaussian_wasserstein, joint_wasserstein, mmd, wasserstein_exact)
from kdops.reference.feature import hint_loss, logsum_loss, margin_relu, partial_l2_loss  # noqa: F401
from kdops.reference.kd import dkd_loss, jsd_loss, kd_loss, mutual_kd_loss, reverse_kd_loss  # noqa: F401
from kdops.reference.lm import fused_linear_kd_loss, topk_kd_loss  # noqa: F401
from kdops.reference.ot import sinkhorn  # noqa: F401
from kdops.reference.relational import (  # noqa: F401
    angle_tensor, at_loss, cc_loss, fkd_loss, fsp_loss, fsp_matrix, gram, nst_loss, pairwise_distance, pkt_loss,
    rkd_angle_loss, rkd_distance_loss, rkd_loss, sp_loss)
