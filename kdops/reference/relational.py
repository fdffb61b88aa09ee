"""Pure-PyTorch references of the relational losses, written the way the published implementations compute them
(broadcast differences, b x b kernels, b.C.C'.HW products), with their conventions (see METHODS.md)."""

import math

import torch
import torch.nn.functional as F


def _flat(x):
    return x.reshape(x.shape[0], -1)


def gram(x, kernel="linear"):
    if kernel == "cosine":
        x = F.normalize(x, dim=-1)
    return x @ x.transpose(-1, -2)


def pairwise_distance(x, squared=False):
    sq = (x.unsqueeze(-2) - x.unsqueeze(-3)).pow(2).sum(-1)
    out = sq if squared else sq.clamp_min(1e-12).sqrt()
    eye = torch.eye(x.shape[-2], dtype=torch.bool, device=x.device)
    return out.masked_fill(eye, 0.0)


def _unit_differences(x):
    """F.normalize(x_j - x_a) over all pairs (a, j), as the published code computes it, except that the norm of
    the zero vectors x_a - x_a is taken as 1. The values are the same (those vectors stay 0); the published form's
    gradient through them, (1 / eps) times a difference that is identically 0, cancels only to about 1e-4 absolute
    even in float64, which this form avoids. Coincident distinct points still meet F.normalize's eps clamp."""
    td = x.unsqueeze(-3) - x.unsqueeze(-2)  # td[..., a, j] = x_j - x_a
    eye = torch.eye(x.shape[-2], dtype=torch.bool, device=x.device).unsqueeze(-1)
    norm = torch.where(eye, torch.ones_like(td), td).norm(dim=-1, keepdim=True)
    return td / norm.clamp_min(1e-12)


def angle_tensor(x):
    n = _unit_differences(x)
    return n @ n.transpose(-1, -2)


def fkd_loss(student_feats, teacher_feats, kernel="correlation", fr_weight=0.0, fr_power=2,
             gather_distributed=False):
    teachers = list(teacher_feats) if isinstance(teacher_feats, (list, tuple)) else [teacher_feats]
    hs = _flat(student_feats)
    k = "cosine" if kernel == "correlation" else "linear"
    rho_s = gram(hs, k)
    rho_t = sum(gram(_flat(t), k) for t in teachers) / len(teachers)
    b = hs.shape[0]
    off = ~torch.eye(b, dtype=torch.bool, device=hs.device)
    loss = (rho_s - rho_t)[off].pow(2).sum() / (b * (b - 1))
    return loss + fr_weight * hs.norm(dim=1).pow(fr_power).mean()


def sp_loss(student, teacher, gather_distributed=False):
    fs, ft = _flat(student), _flat(teacher)
    gs = F.normalize(fs @ fs.t())
    gt = F.normalize(ft @ ft.t())
    return (gs - gt).pow(2).sum() / (fs.shape[0] ** 2)


def _pdist(e, eps=1e-12):
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps).sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def rkd_distance_loss(student, teacher, gather_distributed=False):
    s, t = _flat(student), _flat(teacher)
    td = _pdist(t)
    td = td / td[td > 0].mean()
    d = _pdist(s)
    d = d / d[d > 0].mean()  # the student's mean is not detached
    return F.smooth_l1_loss(d, td)


def rkd_angle_loss(student, teacher, gather_distributed=False):
    s, t = _flat(student), _flat(teacher)
    nt, ns = _unit_differences(t), _unit_differences(s)  # the published F.normalize(td), see _unit_differences
    t_angle = torch.bmm(nt, nt.transpose(1, 2)).view(-1)
    s_angle = torch.bmm(ns, ns.transpose(1, 2)).view(-1)
    return F.smooth_l1_loss(s_angle, t_angle)


def rkd_loss(student, teacher, distance_weight=25.0, angle_weight=50.0, gather_distributed=False):
    return distance_weight * rkd_distance_loss(student, teacher) + angle_weight * rkd_angle_loss(student, teacher)


def pkt_loss(student, teacher, eps=1e-7, gather_distributed=False):
    s, t = _flat(student), _flat(teacher)
    s = s / (s.norm(dim=1, keepdim=True) + eps)
    t = t / (t.norm(dim=1, keepdim=True) + eps)
    ps = (s @ s.t() + 1.0) / 2.0
    pt = (t @ t.t() + 1.0) / 2.0
    ps = ps / ps.sum(dim=1, keepdim=True)
    pt = pt / pt.sum(dim=1, keepdim=True)
    return torch.mean(pt * torch.log((pt + eps) / (ps + eps)))


def cc_loss(student, teacher, gamma=0.4, order=2, gather_distributed=False):
    def corr(e):
        sim = e @ e.t()
        out = torch.zeros_like(sim)
        for p in range(order + 1):
            out = out + math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim.pow(p)
        return out

    s, t = _flat(student), _flat(teacher)
    return torch.norm(corr(s) - corr(t)) / (s.shape[0] ** 2)


def at_loss(student, teacher, p=2, mode="code"):
    def attention(f):
        e = f.abs().pow(p)
        e = e.mean(1) if mode == "code" else e.sum(1)
        return F.normalize(e.view(f.size(0), -1))

    d = attention(student) - attention(teacher)
    return d.pow(2).mean() if mode == "code" else d.norm(dim=1).sum() / student.shape[0]


def nst_loss(student, teacher):
    b = student.shape[0]
    s = F.normalize(student.reshape(b, student.shape[1], -1), dim=2)
    t = F.normalize(teacher.reshape(b, teacher.shape[1], -1), dim=2)

    def poly(x, y):  # the published form: a (b, C, C', HW) broadcast, then the sum over HW
        return (x.unsqueeze(2) * y.unsqueeze(1)).sum(-1).pow(2)

    return (poly(t, t).mean((1, 2)) + poly(s, s).mean((1, 2)) - 2 * poly(s, t).mean((1, 2))).mean()


def fsp_matrix(first, second):
    b, c1, c2 = first.shape[0], first.shape[1], second.shape[1]
    a = first.reshape(b, c1, 1, -1)
    c = second.reshape(b, 1, c2, -1)
    return (a * c).mean(-1)  # the broadcast (b, C1, C2, HW) product


def fsp_loss(student_pairs, teacher_pairs):
    return sum((fsp_matrix(*s) - fsp_matrix(*t)).pow(2).mean() for s, t in zip(student_pairs, teacher_pairs))
