"""Drop-in ``nn.Module`` losses, one module per family (the same names as in :mod:`kdops.functional`), every
public class re-exported here. Modules that hold parameters (OFD's connectors, the FitNet regressor, the LogSum
projector) are trained with the student."""

from kdops.nn.contrastive import ClassNegativeSampler, CRDLoss  # noqa: F401
from kdops.nn.distribution import (  # noqa: F401
    ClassConditionalWassersteinLoss, GaussianKLLoss, GaussianWassersteinLoss, JointWassersteinLoss, MMDLoss,
    WassersteinLoss)
from kdops.nn.feature import (  # noqa: F401
    FeatureHooks, HintLoss, OFDLoss, ProjectorLogSumLoss, margins_from_batchnorm)
from kdops.nn.kd import DKDLoss, JSDLoss, KDLoss, MutualKDLoss, ReverseKDLoss  # noqa: F401
from kdops.nn.lm import FusedLinearKDLoss, TopKKDLoss  # noqa: F401
from kdops.nn.ot import SinkhornLoss  # noqa: F401
from kdops.nn.relational import ATLoss, CCLoss, FKDLoss, FSPLoss, NSTLoss, PKTLoss, RKDLoss, SPLoss  # noqa: F401
