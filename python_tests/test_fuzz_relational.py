"""Fuzzed parity of the relational family (kdops::gram, gram_transform, pairwise distances, angles, fkd_gram,
sp / pkt / cc on Gram matrices, rkd, at_map, nst and fsp products, through their public functions) with the
references: batches of two to 67, feature widths of one to 1271, student and teacher of different widths,
teacher ensembles, every dtype and mixed dtypes, non-contiguous and expanded (all rows equal: duplicate points)
inputs, zero-norm rows, scales from 1e-3 to 1e3, each loss's options, and a non-uniform grad_output. See
fuzz_support.py."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzz_support import FUZZ, Call, check, dtype_pair, tensor
from kdops import functional as F
from kdops import reference as R

PAIR_LOSSES = ["fkd_loss", "sp_loss", "rkd_distance_loss", "rkd_angle_loss", "rkd_loss", "pkt_loss", "cc_loss"]
SINGLE = ["gram", "pairwise_distance", "angle_tensor"]
MAP_LOSSES = ["at_loss", "nst_loss", "fsp_matrix"]


def features(data, b, d, dtype, scale, label):
    """(leaf, view) of a (b, d) batch, some of whose rows may be zero (a zero-norm embedding)."""
    leaf, view = tensor(data, (b, d), dtype, scale, label=label)
    if data.draw(st.booleans(), label="%s zero row" % label):
        with torch.no_grad():
            leaf[0].zero_()
    return leaf, view


def options(data, name):
    if name == "gram":
        return {"kernel": data.draw(st.sampled_from(["linear", "cosine"]), label="kernel")}
    if name == "pairwise_distance":
        return {"squared": data.draw(st.booleans(), label="squared")}
    if name == "fkd_loss":
        return {"kernel": data.draw(st.sampled_from(["correlation", "linear"]), label="kernel"),
                "fr_weight": data.draw(st.sampled_from([0.0, 0.1]), label="fr_weight"),
                "fr_power": data.draw(st.sampled_from([1, 2]), label="fr_power")}
    if name == "rkd_loss":
        return {"distance_weight": data.draw(st.sampled_from([25.0, 1.0])),
                "angle_weight": data.draw(st.sampled_from([50.0, 0.0]))}
    if name == "pkt_loss":
        return {"eps": data.draw(st.sampled_from([1e-7, 0.0, 1e-3]), label="eps")}
    if name == "cc_loss":
        return {"gamma": data.draw(st.sampled_from([0.4, 0.0, 2.0]), label="gamma"),
                "order": data.draw(st.sampled_from([0, 1, 2, 3]), label="order")}
    if name == "at_loss":
        return {"p": data.draw(st.sampled_from([1, 2, 3.5]), label="p"),
                "mode": data.draw(st.sampled_from(["code", "paper"]), label="mode")}
    return {}


def sizes(data, name):
    # the angle tensor is b^3 d: keep its batches small; the Gram-based losses take a long odd feature width
    b = data.draw(st.sampled_from([2, 3, 7, 33] if "angle" in name or name == "rkd_loss" else [2, 3, 17, 67]),
                  label="b")
    d = data.draw(st.sampled_from([1, 2, 5, 1271] if "angle" not in name and name != "rkd_loss" else [1, 2, 5, 40]),
                  label="d")
    return b, d


@pytest.mark.parametrize("name", SINGLE)
@FUZZ
@given(data=st.data())
def test_single_input_ops_match_reference(name, data):
    b, d = sizes(data, name)
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]), label="dtype")
    scale = data.draw(st.sampled_from([1.0, 1e-3, 1e3]), label="scale")
    x, view = features(data, b, d, dtype, scale, "x")
    kwargs = options(data, name)
    # entries are products / differences of two rows: a gradient entry is of the size of a row entry times b;
    # for the unit-free ops (angles, cosines) b over the shortest difference / row that they normalise
    unit = name == "angle_tensor" or kwargs.get("kernel") == "cosine"
    rows = view(x.detach().double())
    lengths = torch.pdist(rows) if name == "angle_tensor" and b > 1 else rows.norm(dim=1)
    shortest = min(scale, lengths[lengths > 0].min().item()) if bool((lengths > 0).any()) else scale
    call = Call([x], lambda ls: [view(ls[0])], kwargs, grad_scale=data.draw(st.sampled_from([1.0, -3.7])),
                grad_floor=(b / shortest if unit else b * scale * (2 if kwargs.get("squared", True) else 1)),
                value_floor=1.0 if unit else scale * scale * d)
    check(name, getattr(F, name), getattr(R, name), call, compare_grads=_differentiable(name, call))


def _differentiable(name, call):
    """Distances and angles have no derivative where two points coincide (the norm's kink at 0) or a row is zero
    under the cosine kernel: there the reference's float64 gradient is one subgradient among many (or NaN), so
    only values are compared for such inputs."""
    x = call.make([leaf.detach().double() for leaf in call.leaves])
    rows = [a.reshape(a.shape[0], -1) for a in (x if isinstance(x, (list, tuple)) else [x])
            if isinstance(a, torch.Tensor)]
    for r in rows:
        if r.shape[0] > 1 and torch.pdist(r).min().item() == 0.0:
            return False
        if r.norm(dim=1).min().item() == 0.0:
            return False
    return True


@pytest.mark.parametrize("name", PAIR_LOSSES)
@FUZZ
@given(data=st.data())
def test_pair_losses_match_reference(name, data):
    b, d = sizes(data, name)
    d_t = data.draw(st.sampled_from([d, 3]), label="teacher width")
    ds, dt = dtype_pair(data)
    scale = data.draw(st.sampled_from([1.0, 1e-3, 1e3]), label="scale")
    s, s_view = features(data, b, d, ds, scale, "student")
    teachers = 1
    if name == "fkd_loss":
        teachers = data.draw(st.sampled_from([1, 3]), label="teachers")
    ts = [features(data, b, d_t, dt, scale * data.draw(st.sampled_from([1.0, 2.0])), "teacher %d" % i)
          for i in range(teachers)]
    kwargs = options(data, name)

    def make(ls):
        t_args = [view(leaf) for (_, view), leaf in zip(ts, ls[1:])]
        return [s_view(ls[0]), t_args if name == "fkd_loss" and teachers > 1 else t_args[0]]

    # each loss averages normalised b x b terms of size ~1 (times rkd_loss's weights): a gradient entry is
    # ~1 / (b * |h|) for a row h, largest at the shortest nonzero row
    weight = kwargs.get("distance_weight", 0) + kwargs.get("angle_weight", 0) + 1
    rows = torch.cat([leaf.detach().double().reshape(leaf.shape[0], -1).norm(dim=1) for leaf in [s] + [t for t, _ in ts]])
    shortest = min(scale, rows[rows > 0].min().item()) if bool((rows > 0).any()) else scale
    call = Call([s] + [leaf for leaf, _ in ts], make, kwargs, grad_scale=data.draw(st.sampled_from([1.0, -3.7, 1e-3])),
                grad_floor=weight / (b * shortest) + kwargs.get("fr_weight", 0) * scale / b,
                value_floor=weight + kwargs.get("fr_weight", 0) * (scale * scale * d))
    check(name, getattr(F, name), getattr(R, name), call, compare_grads=_differentiable(name, call))


@pytest.mark.parametrize("name", MAP_LOSSES)
@FUZZ
@given(data=st.data())
def test_map_losses_match_reference(name, data):
    b = data.draw(st.sampled_from([1, 2, 3]), label="b")
    c = data.draw(st.sampled_from([1, 3, 16]), label="channels")
    c_t = data.draw(st.sampled_from([c, 5]), label="teacher channels") if name != "at_loss" else c
    hw = data.draw(st.sampled_from([(1, 1), (4, 4), (7, 5), (1, 1271)]), label="spatial")
    ds, dt = dtype_pair(data)
    scale = data.draw(st.sampled_from([1.0, 1e-3, 1e2]), label="scale")
    s, s_view = tensor(data, (b, c, *hw), ds, scale, label="student")
    t, t_view = tensor(data, (b, c_t, *hw), dt, scale, label="teacher")
    kwargs = options(data, name)
    n = b * hw[0] * hw[1]
    if name == "fsp_matrix":  # products of two maps, means over HW: entries ~scale^2, gradients ~scale / HW
        floors = {"grad_floor": scale * c * c_t / (hw[0] * hw[1]), "value_floor": scale * scale}
    else:  # normalised attention / Gram terms of size ~1
        floors = {"grad_floor": 1.0 / (n * scale), "value_floor": 1.0}
    call = Call([s, t], lambda ls: [s_view(ls[0]), t_view(ls[1])], kwargs,
                grad_scale=data.draw(st.sampled_from([1.0, -3.7])), **floors)
    check(name, getattr(F, name), getattr(R, name), call, compare_grads=_map_differentiable(name, call))


def _map_differentiable(name, call):
    """|x|^p with p = 1 has its kink at 0 (hit by the expanded, exactly equal entries only through zeros, which
    randn does not draw); the attention and NST normalisations have none unless a whole map is 0."""
    if name == "fsp_matrix":
        return True
    maps = call.make([leaf.detach().double() for leaf in call.leaves])
    return all(m.reshape(m.shape[0], m.shape[1], -1).norm(dim=2).min().item() > 0 for m in maps)


@FUZZ
@given(data=st.data())
def test_fsp_loss_matches_reference(data):
    b, h = data.draw(st.sampled_from([1, 2, 3])), data.draw(st.sampled_from([1, 4, 7]))
    ds, dt = dtype_pair(data)
    shapes = [((b, 3, h, h), (b, 4, h, h)), ((b, 2, h, h), (b, 1, h, h))][: data.draw(st.sampled_from([1, 2]))]
    made = []
    for i, (a, c) in enumerate(shapes):
        for side, dtype in (("student", ds), ("teacher", dt)):
            made.append(tensor(data, a, dtype, label="%s %d first" % (side, i)))
            made.append(tensor(data, c, dtype, label="%s %d second" % (side, i)))

    def make(ls):
        views = [view(leaf) for (_, view), leaf in zip(made, ls)]
        pairs = [(views[4 * i], views[4 * i + 1], views[4 * i + 2], views[4 * i + 3]) for i in range(len(shapes))]
        return [[(p[0], p[1]) for p in pairs], [(p[2], p[3]) for p in pairs]]

    call = Call([leaf for leaf, _ in made], make, grad_scale=data.draw(st.sampled_from([1.0, -3.7])),
                grad_floor=1.0 / (h * h), value_floor=1.0)
    check("fsp_loss", F.fsp_loss, R.fsp_loss, call)
