"""Cached teachers: `kdops cache-teacher`, then `distill --teacher-cache`: the same run as with the teacher, the
top-k cache's renormalised teacher, resume, and every refusal."""

import os

import pytest
import torch

from conftest import TINY_1D, run_cli
from kdops import functional as KF
from kdops.train import cli, data, methods, models, teacher_cache
from kdops.train.data import files
from kdops.train.runlog import load_checkpoint

TINY = TINY_1D
run = run_cli


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    run("teacher", "--dataset", "mnist1d", "--model", "cnn1d-m", "--epochs", 2, "--train-subset", 512,
        "--out", d / "t", "--threads", 1, "--no-progress")
    run("cache-teacher", "--teacher", d / "t", "--dataset", "mnist1d", "--out", d / "full")
    run("cache-teacher", "--teacher", d / "t", "--dataset", "mnist1d", "--out", d / "top3", "--top-k", 3)
    return d


def teacher_logits(d):
    ck = load_checkpoint(d / "t")
    m = models.build(ck["model"], 10, ck["input_shape"])
    m.load_state_dict(ck["model_state"])
    with torch.no_grad():
        return m.eval()(data.load("mnist1d").x_train)


def test_cache_holds_the_teachers_logits_of_every_training_sample(caches):
    full = torch.load(caches / "full" / teacher_cache.FILE, weights_only=True)
    expect = teacher_logits(caches)
    assert full["n"] == len(expect) == 4000 and full["top_k"] is None
    torch.testing.assert_close(full["logits"], expect, rtol=1e-5, atol=1e-5)
    top = teacher_cache.CachedTeacher(torch.load(caches / "top3" / teacher_cache.FILE, weights_only=True))
    values, ids = expect.topk(3, 1)
    kept = torch.zeros_like(expect, dtype=torch.bool).scatter_(1, ids, True)
    torch.testing.assert_close(top.logits[kept].view(-1, 3), expect[kept].view(-1, 3), rtol=1e-5, atol=1e-5)
    assert torch.isneginf(top.logits[~kept]).all()


@pytest.mark.parametrize("method", ["kd", "dkd", "jsd"])
def test_distill_from_the_cache_is_the_run_with_the_teacher(caches, tmp_path, method):
    run("distill", "--method", method, "--teacher", caches / "t", "--out", tmp_path / "teacher", *TINY)
    run("distill", "--method", method, "--teacher-cache", caches / "full", "--out", tmp_path / "cache", *TINY)
    a, b = load_checkpoint(tmp_path / "teacher"), load_checkpoint(tmp_path / "cache")
    assert [r["train_loss"] for r in a["history"]] == pytest.approx([r["train_loss"] for r in b["history"]],
                                                                     rel=1e-5)
    for k in a["model_state"]:
        torch.testing.assert_close(a["model_state"][k], b["model_state"][k], rtol=1e-4, atol=1e-5)
    assert b["config"]["teacher_cache"] == str(caches / "full") and b["config"]["teacher"] == []


def test_top_k_cache_distils_the_renormalised_top_k_distribution(caches):
    entry = torch.load(caches / "top3" / teacher_cache.FILE, weights_only=True)
    t = teacher_cache.CachedTeacher(entry)
    idx = torch.tensor([5, 0, 77, 3000])
    s = torch.randn(4, 10, dtype=torch.float64)
    p = torch.zeros(4, 10, dtype=torch.float64).scatter_(1, entry["topk_ids"][idx],
                                                         torch.softmax(entry["topk_values"][idx].double() / 4, 1))
    log_q = torch.log_softmax(s / 4, 1)
    expect = 16 * (p * (torch.log(p.clamp_min(1e-300)) - log_q)).sum() / 4
    got = KF.kd_loss(s.float(), t.outputs(idx).logits, temperature=4.0)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got)


def test_resume_with_a_cache(caches, tmp_path):
    args = ["distill", "--method", "kd", "--teacher-cache", caches / "full", "--out", tmp_path / "r", *TINY]
    run(*args, "--stop-after", 1)
    run(*args, "--resume")
    run("distill", "--method", "kd", "--teacher-cache", caches / "full", "--out", tmp_path / "u", *TINY)
    a, b = load_checkpoint(tmp_path / "r")["model_state"], load_checkpoint(tmp_path / "u")["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert cli.main(["distill", "--method", "kd", "--teacher-cache", caches / "top3", "--out", tmp_path / "r",
                     "--resume", *TINY]) == 2  # another cache: not the same run


@pytest.mark.parametrize("extra, message", [
    (["--method", "fkd", "--teacher-cache", "full"], "holds the teacher's logits only; method fkd needs pooled"),
    (["--method", "dkd", "--teacher-cache", "top3"], "probability 0 outside its top 3 classes"),
    (["--method", "kd", "--teacher-cache", "full", "--teacher", "t"], "replaces --teacher"),
    (["--method", "none", "--teacher-cache", "full"], "method none uses no teacher"),
    (["--method", "kd", "--teacher-cache", "nowhere"], "no teacher_cache.pt there"),
])
def test_distill_refusals(caches, tmp_path, capsys, extra, message):
    extra = [str(caches / e) if e in ("full", "top3", "t", "nowhere") else e for e in extra]
    assert cli.main(["distill", *extra, "--out", str(tmp_path / "x"), *TINY]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_other_inputs_and_augmentation_are_refused(caches):
    method = methods.get("kd")
    args = cli.build_parser().parse_args(["distill", "--method", "kd", "--teacher-cache", str(caches / "full"),
                                          "--out", "unused"])
    d = data.load("mnist1d")
    teacher_cache.load_for_distill(args, d.subset(100), method, "cpu")  # a prefix of the cached samples: fits
    shifted = data.Dataset(d.name, d.x_train[1:101], d.y_train[1:101], d.x_test, d.y_test, d.num_classes,
                           d.input_shape, d.prepare)
    with pytest.raises(ValueError, match="made of other training inputs"):
        teacher_cache.load_for_distill(args, shifted, method, "cpu")
    augmented = data.Dataset(d.name, d.x_train, d.y_train, d.x_test, d.y_test, d.num_classes, d.input_shape,
                             files.ImagePrep(files.MEAN_STD["cifar10"], augment=True))
    with pytest.raises(ValueError, match="cached outputs do not match augmented inputs"):
        teacher_cache.load_for_distill(args, augmented, method, "cpu")
    with pytest.raises(ValueError, match="is of mnist1d .* trains on digits"):
        teacher_cache.load_for_distill(args, data.load("digits"), method, "cpu")


def test_cache_teacher_refusals(caches, tmp_path, capsys):
    cases = [(["--teacher", caches / "t", "--dataset", "mnist1d", "--out", caches / "full"], "already holds"),
             (["--teacher", caches / "t", "--dataset", "mnist1d", "--out", tmp_path / "a", "--top-k", 11],
              "exceeds the teacher's 10 classes"),
             (["--teacher", caches / "t", "--dataset", "digits", "--out", tmp_path / "b"], "trained on mnist1d"),
             (["--teacher", tmp_path / "none", "--dataset", "mnist1d", "--out", tmp_path / "c"], "not found")]
    run("mutual", "--peers", 2, "--model", "mlp-s", "--out", tmp_path / "m", *TINY)
    cases.append((["--teacher", tmp_path / "m", "--dataset", "mnist1d", "--out", tmp_path / "d"],
                  "is a mutual run: only a fixed teacher"))
    run("teacher", "--model", "cnn1d-s", "--out", tmp_path / "half", "--stop-after", 1, *TINY)
    cases.append((["--teacher", tmp_path / "half", "--dataset", "mnist1d", "--out", tmp_path / "e"],
                  "unfinished (1 of 2 epochs)"))
    for argv, message in cases:
        assert cli.main(["cache-teacher", *map(str, argv)]) == 2, message
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (message, err)
    assert not any(os.path.exists(tmp_path / x) for x in "abcde")
