"""Pure-PyTorch / POT references of the distribution-matching losses (kdops.functional.distribution): the definitions
the tests and benchmarks compare against, written for clarity (kernel matrices materialised, full plans)."""

import numpy as np
import torch

from kdops._ops._common import import_pot

__all__ = ["wasserstein_exact", "gaussian_wasserstein", "gaussian_kl", "mmd", "class_conditional_wasserstein",
           "joint_wasserstein"]


def _sq_dists(x, y):
    return ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T).clamp_min(0.0)


def wasserstein_exact(x, y):
    """<P, C> with the exact plan of ot.emd (held fixed) and C_ij = |x_i - y_j|^2."""
    cost = _sq_dists(x, y)
    c = cost.detach().double().cpu().numpy()
    plan = import_pot().emd(np.full(c.shape[0], 1.0 / c.shape[0]), np.full(c.shape[1], 1.0 / c.shape[1]), c)
    return (torch.as_tensor(plan, dtype=cost.dtype, device=cost.device) * cost).sum()


def gaussian_wasserstein(x, y, diagonal=False):
    mx, my = x.mean(0), y.mean(0)
    if diagonal:
        return (mx - my).square().sum() + (x.std(0, correction=0) - y.std(0, correction=0)).square().sum()
    xc, yc = x - mx, y - my
    sx, sy = xc.T @ xc / x.shape[0], yc.T @ yc / y.shape[0]

    def sqrtm(a):
        lam, u = torch.linalg.eigh(a)
        return (u * lam.clamp_min(0).sqrt()) @ u.T

    root = sqrtm(sx)
    cross = torch.trace(sqrtm(root @ sy @ root))
    return (mx - my).square().sum() + torch.trace(sx) + torch.trace(sy) - 2.0 * cross


def gaussian_kl(x, y, diagonal=True, eps=1e-6):
    mx, my = x.mean(0), y.mean(0)
    if diagonal:
        sx = x.std(0, correction=0).clamp_min(eps)
        sy = y.std(0, correction=0).clamp_min(eps)
        return (torch.log(sy / sx) + (sx ** 2 + (mx - my) ** 2) / (2 * sy ** 2) - 0.5).sum()
    xc, yc = x - mx, y - my
    cx, cy = xc.T @ xc / x.shape[0], yc.T @ yc / y.shape[0]
    inv_y = torch.linalg.inv(cy)
    delta = my - mx
    return 0.5 * (torch.trace(inv_y @ cx) + delta @ inv_y @ delta - x.shape[1] + torch.logdet(cy) - torch.logdet(cx))


def mmd(x, y, kernel="rbf", bandwidth=None, gamma=None, coef0=1.0, degree=3):
    """Biased MMD^2 from the three kernel matrices; rbf bandwidth = mean pairwise distance of [x; y] over
    i != j, without gradient."""
    if kernel == "rbf":
        if bandwidth is None:
            with torch.no_grad():
                z = torch.cat([x, y])
                n = z.shape[0]
                sigma = _sq_dists(z, z).fill_diagonal_(0).sqrt().sum() / (n * n - n)
        else:
            sigma = torch.tensor(float(bandwidth), dtype=x.dtype, device=x.device)
        inv = torch.where(sigma > 0, 1.0 / (2.0 * sigma * sigma), torch.zeros_like(sigma))

        def k(a, b):
            return torch.exp(-_sq_dists(a, b) * inv)
    elif kernel == "poly":
        g = 1.0 / x.shape[1] if gamma is None else gamma

        def k(a, b):
            return (g * (a @ b.T) + coef0) ** degree
    else:
        def k(a, b):
            return a @ b.T
    return k(x, x).mean() + k(y, y).mean() - 2.0 * k(x, y).mean()


def class_conditional_wasserstein(x, y, labels, metric="exact", **kw):
    fn = {"exact": wasserstein_exact, "gaussian": gaussian_wasserstein}[metric]
    total = 0.0
    for c in torch.unique(labels).tolist():
        m = labels == c
        total = total + fn(x[m], y[m], **kw)
    return total


def joint_wasserstein(x, y, logits_x, logits_y, beta=1.0):
    feature_cost = _sq_dists(x, y)
    label_cost = _sq_dists(torch.softmax(logits_x, 1), torch.softmax(logits_y, 1))
    cost = feature_cost / feature_cost.detach().max() + beta * label_cost
    c = cost.detach().double().cpu().numpy()
    plan = import_pot().emd(np.full(c.shape[0], 1.0 / c.shape[0]), np.full(c.shape[1], 1.0 / c.shape[1]), c)
    return (torch.as_tensor(plan, dtype=cost.dtype, device=cost.device) * cost).sum()
