"""Relation-based distillation losses (FKD, SP, RKD, PKT, CC) and feature-map relations (NST, AT, FSP).

Conventions follow ``METHODS.md`` ("Relation-based"); every loss takes the student first, gives gradients to the
student and, when it requires grad, to the teacher, and computes in fp32 for fp16 / bf16 inputs (fp64 for fp64).
The batch relations (FKD, SP, RKD, PKT, CC) accept ``gather_distributed=True``: under an initialised
torch.distributed process group the features of all ranks form the batch (all_gather, in rank order), so the
loss equals the single-process loss on the global batch. The gradient reaching a rank's local features is the
sum over ranks of each rank's (identical) loss, i.e. world_size times the single-process gradient; DDP's
averaging of parameter gradients then gives exactly the single-process parameter gradient.

Dtypes (:mod:`kdops.functional._dtypes`): any float inputs, of different dtypes too; features are upcast to fp32
(fp64 when an input is fp64) before the Gram GEMMs, so the Gram matrices are never rounded to 16 bits, and the
result is in that dtype. Under autocast every loss is computed as outside it.

What is fused: the RKD angle loss is one op (``kdops::rkd_angle``) over the Gram matrix, never forming the
(b, b, d) difference tensors or the b^3 angle tensor (O(b^2) memory). FKD switches to the d x d identity when
b > d; NST and FSP use batched GEMMs instead of the b·C·C'·HW broadcasts of the published code. The other
epilogues are a few elementwise ATen ops around the GEMM.
"""

import math
import numbers

import torch
import torch.nn.functional as F

from kdops.functional import _dtypes
from kdops.functional._checks import finite

_TINY = 1e-12


def _acc(x, dtype=None):
    """x in the dtype the relational losses compute in: `dtype`, or fp32 (fp64 for fp64)."""
    return x.to(dtype or _dtypes.acc_of(x))


def _check_tensor(name, arg, x, dims):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("%s: %s must be a floating-point tensor, got %s" % (name, arg, getattr(x, "dtype", type(x))))
    if x.dim() not in dims:
        raise ValueError("%s: %s must have %s dims, got shape %s"
                         % (name, arg, " or ".join(map(str, dims)), tuple(x.shape)))
    if x.numel() == 0:
        raise ValueError("%s: %s is empty (shape %s); every dimension must be at least 1"
                         % (name, arg, tuple(x.shape)))


def _check_batch(name, s, t, min_b=2):
    if s.shape[0] != t.shape[0]:
        raise ValueError("%s: student and teacher must have the same batch size, got %d and %d"
                         % (name, s.shape[0], t.shape[0]))
    if s.shape[0] < min_b:
        raise ValueError("%s: a relational loss needs a batch of at least %d samples, got %d"
                         % (name, min_b, s.shape[0]))
    if s.device != t.device:
        raise ValueError("%s: student and teacher must be on the same device, got %s and %s"
                         % (name, s.device, t.device))


def _flat(name, arg, x, dtype=None):
    _check_tensor(name, arg, x, (2, 3, 4, 5))
    return _acc(x.reshape(x.shape[0], -1), dtype)


def _gather(x):
    """All ranks' rows of x, in rank order, with gradient to every part (see the module docstring)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x.contiguous()), 0)


def _pair(name, student, teacher, gather_distributed):
    _check_tensor(name, "student", student, (2, 3, 4, 5))
    _check_tensor(name, "teacher", teacher, (2, 3, 4, 5))
    acc = _dtypes.acc_of(student, teacher)
    s, t = _flat(name, "student", student, acc), _flat(name, "teacher", teacher, acc)
    _check_batch(name, s, t)
    if gather_distributed:
        s, t = _gather(s), _gather(t)
    return s, t


def _gram_product(x):
    """x x^T. A large 2-D x (n >= 256 rows, n d >= 2^18) is done as three block products written in place, the
    symmetric half as BLAS's syrk does: 3/4 of the GEMM work (benchmarks/bench_relational.py: SP at 256 x 2048
    3.77 -> 3.33 ms; smaller products were slower in blocks, hence the bounds). Eager only: torch.compile gets
    the plain GEMM.

    The result is made exactly symmetric ((G + G^T) / 2): a GEMM rounds G_ij and G_ji in different blocks, and
    for coincident rows that asymmetry decided the result (RKD's normalised distances of two equal rows came out
    as 1e-6 one way and 1.6e-2 the other, a loss of 0.25 where the published code gives 0)."""
    n, d = x.shape[-2], x.shape[-1]
    if x.dim() != 2 or n < 256 or n * d < 2 ** 18 or torch.compiler.is_compiling():
        g = x @ x.transpose(-1, -2)
        return (g + g.transpose(-1, -2)) * 0.5
    h = n // 2
    a, b = x[:h], x[h:]
    out = x.new_empty(n, n)
    torch.mm(a, a.T, out=out[:h, :h])
    torch.mm(a, b.T, out=out[:h, h:])
    torch.mm(b, b.T, out=out[h:, h:])
    for blk in (out[:h, :h], out[h:, h:]):  # the diagonal blocks; the off-diagonal one is mirrored below
        blk.copy_((blk + blk.T) * 0.5)
    out[h:, :h] = out[:h, h:].T
    return out


class _SymGram(torch.autograd.Function):
    """x x^T whose backward is one GEMM, (dG + dG^T) x, instead of autograd's two (one per operand)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _gram_product(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return (grad + grad.transpose(-1, -2)) @ x


def _self_gram(x):
    return _SymGram.apply(x) if x.requires_grad else _gram_product(x)


def _gram_float64(x):
    """The Gram matrix the angle ops read, in float64 whatever x's dtype. An angle's cosine comes from the
    differences G_jj + G_aa - 2 G_aj, which cancel for close points: in fp32 the Gram identity resolves distances
    only to ~1e-3 of the norms (cosines were off by 1e-3 for randn points 1e-2 apart), in float64 to ~1e-7. The
    angle ops' b^3 work dwarfs the extra cost of the b x d x b product in float64."""
    return _self_gram(x if x.dtype == torch.float64 else x.double())


# ---- primitives ----

_COSINE, _DISTANCE, _SQUARED_DISTANCE = 0, 1, 2  # kinds of kdops::gram_transform


@_dtypes.loss
def gram(x, kernel="linear"):
    """Gram matrix of the rows of x (n, d) -> (n, n), batched (B, n, d) -> (B, n, n): ``linear`` x x^T, ``cosine``
    U U^T with U = x / max(|x|, 1e-12) (unit diagonal; a zero row gives a zero row and column). The cosine
    kernel is one fused op over x x^T (the norms are its diagonal), so no normalised copy of x is made."""
    _check_tensor("gram", "x", x, (2, 3))
    if kernel not in ("linear", "cosine"):
        raise ValueError("gram: kernel must be 'linear' or 'cosine', got %r" % (kernel,))
    g = _self_gram(_acc(x))
    return torch.ops.kdops.gram_transform(g, _COSINE) if kernel == "cosine" else g


@_dtypes.loss
def pairwise_distance(x, squared=False):
    """Euclidean distances between the rows of x (n, d) -> (n, n) (batched (B, n, d) too), from the Gram matrix:
    sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 1e-12)) with the diagonal exactly 0 (RKD's pdist); ``squared``
    gives max(., 0) instead of the root. One fused op over x x^T, forward and backward. The Gram matrix is formed
    in float64 (as for the angles, see _gram_float64: in fp32 the identity resolves distances only to ~1e-3 of the
    norms); the result is fp32 (fp64 for fp64 x). RKD's distance loss keeps its published fp32 form."""
    _check_tensor("pairwise_distance", "x", x, (2, 3))
    d = torch.ops.kdops.gram_transform(_gram_float64(x), _SQUARED_DISTANCE if squared else _DISTANCE)
    return d if x.dtype == torch.float64 else d.float()


def _gram_distances(x):
    """RKD's pdist as published: from the Gram matrix in x's (accumulation) dtype."""
    return torch.ops.kdops.gram_transform(_self_gram(x), _DISTANCE)


@_dtypes.loss
def angle_tensor(x):
    """psi[a, j, k] = <n_aj, n_ak>, n_aj = normalize(x_j - x_a) (0 for a zero vector), for x (n, d) -> (n, n, n)
    or batched (B, n, d) -> (B, n, n, n): one fused op over the Gram matrix (no (n, n, d) differences, the
    output written once; the backward folds the b^3 incoming gradient back to dL/dG). The Gram matrix is
    formed in float64 (see _gram_float64); pairs closer than it can resolve (16 ulp of the squared norms, ~1e-7 of
    the norms) count as degenerate. The result is fp32 (fp64 for fp64 x)."""
    _check_tensor("angle_tensor", "x", x, (2, 3))
    psi = torch.ops.kdops.angle_tensor_gram(_gram_float64(x))
    return psi if x.dtype == torch.float64 else psi.float()


# ---- batch relations ----

def _unit(h, kernel):
    return F.normalize(h, dim=1, eps=_TINY) if kernel == "correlation" else h


@_dtypes.loss
def fkd_loss(student_feats, teacher_feats, kernel="correlation", fr_weight=0.0, fr_power=2,
             gather_distributed=False):
    """Feature Kernel Distillation (He & Ozay): sum over i != j of (rho_s,ij - rho_t,ij)^2 / (b (b - 1)), rho the
    cosine ("correlation", default) or ``linear`` feature kernel, plus ``fr_weight`` * mean_i |h_s,i|^fr_power.

    ``teacher_feats`` is a tensor or a list of tensors (an ensemble: rho_t is the mean of the teachers' kernels);
    widths may differ from the student's and from each other, so teachers from another dataset work as long as
    the batch is the same. When b exceeds every width the d x d identity
    |A A^T - B B^T|^2 = |A^T A|^2 - 2 |A^T B|^2 + |B^T B|^2 is used (O(b d^2)), else one fused op over the
    student's b x b Gram matrix and the teacher kernel."""
    name = "fkd_loss"
    if kernel not in ("correlation", "linear"):
        raise ValueError("%s: kernel must be 'correlation' or 'linear', got %r" % (name, kernel))
    if fr_power not in (1, 2):
        raise ValueError("%s: fr_power must be 1 or 2, got %r" % (name, fr_power))
    if isinstance(fr_weight, bool) or not isinstance(fr_weight, numbers.Real) or not finite(fr_weight) \
            or fr_weight < 0:
        raise ValueError("%s: fr_weight must be a finite number >= 0, got %r" % (name, fr_weight))
    teachers = list(teacher_feats) if isinstance(teacher_feats, (list, tuple)) else [teacher_feats]
    if not teachers:
        raise ValueError("%s: teacher_feats is an empty list" % name)
    args = [("student_feats", student_feats)] + [("teacher_feats[%d]" % i if len(teachers) > 1 else "teacher_feats", t)
                                                 for i, t in enumerate(teachers)]
    for arg, x in args:
        _check_tensor(name, arg, x, (2, 3, 4, 5))
    acc = _dtypes.acc_of(student_feats, *teachers)
    hs = _flat(name, "student_feats", student_feats, acc)
    hts = []
    for arg, t in args[1:]:
        ht = _flat(name, arg, t, acc)
        _check_batch(name, hs, ht)
        hts.append(ht)
    if gather_distributed:
        hs, hts = _gather(hs), [_gather(h) for h in hts]
    b, m = hs.shape[0], len(hts)
    uts = [_unit(h, kernel) for h in hts]
    if b <= max(u.shape[1] for u in [hs] + uts):
        # one fused op over the student's raw Gram matrix: its normalisation, the difference with the teacher
        # kernel off the diagonal and the feature regularisation, no b x b temporaries
        k_t = _self_gram(uts[0]) if m == 1 else sum(_self_gram(u) for u in uts) / m
        return torch.ops.kdops.fkd_gram(_self_gram(hs), k_t, kernel == "correlation", float(fr_weight),
                                        int(fr_power))
    us = _unit(hs, kernel)
    diag_s = (us * us).sum(1)
    diag_t = sum((u * u).sum(1) for u in uts) / m
    full = _self_gram(us.T).pow(2).sum()
    full = full - 2.0 / m * sum((us.T @ u).pow(2).sum() for u in uts)
    full = full + sum((a.T @ c).pow(2).sum() for a in uts for c in uts) / (m * m)
    loss = (full - (diag_s - diag_t).pow(2).sum()) / (b * (b - 1))
    if fr_weight:
        loss = loss + fr_weight * hs.norm(dim=1).pow(fr_power).mean()
    return loss


@_dtypes.loss
def sp_loss(student, teacher, gather_distributed=False):
    """Similarity-preserving KD (Tung & Mori): |G~_s - G~_t|_F^2 / b^2 with G = F F^T row-L2-normalised
    (eps 1e-12), F the flattened feature (b, C*H*W). The normalisation, difference and sum (and their
    gradient) are one fused op over the Gram matrices."""
    s, t = _pair("sp_loss", student, teacher, gather_distributed)
    return torch.ops.kdops.sp_gram(_self_gram(s), _self_gram(t))


def _normalized_distances(x):
    d = _gram_distances(x)
    mean = d.sum() / (d > 0).sum().clamp_min(1)
    return d / mean


@_dtypes.loss
def rkd_distance_loss(student, teacher, gather_distributed=False):
    """RKD distance (Park et al.): smooth-L1 (beta 1) between the pairwise distances of student and teacher, each
    divided by the mean of its positive entries (the student's mean is not detached, as in the released code),
    averaged over all b^2 entries."""
    s, t = _pair("rkd_distance_loss", student, teacher, gather_distributed)
    return F.smooth_l1_loss(_normalized_distances(s), _normalized_distances(t), reduction="mean")


@_dtypes.loss
def rkd_angle_loss(student, teacher, gather_distributed=False):
    """RKD angle (Park et al.): smooth-L1 (beta 1) between the angle cosines psi[a, j, k] of student and teacher,
    averaged over all b^3 triplets; degenerate triplets (coincident points) are 0 on both sides. One fused op
    over the Gram matrices, formed in float64 (see _gram_float64): O(b^2) memory, O(b^3) scalar work. Points closer
    than the Gram identity can resolve (16 ulp of their squared norms, ~1e-7 relative distance) count as
    coincident. The result is fp32 (fp64 when an input is fp64)."""
    s, t = _pair("rkd_angle_loss", student, teacher, gather_distributed)
    loss = torch.ops.kdops.rkd_angle(_gram_float64(s), _gram_float64(t))
    return loss if s.dtype == torch.float64 else loss.float()


@_dtypes.loss
def rkd_loss(student, teacher, distance_weight=25.0, angle_weight=50.0, gather_distributed=False):
    """distance_weight * rkd_distance_loss + angle_weight * rkd_angle_loss (the CRD benchmark's 25 and 50)."""
    s, t = _pair("rkd_loss", student, teacher, gather_distributed)
    return distance_weight * rkd_distance_loss(s, t) + angle_weight * rkd_angle_loss(s, t)


@_dtypes.loss
def pkt_loss(student, teacher, eps=1e-7, gather_distributed=False):
    """Probabilistic knowledge transfer (Passalis & Tefas): x^ = x / (|x| + eps), S = x^ x^^T, P = ((S + 1) / 2)
    / rowsum, L = mean over all b^2 entries of P_t log((P_t + eps) / (P_s + eps)). One fused op over the raw
    Gram matrices X X^T (the row norms are their diagonal), so no normalised copy of the features is made."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0 <= eps < math.inf):
        raise ValueError("pkt_loss: eps must be a finite number >= 0, got %r" % (eps,))
    s, t = _pair("pkt_loss", student, teacher, gather_distributed)
    return torch.ops.kdops.pkt_gram(_self_gram(s), _self_gram(t), float(eps))


@_dtypes.loss
def cc_loss(student, teacher, gamma=0.4, order=2, gather_distributed=False):
    """Correlation congruence (Peng et al., the paper's Taylor-expanded Gaussian kernel as torchdistill):
    C_ij = exp(-2 gamma) sum_{p=0..order} (2 gamma)^p / p! (e_i . e_j)^p, L = |C_s - C_t|_F / b^2 (the norm,
    not its square). One fused op over the Gram matrices: the kernels are never stored."""
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order < 0:
        raise ValueError("cc_loss: order must be an int >= 0, got %r" % (order,))
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not finite(gamma):
        raise ValueError("cc_loss: gamma must be a finite number, got %r" % (gamma,))
    s, t = _pair("cc_loss", student, teacher, gather_distributed)
    return torch.ops.kdops.cc_gram(_self_gram(s), _self_gram(t), float(gamma), int(order))


# ---- feature-map relations ----

def _maps(name, student, teacher, same_channels=False):
    for arg, x in (("student", student), ("teacher", teacher)):
        _check_tensor(name, arg, x, (3, 4, 5))
    if student.shape[0] != teacher.shape[0]:
        raise ValueError("%s: student and teacher must have the same batch size, got %d and %d"
                         % (name, student.shape[0], teacher.shape[0]))
    if student.shape[2:] != teacher.shape[2:]:
        raise ValueError("%s: student and teacher maps must have the same spatial size (pool or interpolate "
                         "first), got %s and %s" % (name, tuple(student.shape[2:]), tuple(teacher.shape[2:])))
    if same_channels and student.shape[1] != teacher.shape[1]:
        raise ValueError("%s: student and teacher must have the same channels, got %d and %d"
                         % (name, student.shape[1], teacher.shape[1]))
    if student.device != teacher.device:
        raise ValueError("%s: student and teacher must be on the same device" % name)
    b, acc = student.shape[0], _dtypes.acc_of(student, teacher)
    return _acc(student.reshape(b, student.shape[1], -1), acc), _acc(teacher.reshape(b, teacher.shape[1], -1), acc)


@_dtypes.loss
def at_loss(student, teacher, p=2, mode="code"):
    """Attention transfer (Zagoruyko & Komodakis): a = normalize over HW of the channel mean of |f|^p;
    ``mode="code"`` (the released code): mean over (b, HW) of (a_s - a_t)^2; ``mode="paper"``: channel sum instead
    of mean and L = sum_i |a_s,i - a_t,i|_2 / b. Channels may differ, spatial sizes must match."""
    if mode not in ("code", "paper"):
        raise ValueError("at_loss: mode must be 'code' or 'paper', got %r" % (mode,))
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not p > 0:
        raise ValueError("at_loss: p must be a number > 0, got %r" % (p,))
    s, t = _maps("at_loss", student, teacher)

    def attention(x):  # the channel reduction of |x|^p as one op over the map, the rest on (b, HW)
        return F.normalize(torch.ops.kdops.at_map(x, float(p), mode == "code"), dim=1, eps=_TINY)

    diff = attention(s) - attention(t)
    if mode == "code":
        return diff.pow(2).mean()
    return diff.norm(dim=1).sum() / s.shape[0]


@_dtypes.loss
def nst_loss(student, teacher):
    """Neural selectivity transfer (Huang & Wang): per sample the channels (L2-normalised over HW) are the points,
    polynomial kernel k(x, y) = (x.y)^2; L = mean k(T, T) + mean k(S, S) - 2 mean k(S, T), means over channel
    pairs then over the batch. Batched GEMMs, never the b.C.C'.HW broadcast.

    The degree-2 kernel is linear in outer products: sum_ij (s_i . t_j)^2 = <S^T S, T^T T>_F, so the three means
    are one squared norm, |S^T S / C_s - T^T T / C_t|_F^2, of (b, HW, HW) Grams. That form is used when it is
    the cheaper one, HW (C_s + C_t) < C_s^2 + C_t^2 + C_s C_t (small late-stage maps, many channels: at
    64 x 256 x 8 x 8 its Grams are 1/16 of the channel ones), the (b, C, C') Grams otherwise."""
    s, t = _maps("nst_loss", student, teacher)
    s, t = F.normalize(s, dim=2, eps=_TINY), F.normalize(t, dim=2, eps=_TINY)
    cs, ct, hw = s.shape[1], t.shape[1], s.shape[2]
    if hw * (cs + ct) < cs * cs + ct * ct + cs * ct:
        diff = _self_gram(s.transpose(1, 2)) / cs - _self_gram(t.transpose(1, 2)) / ct
        return diff.pow(2).sum((1, 2)).mean()
    k_tt = (t @ t.transpose(1, 2)).pow(2).mean((1, 2))
    k_ss = (s @ s.transpose(1, 2)).pow(2).mean((1, 2))
    k_st = (s @ t.transpose(1, 2)).pow(2).mean((1, 2))
    return (k_tt + k_ss - 2 * k_st).mean()


@_dtypes.loss
def fsp_matrix(first, second):
    """FSP matrix (Yim et al.) of two maps of one network with equal H*W: (b, C1, H, W), (b, C2, H, W) ->
    (b, C1, C2) = F1 F2^T / HW, one batched GEMM."""
    name = "fsp_matrix"
    for arg, x in (("first", first), ("second", second)):
        _check_tensor(name, arg, x, (3, 4, 5))
    if first.shape[0] != second.shape[0] or first.shape[2:] != second.shape[2:]:
        raise ValueError("%s: the two maps must share batch and spatial size, got %s and %s"
                         % (name, tuple(first.shape), tuple(second.shape)))
    b, acc = first.shape[0], _dtypes.acc_of(first, second)
    a, c = _acc(first.reshape(b, first.shape[1], -1), acc), _acc(second.reshape(b, second.shape[1], -1), acc)
    return a @ c.transpose(1, 2) / a.shape[2]


@_dtypes.loss
def fsp_loss(student_pairs, teacher_pairs):
    """FSP (Yim et al.): for each pair of layers, mean over (b, C1, C2) of (G_s - G_t)^2 with G = fsp_matrix;
    the sum over the pairs. Student and teacher pairs must give matrices of the same shape."""
    if not isinstance(student_pairs, (list, tuple)) or not isinstance(teacher_pairs, (list, tuple)) \
            or len(student_pairs) != len(teacher_pairs) or not student_pairs:
        raise ValueError("fsp_loss: student_pairs and teacher_pairs must be non-empty lists of (first, second) "
                         "map pairs of equal length")
    for side, pairs in (("student_pairs", student_pairs), ("teacher_pairs", teacher_pairs)):
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError("fsp_loss: every entry must be a (first, second) pair of maps, got %s at %s[%d]"
                                 % (type(pair).__name__, side, i))
            for k, x in enumerate(pair):
                _check_tensor("fsp_loss", "%s[%d][%d]" % (side, i, k), x, (3, 4, 5))
    acc = _dtypes.acc_of(*[x for pair in list(student_pairs) + list(teacher_pairs) for x in pair
                           if isinstance(x, torch.Tensor)])
    total = 0
    for i, (sp, tp) in enumerate(zip(student_pairs, teacher_pairs)):
        up = [[x.to(acc) if isinstance(x, torch.Tensor) else x for x in p] for p in (sp, tp)]
        gs, gt = fsp_matrix(*up[0]), fsp_matrix(*up[1])
        if gs.shape != gt.shape:
            raise ValueError("fsp_loss: pair %d gives FSP matrices %s (student) and %s (teacher); channels must match"
                             % (i, tuple(gs.shape), tuple(gt.shape)))
        total = total + (gs - gt).pow(2).mean()
    return total
