"""The bundled / generated datasets: digits, mnist1d and the multi-view synthetic set."""

import functools
import random

import numpy as np
import torch

MULTIVIEW_DEFAULTS = dict(num_classes=10, views=4, dim=64, n_train=4000, n_test=1000, keep=0.5, distractors=2,
                          distractor_scale=0.4, noise=0.3, seed=0)


def _split(x, y, test_fraction, seed):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(round(len(y) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


@functools.lru_cache(maxsize=1)
def digits():
    """scikit-learn's 1797 8x8 digits (shipped with scikit-learn), pixels / 16, a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return _split(x, y, 0.2, seed=0)


@functools.lru_cache(maxsize=1)
def mnist1d():
    """MNIST-1D generated with the package's defaults (4000 train / 1000 test signals of length 40).

    Only ``make_dataset`` is called, which never touches the network (``get_dataset`` would download).
    It seeds numpy's and Python's global generators, so their states are put back afterwards.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    as_x = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32).unsqueeze(1)  # noqa: E731
    as_y = lambda a: torch.tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    return as_x(d["x"]), as_y(d["y"]), as_x(d["x_test"]), as_y(d["y_test"])


def make_multiview(return_views=False, **overrides):
    """A multi-view classification set in the spirit of the theory behind feature distillation
    (Allen-Zhu & Li, "Towards understanding ensemble, knowledge distillation and self-distillation").

    Every class c owns ``views`` feature directions v_{c,1..V} (random unit vectors in R^dim). A sample of class
    c shows each of its class's views independently with probability ``keep`` (at least one, so some samples
    are "single-view" and some "multi-view"), each with a weight in [0.5, 1.5]; it also shows ``distractors``
    views of other random classes with weights scaled by ``distractor_scale``, plus Gaussian noise of std
    ``noise``. A model that has learnt only some views of a class fails on the samples that lack them, which is
    the gap a teacher's soft labels and features can fill. Deterministic given ``seed``; returns float32
    x (n, dim) and int64 y for train and test: (x_train, y_train, x_test, y_test). ``return_views=True`` also
    returns which of its class's views each sample shows, bool (n, views) for train and test.
    """
    p = dict(MULTIVIEW_DEFAULTS)
    unknown = set(overrides) - set(p)
    if unknown:
        raise ValueError("make_multiview: unknown option(s) %s; options: %s" % (sorted(unknown), sorted(p)))
    p.update(overrides)
    g = torch.Generator().manual_seed(p["seed"])
    k, v, d = p["num_classes"], p["views"], p["dim"]
    dirs = torch.nn.functional.normalize(torch.randn(k, v, d, generator=g), dim=-1)

    def sample(n):
        y = torch.randint(0, k, (n,), generator=g)
        shown = torch.rand(n, v, generator=g) < p["keep"]
        forced = torch.randint(0, v, (n,), generator=g)
        shown[torch.arange(n), forced] = True
        w = (0.5 + torch.rand(n, v, generator=g)) * shown
        x = torch.einsum("nv,nvd->nd", w, dirs[y])
        other = (y.unsqueeze(1) + torch.randint(1, k, (n, p["distractors"]), generator=g)) % k
        which = torch.randint(0, v, (n, p["distractors"]), generator=g)
        dw = p["distractor_scale"] * torch.rand(n, p["distractors"], generator=g)
        x = x + torch.einsum("nj,njd->nd", dw, dirs[other, which])
        return x + p["noise"] * torch.randn(n, d, generator=g), y, shown

    x, y, shown = sample(p["n_train"])
    xt, yt, shown_t = sample(p["n_test"])
    return (x, y, xt, yt, shown, shown_t) if return_views else (x, y, xt, yt)
