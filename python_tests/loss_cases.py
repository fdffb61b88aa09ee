"""Every public loss of kdops.functional as a case: how to make its inputs, which of them are the compared
("student" and "teacher" side) float tensors, and which get gradients. Shared by the dtype / autocast tests
and the fuzzed parity tests, so that a loss added to kdops.functional without a case here fails
test_every_public_loss_has_a_case."""

from dataclasses import dataclass, field
from typing import Callable, Dict

import torch


@dataclass(frozen=True)
class Case:
    """make(sizes, student_dtype, teacher_dtype, device, generator) -> (args, kwargs). The float tensors that a
    test may cast, perturb or differentiate are the arguments at positions `student` and `teacher` (a pair
    argument holds a tuple of two tensors; see `pair_arg`)."""
    fn: str
    make: Callable
    sizes: Dict[str, int] = field(default_factory=dict)
    student: int = 0
    teacher: int = 1  # -1: no teacher side
    pair_arg: bool = False  # args[0] is a (student, teacher) tuple
    nested_pairs: bool = False  # args are lists of (first, second) map pairs (fsp_loss)


def _randn(shape, dtype, device, g, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _logits(z, ds, dt, dev, g, target=False):
    b, c = z["b"], z["c"]
    args = [_randn((b, c), ds, dev, g, 3.0), _randn((b, c), dt, dev, g, 3.0)]
    if target:
        args.append(torch.randint(0, c, (b,), generator=g).to(dev))
    return args, {}


def _maps(z, ds, dt, dev, g):
    return [_randn((z["b"], z["c"], z["h"], z["h"]), ds, dev, g), _randn((z["b"], z["c"], z["h"], z["h"]), dt, dev, g)]


def _feats(z, ds, dt, dev, g, same_width=False):
    return [_randn((z["b"], z["d"]), ds, dev, g), _randn((z["b"], z["d"] if same_width else z["d2"]), dt, dev, g)]


def _partial_l2(z, ds, dt, dev, g):
    s, t = _maps(z, ds, dt, dev, g)
    return [s, t, _randn((z["c"],), torch.float32, dev, g, 0.5).abs().neg()], {}


def _margin_relu(z, ds, dt, dev, g):
    return [_randn((z["b"], z["c"], z["h"], z["h"]), ds, dev, g), _randn((z["c"],), torch.float32, dev, g).abs().neg()], {}


def _clouds(z, ds, dt, dev, g, m_equal=False):
    n, m = z["n"], z["n"] if m_equal else z["m"]
    return [_randn((n, z["d"]), ds, dev, g), _randn((m, z["d"]), dt, dev, g, 1.3) + 0.5]


def _fsp(z, ds, dt, dev, g):
    b, h = z["b"], z["h"]
    sp = [(_randn((b, 3, h, h), ds, dev, g), _randn((b, 4, h, h), ds, dev, g))]
    tp = [(_randn((b, 3, h, h), dt, dev, g), _randn((b, 4, h, h), dt, dev, g))]
    return [sp, tp], {}


def _crd(z, ds, dt, dev, g):
    # unit rows as CRD's embeddings and banks; column 0 of the index the positive, then k negatives
    b, d, n, k = z["b"], z["d"], z["N"], z["k"]
    anchor = torch.nn.functional.normalize(torch.randn((b, d), generator=g, dtype=torch.float64), dim=1)
    memory = torch.nn.functional.normalize(torch.randn((n, d), generator=g, dtype=torch.float64), dim=1)
    index = torch.randint(0, n, (b, k + 1), generator=g) if n > 0 else torch.zeros((b, k + 1), dtype=torch.long)
    return [anchor.to(dev, ds), memory.to(dev, dt), index.to(dev)], {"temperature": 0.07}


def _lm(z, ds, dt, dev, g):
    # hidden states (b, d) and (b, d2), lm_head weights (c, d) and (c, d2) in fp32; chunks of 4 tokens
    b, d, d2, c = z["b"], z["d"], z["d2"], z["c"]
    args = [_randn((b, d), ds, dev, g), _randn((c, d), torch.float32, dev, g, 0.5), _randn((b, d2), dt, dev, g),
            _randn((c, d2), torch.float32, dev, g, 0.5)]
    return args, {"chunk_size": 4, "temperature": 2.0}


def _topk(z, ds, dt, dev, g):
    b, d, c, k = z["b"], z["d"], z["c"], z["k"]
    ids = torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(b)]) if c >= k and b > 0 else \
        torch.zeros((b, k), dtype=torch.long)
    lps = torch.log_softmax(torch.randn((b, c), generator=g, dtype=torch.float64), -1)[:, :k]
    return [_randn((b, d), ds, dev, g), _randn((c, d), torch.float32, dev, g, 0.5), ids.to(dev),
            lps.to(dev, torch.float32)], {"chunk_size": 4, "tail": "bucket"}


LOGITS = {"b": 9, "c": 13}
MAPS = {"b": 4, "c": 6, "h": 5}
FEATS = {"b": 11, "d": 7, "d2": 9}
CLOUDS = {"n": 12, "m": 9, "d": 5}

CASES = {
    "kd_loss": Case("kd_loss", lambda z, ds, dt, dev, g: _logits(z, ds, dt, dev, g), LOGITS),
    "reverse_kd_loss": Case("reverse_kd_loss", lambda z, ds, dt, dev, g: _logits(z, ds, dt, dev, g), LOGITS),
    "jsd_loss": Case("jsd_loss", lambda z, ds, dt, dev, g: _logits(z, ds, dt, dev, g), LOGITS),
    "dkd_loss": Case("dkd_loss", lambda z, ds, dt, dev, g: _logits(z, ds, dt, dev, g, target=True), LOGITS),
    "mutual_kd_loss": Case("mutual_kd_loss", lambda z, ds, dt, dev, g: ([tuple(_logits(z, ds, dt, dev, g)[0])],
                                                                      {"temperature": 2.0}), LOGITS, pair_arg=True),
    "margin_relu": Case("margin_relu", _margin_relu, MAPS, teacher=-1),
    "partial_l2_loss": Case("partial_l2_loss", _partial_l2, MAPS),
    "hint_loss": Case("hint_loss", lambda z, ds, dt, dev, g: (_maps(z, ds, dt, dev, g), {}), MAPS),
    "logsum_loss": Case("logsum_loss", lambda z, ds, dt, dev, g: ([tuple(_feats(z, ds, dt, dev, g, True))], {}), FEATS,
                        pair_arg=True),
    "gram": Case("gram", lambda z, ds, dt, dev, g: ([_randn((z["b"], z["d"]), ds, dev, g)], {"kernel": "cosine"}),
                 FEATS, teacher=-1),
    "pairwise_distance": Case("pairwise_distance", lambda z, ds, dt, dev, g: ([_randn((z["b"], z["d"]), ds, dev, g)], {}),
                              FEATS, teacher=-1),
    "angle_tensor": Case("angle_tensor", lambda z, ds, dt, dev, g: ([_randn((z["b"], z["d"]), ds, dev, g)], {}), FEATS,
                         teacher=-1),
    "fkd_loss": Case("fkd_loss", lambda z, ds, dt, dev, g: (_feats(z, ds, dt, dev, g), {"fr_weight": 0.1}), FEATS),
    "sp_loss": Case("sp_loss", lambda z, ds, dt, dev, g: (_feats(z, ds, dt, dev, g), {}), FEATS),
    "rkd_distance_loss": Case("rkd_distance_loss", lambda z, ds, dt, dev, g: (_feats(z, ds, dt, dev, g), {}), FEATS),
    "rkd_angle_loss": Case("rkd_angle_loss", lambda z, ds, dt, dev, g: (_feats(z, ds, dt, dev, g), {}), FEATS),
    "rkd_loss": Case("rkd_loss", lambda z, ds, dt, dev, g: (_feats(z, ds, dt, dev, g), {}), FEATS),
    "pkt_loss": Case("pkt_loss", lambda z, ds, dt, dev, g: (_feats(z, ds, dt, dev, g), {}), FEATS),
    "cc_loss": Case("cc_loss", lambda z, ds, dt, dev, g: (_feats(z, ds, dt, dev, g), {}), FEATS),
    "at_loss": Case("at_loss", lambda z, ds, dt, dev, g: (_maps(z, ds, dt, dev, g), {}), MAPS),
    "nst_loss": Case("nst_loss", lambda z, ds, dt, dev, g: (_maps(z, ds, dt, dev, g), {}), MAPS),
    "fsp_matrix": Case("fsp_matrix", lambda z, ds, dt, dev, g: (_maps(z, ds, dt, dev, g), {}), MAPS),
    "fsp_loss": Case("fsp_loss", _fsp, MAPS, nested_pairs=True),
    "wasserstein_exact": Case("wasserstein_exact", lambda z, ds, dt, dev, g: (_clouds(z, ds, dt, dev, g), {}), CLOUDS),
    "gaussian_wasserstein": Case("gaussian_wasserstein", lambda z, ds, dt, dev, g: (_clouds(z, ds, dt, dev, g), {}),
                                 CLOUDS),
    "gaussian_kl": Case("gaussian_kl", lambda z, ds, dt, dev, g: (_clouds(z, ds, dt, dev, g), {"diagonal": False}),
                        CLOUDS),
    "mmd": Case("mmd", lambda z, ds, dt, dev, g: (_clouds(z, ds, dt, dev, g), {"kernel": "rbf"}), CLOUDS),
    "class_conditional_wasserstein": Case(
        "class_conditional_wasserstein",
        lambda z, ds, dt, dev, g: (_clouds(z, ds, dt, dev, g, m_equal=True)
                                   + [torch.arange(z["n"]).remainder(3).to(dev)], {"metric": "gaussian"}), CLOUDS),
    "joint_wasserstein": Case(
        "joint_wasserstein",
        lambda z, ds, dt, dev, g: (_clouds(z, ds, dt, dev, g) + [_randn((z["n"], 4), ds, dev, g),
                                                                _randn((z["m"], 4), dt, dev, g)], {}), CLOUDS),
    "crd_nce_loss": Case("crd_nce_loss", _crd, {"b": 11, "d": 7, "k": 5, "N": 23}),
    "fused_linear_kd_loss": Case("fused_linear_kd_loss", _lm, {"b": 9, "d": 7, "d2": 9, "c": 13}, teacher=2),
    "topk_kd_loss": Case("topk_kd_loss", _topk, {"b": 9, "d": 7, "c": 13, "k": 5}, teacher=-1),
    "sinkhorn": Case("sinkhorn", lambda z, ds, dt, dev, g: (_clouds(z, ds, dt, dev, g), {"eps": 0.5}), CLOUDS),
}


def make(name, student_dtype, teacher_dtype, device="cpu", seed=0, sizes=None):
    case = CASES[name]
    g = torch.Generator().manual_seed(seed)
    args, kwargs = case.make(dict(case.sizes, **(sizes or {})), student_dtype, teacher_dtype, device, g)
    return list(args), dict(kwargs)


def differentiable(case, args):
    """The float input tensors of a call, in order (student side first)."""
    if case.pair_arg:
        return list(args[0])
    if case.nested_pairs:
        return [x for pairs in args[:2] for pair in pairs for x in pair]
    idx = [case.student] + ([case.teacher] if case.teacher >= 0 else [])
    return [args[i] for i in idx]


def with_grad(case, args):
    """args with every float input a fresh leaf that requires grad; returns (args, leaves)."""
    args = list(args)
    if case.pair_arg:
        leaves = [x.detach().clone().requires_grad_() for x in args[0]]
        args[0] = tuple(leaves)
        return args, leaves
    if case.nested_pairs:
        leaves, new = [], []
        for pairs in args[:2]:
            out = []
            for first, second in pairs:
                a, b = first.detach().clone().requires_grad_(), second.detach().clone().requires_grad_()
                leaves += [a, b]
                out.append((a, b))
            new.append(out)
        return new + args[2:], leaves
    leaves = []
    for i in [case.student] + ([case.teacher] if case.teacher >= 0 else []):
        args[i] = args[i].detach().clone().requires_grad_()
        leaves.append(args[i])
    return args, leaves


def cast(case, args, dtype):
    """The same call with every float input cast to `dtype` (the reference's float64 copy of a 16-bit call)."""
    def c(x):
        return x.detach().to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
    out = []
    for a in args:
        if isinstance(a, tuple):
            out.append(tuple(c(x) for x in a))
        elif isinstance(a, list):
            out.append([tuple(c(x) for x in pair) for pair in a])
        else:
            out.append(c(a))
    return out
