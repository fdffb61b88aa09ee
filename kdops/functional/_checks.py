"""Argument checks shared by the loss families of kdops.functional: every message names the function, the
argument and what was expected."""

import math
import numbers


def finite(value):
    """math.isfinite for a real, also while torch.compile traces a float argument as a symbolic value (which
    math.isfinite cannot take): a comparison is traced, and NaN fails it."""
    return abs(value) < math.inf


def check_same(name, a_name, a, b_name, b, layout):
    """a and b must agree in shape and device; `layout` describes the expected shape. Their dtypes may differ
    (kdops.functional._dtypes.promote gives them a common one)."""
    if a.shape != b.shape:
        raise ValueError("%s: %s and %s must have the same shape %s, got %s and %s"
                         % (name, a_name, b_name, layout, tuple(a.shape), tuple(b.shape)))
    if a.device != b.device:
        raise ValueError("%s: %s and %s must be on the same device, got %s and %s"
                         % (name, a_name, b_name, a.device, b.device))


def check_positive(name, arg, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0) or not finite(value):
        raise ValueError("%s: %s must be a finite number > 0, got %r" % (name, arg, value))


def check_number(name, arg, value, low=None, positive=False):
    """value must be a finite real (not a bool), > 0 with `positive`, >= `low` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not finite(value) \
            or (positive and not value > 0) or (low is not None and value < low):
        what = " > 0" if positive else (" >= %s" % low if low is not None else "")
        raise ValueError("%s: %s must be a finite number%s, got %r" % (name, arg, what, value))
