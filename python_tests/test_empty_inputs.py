"""Empty inputs, for every public loss: a batch of no samples (b = 0, or a cloud of no points), and the empty
maps and widths that are legal shapes (no channels, no pixels, no features). Each loss either refuses with a
ValueError that names the argument and says it is empty, or gives the reference's answer (NaN where the
reference averages over nothing) with gradients of the inputs' shapes; none crashes or hangs."""

import math

import pytest
import torch

from conftest import DEVICES
from kdops import functional as F
from kdops import reference as R
from loss_cases import CASES, cast, make, with_grad

NAMES = sorted(CASES)

# The empty sizes drawn for each kind of input (the keys of the cases' sizes)
EMPTY = {
    "b": [{"b": 0}],
    "n": [{"n": 0}, {"m": 0}],
    "c": [{"c": 0}],
    "h": [{"h": 0}],
    "d": [{"d": 0, "d2": 0}],
}


def empty_variants(name):
    sizes = CASES[name].sizes
    out = []
    for key, variants in EMPTY.items():
        if key in sizes and not (name == "dkd_loss" and key == "c"):  # (no class for a target to name)
            out += [v for v in variants if all(k in sizes for k in v)]
    return out


PARAMS = [(name, sizes) for name in NAMES for sizes in empty_variants(name)]
ARG_NAMES = ("student", "teacher", "logits", "feats", "maps", "x", "y", "cloud", "input", "pairs", "margin",
             "target", "labels", "features")


def outcome(fn, args, kwargs):
    try:
        return fn(*args, **kwargs), None
    except (ValueError, RuntimeError, IndexError, ZeroDivisionError, torch.linalg.LinAlgError) as err:
        return None, err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, sizes", PARAMS, ids=["%s-%s" % (n, "-".join("%s0" % k for k in s)) for n, s in PARAMS])
def test_empty_input_is_refused_clearly_or_matches_reference(name, sizes, device):
    case = CASES[name]
    args, kwargs = make(name, torch.float32, torch.float32, device=device, sizes=sizes)
    args, leaves = with_grad(case, args)
    ours, err = outcome(getattr(F, name), args, kwargs)
    if err is not None:
        msg = str(err)
        assert isinstance(err, ValueError), "%s raised %s instead of a ValueError: %s" % (name, type(err).__name__, msg)
        assert msg.startswith(name + ":"), "the message does not start with the loss's name: %s" % msg
        assert "empty" in msg or " 0" in msg or "at least" in msg, msg
        assert any(a in msg for a in ARG_NAMES), "the message names no argument: %s" % msg
        return
    ref, ref_err = outcome(getattr(R, name), cast(case, args, torch.float64), kwargs)
    assert ref_err is None, "kdops accepts what the reference refuses (%s): %s" % (ref_err, ours)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-5, atol=1e-6, equal_nan=True)
    total = ours.sum()
    if total.requires_grad:
        grads = torch.autograd.grad(total, leaves, allow_unused=True)
        for leaf, g in zip(leaves, grads):
            if g is not None:
                assert g.shape == leaf.shape and g.dtype == leaf.dtype
                if not math.isnan(total.item()):
                    assert torch.isfinite(g).all()
