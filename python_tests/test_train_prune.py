"""`distill --prune AMOUNT [--student-init RUN]`: global magnitude masks, pruned weights held at 0 through
training, a plain saved model, resume with the same masks, and refusals."""

import pytest
import torch

from conftest import TINY_1D, run_cli
from kdops.train import cli, compress, models
from kdops.train.runlog import load_checkpoint

TINY = TINY_1D
run = run_cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("prune")
    run("teacher", "--model", "cnn1d-m", "--out", d / "t", *TINY)
    run("teacher", "--model", "cnn1d-s", "--out", d / "s", *TINY)
    return d


def test_global_magnitude_masks():
    torch.manual_seed(0)
    m = models.build("cnn1d-s", 10, (1, 40))
    masks = compress.magnitude_masks(m, 0.7)
    weights = dict(m.named_parameters())
    flat = torch.cat([weights[k].detach().abs().flatten() for k in masks])
    kept = torch.cat([masks[k].flatten() for k in masks])
    assert kept.numel() == sum(w.numel() for _, w in compress.prunable(m))
    assert int((~kept).sum()) == round(0.7 * kept.numel())
    assert flat[kept].min() >= flat[~kept].max()  # every kept weight is at least as large as every pruned one
    assert set(masks) == {"convs.0.weight", "convs.1.weight", "convs.2.weight", "fc.weight"}
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"--prune must be in \(0, 1\)"):
            compress.magnitude_masks(m, bad)


@pytest.mark.parametrize("method", ["none", "kd"])
def test_pruned_weights_stay_zero_and_the_rest_start_from_the_init(runs, tmp_path, method):
    out = tmp_path / method
    teacher = [] if method == "none" else ["--teacher", runs / "t"]
    run("distill", "--method", method, *teacher, "--model", "cnn1d-s", "--student-init", runs / "s", "--prune", 0.8,
        "--out", out, *TINY)
    init = models.build("cnn1d-s", 10, (1, 40))
    init.load_state_dict(load_checkpoint(runs / "s")["model_state"])
    masks = compress.magnitude_masks(init, 0.8)
    ck = load_checkpoint(out)
    assert set(ck["prune_masks"]) == set(masks)
    for k, mask in masks.items():
        assert torch.equal(ck["prune_masks"][k], mask)
        w = ck["model_state"][k]
        assert torch.all(w[~mask] == 0) and torch.all(w[mask] != 0)
    assert not any("orig" in k or "mask" in k for k in ck["model_state"])  # a plain model
    s = models.build("cnn1d-s", 10, (1, 40))
    s.load_state_dict(ck["model_state"])
    assert compress.sparsity(s) == pytest.approx(0.8, abs=1e-3)
    import json
    assert json.load(open(out / "summary.json"))["sparsity"] == pytest.approx(compress.sparsity(s))


def test_resume_keeps_the_masks(runs, tmp_path):
    args = ["distill", "--method", "kd", "--teacher", runs / "t", "--model", "cnn1d-s", "--student-init", runs / "s",
            "--prune", 0.5, *TINY]
    run(*args, "--out", tmp_path / "r", "--stop-after", 1)
    run(*args, "--out", tmp_path / "r", "--resume")
    run(*args, "--out", tmp_path / "u")
    a, b = load_checkpoint(tmp_path / "r")["model_state"], load_checkpoint(tmp_path / "u")["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert cli.main(["distill", "--method", "kd", "--teacher", runs / "t", "--model", "cnn1d-s", "--student-init",
                     runs / "s", "--prune", 0.6, "--out", tmp_path / "r", "--resume", *TINY]) == 2


@pytest.mark.parametrize("extra, message", [
    (["--prune", "1.0"], r"--prune must be in (0, 1)"),
    (["--student-init", "T"], "--student-init {} is a cnn1d-m"),
    (["--student-init", "nowhere"], "not found"),
])
def test_refusals(runs, tmp_path, capsys, extra, message):
    extra = [str(runs / "t") if e == "T" else e for e in extra]
    assert cli.main(["distill", "--method", "none", "--model", "cnn1d-s", *extra, "--out", str(tmp_path / "x"),
                     *TINY]) == 2
    err = capsys.readouterr().err
    assert message.format(runs / "t") in err and len(err.strip().splitlines()) == 1
