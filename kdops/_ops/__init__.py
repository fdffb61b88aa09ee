"""Fake (meta) kernels and autograd registrations of the kdops ops, one module per family. The kernels
themselves live in csrc/ (schemas in csrc/ops_<family>.cpp); importing this package registers them all."""

from kdops._ops import contrastive, distribution, feature, kd, lm, ot, relational  # noqa: F401
