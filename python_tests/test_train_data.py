"""The trainer's datasets: bundled / generated sets, and CIFAR / SVHN read from small fake files."""

import random

import numpy as np
import pytest
import torch

import fake_data
from kdops.train import data
from kdops.train.data import files, synthetic


def test_digits_split_is_fixed_and_disjoint():
    d = data.load("digits")
    assert d.x_train.shape == (1438, 1, 8, 8) and d.x_test.shape == (359, 1, 8, 8)
    assert d.num_classes == 10 and set(d.y_train.tolist()) == set(range(10))
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    again = data.load("digits")
    assert torch.equal(d.x_test, again.x_test)
    train_rows = {tuple(r) for r in d.x_train.flatten(1).tolist()}
    overlap = sum(tuple(r) in train_rows for r in d.x_test.flatten(1).tolist())
    assert overlap < 5  # only digits that happen to be pixel-identical


def test_mnist1d_is_generated_offline_and_leaves_global_rngs_alone(monkeypatch):
    import requests

    def no_network(*a, **k):
        raise AssertionError("mnist1d tried to download")

    monkeypatch.setattr(requests, "get", no_network)
    synthetic.mnist1d.cache_clear()
    np.random.seed(123)
    random.seed(123)
    expect_np, expect_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    d = data.load("mnist1d")
    assert np.random.rand() == expect_np and random.random() == expect_py
    assert d.x_train.shape == (4000, 1, 40) and d.x_test.shape == (1000, 1, 40)
    assert d.input_shape == (1, 40) and set(d.y_test.tolist()) == set(range(10))
    assert abs(torch.cat([d.x_train, d.x_test]).std().item() - 1.0) < 1e-3  # the generator standardises


def test_multiview_is_seeded_and_each_class_spans_its_views():
    a, b = synthetic.make_multiview(seed=3), synthetic.make_multiview(seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = synthetic.make_multiview(seed=4)
    assert not torch.equal(a[0], c[0])
    x, y, xt, yt = synthetic.make_multiview(n_train=500, n_test=100, noise=0.0, distractors=1, distractor_scale=0.0)
    assert x.shape == (500, 64) and xt.shape == (100, 64)
    # without noise and distractors a sample is a positive combination of its class's views: a nearest class
    # mean classifier separates them well above chance (0.1)
    means = torch.stack([x[y == k].mean(0) for k in range(10)])
    acc = ((xt @ means.T).argmax(1) == yt).float().mean().item()
    assert acc > 0.8
    with pytest.raises(ValueError, match="unknown option"):
        synthetic.make_multiview(colours=3)


def test_multiview_views_shown_match_the_samples():
    # without noise and distractors a sample is sum over its shown views of w_v * dir_v, w_v in [0.5, 1.5]: its
    # projection on a view's direction is large exactly where that view is shown (the directions of one class
    # are nearly orthogonal in 64 dims)
    kw = dict(n_train=300, n_test=50, noise=0.0, distractors=1, distractor_scale=0.0)
    x, y, xt, yt, shown, shown_t = synthetic.make_multiview(return_views=True, **kw)
    assert all(torch.equal(a, b) for a, b in zip((x, y, xt, yt), synthetic.make_multiview(**kw)))
    assert shown.shape == (300, 4) and shown_t.shape == (50, 4) and shown.any(1).all()
    assert (shown.sum(1) == 1).any() and (shown.sum(1) > 1).any()
    # each class's views, recovered as the mean of its single-view samples showing that view
    single = shown.sum(1) == 1
    for k in range(3):
        for v in range(4):
            rows = (y == k) & single & shown[:, v]
            if rows.sum() >= 2:
                direction = torch.nn.functional.normalize(x[rows].mean(0), dim=0)
                proj = x[y == k] @ direction
                assert (proj[shown[y == k][:, v]].min() > proj[~shown[y == k][:, v]].max())


@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_from_pickle_batches(tmp_path, nested):
    written = fake_data.write_cifar10(str(tmp_path), nested=nested)
    d = data.load("cifar10", str(tmp_path))
    assert d.x_train.shape == (40, 3, 32, 32) and d.x_train.dtype == torch.uint8
    assert d.x_test.shape == (8, 3, 32, 32) and d.num_classes == 10
    raw = written["data_batch_2"][b"data"][3]
    assert torch.equal(d.x_train[8 + 3], torch.from_numpy(raw.reshape(3, 32, 32)))  # rows are R, G, B planes
    assert d.y_test.tolist() == written["test_batch"][b"labels"]


def test_cifar100_uses_fine_labels(tmp_path):
    written = fake_data.write_cifar100(str(tmp_path))
    d = data.load("cifar100", str(tmp_path))
    assert d.num_classes == 100 and d.x_train.shape == (40, 3, 32, 32)
    assert d.y_train.tolist() == written["train"][b"fine_labels"]


def test_svhn_from_mat_files(tmp_path):
    written = fake_data.write_svhn(str(tmp_path))
    d = data.load("svhn", str(tmp_path))
    x, y = written["train_32x32.mat"]
    assert d.x_train.shape == (12, 3, 32, 32)
    assert torch.equal(d.x_train[5], torch.from_numpy(np.transpose(x[:, :, :, 5], (2, 0, 1)).copy()))
    assert d.y_train.tolist() == [int(v) % 10 for v in y[:, 0]]
    assert set(d.y_train.tolist()) <= set(range(10))


@pytest.mark.parametrize("name, expected", [("cifar10", "data_batch_1"), ("cifar100", "cifar-100-python"),
                                            ("svhn", "train_32x32.mat")])
def test_missing_files_name_what_is_expected(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError, match=expected):
        data.load(name, str(tmp_path))
    with pytest.raises(ValueError, match="--data-dir"):
        data.load(name, None)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        data.load("imagenet")


def test_image_prep_normalises_and_crops_flips_from_the_generator():
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    mean_std = files.MEAN_STD["cifar10"]
    prep = files.ImagePrep(mean_std)
    mean, std = torch.tensor(mean_std[0]).view(1, 3, 1, 1), torch.tensor(mean_std[1]).view(1, 3, 1, 1)
    plain = (x.float() / 255 - mean) / std
    torch.testing.assert_close(prep(x, train=False), plain)
    out = prep(x, train=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, prep(x, train=True, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(out, plain)
    # every augmented image is a 32x32 window of the zero-padded image, possibly mirrored
    padded = torch.nn.functional.pad(x.float() / 255, (4, 4, 4, 4))
    img = out * std + mean
    for i in range(len(x)):
        windows = [padded[i, :, oy:oy + 32, ox:ox + 32] for oy in range(9) for ox in range(9)]
        windows += [w.flip(-1) for w in windows]
        assert min((img[i] - w).abs().max().item() for w in windows) < 1e-5
    no_flip = files.ImagePrep(mean_std, flip=False)(x, train=True, generator=torch.Generator().manual_seed(1))
    assert no_flip.shape == x.shape
    off = files.ImagePrep(mean_std, augment=False)(x, train=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(off, plain)
