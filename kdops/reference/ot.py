"""Pure-PyTorch reference of the Sinkhorn loss: the textbook log-domain loop, differentiated by autograd."""

import torch


def sinkhorn(x, y, a=None, b=None, eps=0.05, p=2, max_iter=100, value="entropic"):
    """Log-domain Sinkhorn between clouds x (n, d) and y (m, d), cost |x - y|^p / p, the textbook loop:
    alternating f / g log-sum-exp updates, then the dual value <a, f> + <b, g> ("entropic") or the plan's
    transport cost <P, C> ("transport"). Gradients come from autograd through the iterations. Distances are
    taken from the differences (torch.cdist's Gram-matrix path would lose them at nearly coincident points)."""
    n, m = x.shape[0], y.shape[0]
    a = torch.full((n,), 1.0 / n, dtype=x.dtype, device=x.device) if a is None else a
    b = torch.full((m,), 1.0 / m, dtype=x.dtype, device=x.device) if b is None else b
    c = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").pow(p) / p
    loga, logb = a.log(), b.log()
    f, g = torch.zeros_like(a), torch.zeros_like(b)
    for _ in range(max_iter):
        f = -eps * torch.logsumexp(logb[None, :] + (g[None, :] - c) / eps, dim=1)
        g = -eps * torch.logsumexp(loga[:, None] + (f[:, None] - c) / eps, dim=0)
    if value == "entropic":
        return (a * f).sum() + (b * g).sum()
    plan = torch.exp(loga[:, None] + logb[None, :] + (f[:, None] + g[None, :] - c) / eps)
    return (plan * c).sum()
