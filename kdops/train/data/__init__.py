"""Datasets for the trainer, all offline.

Bundled or generated here: ``digits`` (scikit-learn's 8x8 digits), ``mnist1d`` (generated with the
``mnist1d`` package's ``make_dataset``, never its downloader) and ``multiview`` (see
:func:`kdops.train.data.synthetic.make_multiview`). Read from ``data_dir``: ``cifar10``, ``cifar100`` (the python
pickle batches) and ``svhn`` (the ``.mat`` files). Nothing is ever downloaded.

A :class:`Dataset` keeps its tensors in memory; ``batch(x, train, generator)`` turns stored samples into
model inputs (uint8 images become normalised floats, with random crop / flip when ``train``).
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from kdops.train.data import files, synthetic

DATASETS = ("digits", "mnist1d", "multiview", "cifar10", "cifar100", "svhn")


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple
    prepare: Optional[Callable] = None  # (x, train, generator) -> float model input

    def batch(self, x, train=False, generator=None):
        return x if self.prepare is None else self.prepare(x, train, generator)

    def subset(self, n_train=None, n_test=None):
        """The first n_train / n_test samples (for quick runs and tests)."""
        return Dataset(self.name, self.x_train[:n_train], self.y_train[:n_train], self.x_test[:n_test],
                       self.y_test[:n_test], self.num_classes, self.input_shape, self.prepare)


def load(name, data_dir=None, augment=True):
    """Loads dataset `name` (one of :data:`DATASETS`). Raises ValueError for an unknown name and
    FileNotFoundError (naming the expected files) when a file-based dataset is missing from `data_dir`."""
    if name == "digits":
        return Dataset(name, *synthetic.digits(), num_classes=10, input_shape=(1, 8, 8))
    if name == "mnist1d":
        return Dataset(name, *synthetic.mnist1d(), num_classes=10, input_shape=(1, 40))
    if name == "multiview":
        (x, y, xt, yt), k = synthetic.make_multiview(), synthetic.MULTIVIEW_DEFAULTS["num_classes"]
        return Dataset(name, x, y, xt, yt, num_classes=k, input_shape=tuple(x.shape[1:]))
    if name in ("cifar10", "cifar100", "svhn"):
        if data_dir is None:
            raise ValueError("dataset %s is read from local files: pass --data-dir (%s)" % (name, files.EXPECTED[name]))
        x, y, xt, yt, k = files.load(name, data_dir)
        prep = files.ImagePrep(files.MEAN_STD[name], flip=name != "svhn", augment=augment)
        return Dataset(name, x, y, xt, yt, num_classes=k, input_shape=(3, 32, 32), prepare=prep)
    raise ValueError("unknown dataset %r; choose one of %s" % (name, ", ".join(DATASETS)))
