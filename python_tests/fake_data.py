"""Small files in the CIFAR (python pickle batches) and SVHN (.mat) formats, for the loader tests."""

import os
import pickle

import numpy as np


def _batch(rng, n, num_classes, label_key):
    x = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
    y = rng.integers(0, num_classes, size=n).tolist()
    return {b"data": x, label_key: y, b"batch_label": b"fake"}


def write_cifar10(root, n_per_batch=8, n_test=8, seed=0, nested=True):
    rng = np.random.default_rng(seed)
    d = os.path.join(root, "cifar-10-batches-py") if nested else root
    os.makedirs(d, exist_ok=True)
    written = {}
    for name in ["data_batch_%d" % i for i in range(1, 6)] + ["test_batch"]:
        b = _batch(rng, n_test if name == "test_batch" else n_per_batch, 10, b"labels")
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump(b, f)
        written[name] = b
    return written


def write_cifar100(root, n_train=40, n_test=8, seed=1):
    rng = np.random.default_rng(seed)
    d = os.path.join(root, "cifar-100-python")
    os.makedirs(d, exist_ok=True)
    written = {}
    for name, n in (("train", n_train), ("test", n_test)):
        b = _batch(rng, n, 100, b"fine_labels")
        b[b"coarse_labels"] = [v // 5 for v in b[b"fine_labels"]]
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump(b, f)
        written[name] = b
    return written


def write_svhn(root, n_train=12, n_test=6, seed=2):
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    written = {}
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)  # SVHN's labels are 1..10, 10 meaning digit 0
        savemat(os.path.join(root, name), {"X": x, "y": y})
        written[name] = (x, y)
    return written
