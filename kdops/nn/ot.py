"""nn.Module form of the Sinkhorn loss."""

from torch import nn

from kdops.functional.ot import sinkhorn


class SinkhornLoss(nn.Module):
    """``kdops.functional.sinkhorn(x, y, eps=..., ...)`` as a module: the entropic OT (or, with
    ``value="transport"``, the entropic plan's transport cost) between a student cloud x and a teacher cloud y.
    Keyword arguments are those of :func:`kdops.functional.sinkhorn`."""

    def __init__(self, eps=0.05, p=2, max_iter=100, tol=1e-6, scaling=None, debias=False, value="entropic",
                 backend="auto"):
        super().__init__()
        self.kw = dict(eps=eps, p=p, max_iter=max_iter, tol=tol, scaling=scaling, debias=debias, value=value,
                       backend=backend)

    def forward(self, x, y, a=None, b=None):
        return sinkhorn(x, y, a, b, **self.kw)
