"""CIFAR-10 / CIFAR-100 (python pickle batches) and SVHN (.mat) from a local directory, and their augmentation."""

import os
import pickle

import numpy as np
import torch

EXPECTED = {
    "cifar10": "cifar-10-batches-py/{data_batch_1..5, test_batch} under --data-dir, or those files in it "
               "(the 'CIFAR-10 python version' from https://www.cs.toronto.edu/~kriz/cifar.html)",
    "cifar100": "cifar-100-python/{train, test} under --data-dir, or those files in it "
                "(the 'CIFAR-100 python version' from https://www.cs.toronto.edu/~kriz/cifar.html)",
    "svhn": "train_32x32.mat and test_32x32.mat in --data-dir or --data-dir/svhn "
            "(the cropped-digits format from http://ufldl.stanford.edu/housenumbers/)",
}

# per-channel mean / std of the training images, in [0, 1] units
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}

_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", ["data_batch_%d" % i for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def _find(data_dir, sub, names):
    """The first of data_dir/sub, data_dir that holds every file in names."""
    for root in (os.path.join(data_dir, sub), data_dir):
        if all(os.path.isfile(os.path.join(root, n)) for n in names):
            return root
    return None


def _missing(name, data_dir):
    return FileNotFoundError("%s not found in %s: expected %s. Nothing is downloaded; fetch the files yourself."
                             % (name, os.path.abspath(data_dir), EXPECTED[name]))


def _read_pickles(root, names, label_key):
    xs, ys = [], []
    for n in names:
        with open(os.path.join(root, n), "rb") as f:
            d = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _read_mat(path):
    from scipy.io import loadmat

    d = loadmat(path)
    x = np.ascontiguousarray(np.transpose(d["X"], (3, 2, 0, 1)), dtype=np.uint8)  # (32, 32, 3, N) -> (N, 3, 32, 32)
    y = np.asarray(d["y"], dtype=np.int64).reshape(-1) % 10  # SVHN stores the digit 0 as label 10
    return torch.from_numpy(x), torch.from_numpy(y)


def load(name, data_dir):
    """(x_train uint8 (N, 3, 32, 32), y_train, x_test, y_test, num_classes)."""
    if name in _LAYOUT:
        sub, train, test, key, k = _LAYOUT[name]
        root = _find(data_dir, sub, train + test)
        if root is None:
            raise _missing(name, data_dir)
        return (*_read_pickles(root, train, key), *_read_pickles(root, test, key), k)
    names = ["train_32x32.mat", "test_32x32.mat"]
    root = _find(data_dir, "svhn", names)
    if root is None:
        raise _missing(name, data_dir)
    return (*_read_mat(os.path.join(root, names[0])), *_read_mat(os.path.join(root, names[1])), 10)


class ImagePrep:
    """uint8 (b, 3, H, W) -> normalised float; with ``train`` and ``augment``: a random crop of the image padded
    by ``pad`` zeros on each side and (``flip``) a random horizontal flip, drawn from ``generator`` (a CPU
    generator; the images may be on any device, where the work then happens). SVHN is not flipped: mirrored
    digits are other symbols."""

    def __init__(self, mean_std, flip=True, augment=True, pad=4):
        self.mean = torch.tensor(mean_std[0]).view(1, 3, 1, 1)
        self.std = torch.tensor(mean_std[1]).view(1, 3, 1, 1)
        self.flip, self.augment, self.pad = flip, augment, pad

    def __call__(self, x, train=False, generator=None):
        x = x.float() / 255.0
        if train and self.augment:
            x = self._crop_flip(x, generator)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def _crop_flip(self, x, g):
        b, c, h, w = x.shape
        p = self.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (b, 1), generator=g)
        ox = torch.randint(0, 2 * p + 1, (b, 1), generator=g)
        rows = (oy + torch.arange(h)).view(b, 1, h, 1)
        cols = (ox + torch.arange(w)).view(b, 1, 1, w)
        if self.flip:
            flip = torch.rand(b, generator=g) < 0.5
            cols = torch.where(flip.view(b, 1, 1, 1), cols.flip(-1), cols)
        batch = torch.arange(b).view(b, 1, 1, 1)
        chan = torch.arange(c).view(1, c, 1, 1)
        dev = x.device
        return padded[batch.to(dev), chan.to(dev), rows.to(dev), cols.to(dev)]
