"""`kdops born-again`: each generation is the distill run from the previous one, fresh seeds, the ensembles of
generations recomputed from the checkpoints, resume against an uninterrupted run, and bad command lines."""

import json
import os

import pytest
import torch

from conftest import TINY_1D, run_cli
from kdops.train import born_again, cli, data, models
from kdops.train.runlog import load_checkpoint

TINY = TINY_1D
run = run_cli


def summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def ban(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ban") / "run")
    run("born-again", "--generations", 2, "--model", "cnn1d-s", "--seed", 3, "--temperature", 2, "--out", out, *TINY)
    return out


def test_every_generation_is_kept_and_distilled_from_the_previous(ban, tmp_path):
    s = summary(ban)
    assert [r["generation"] for r in s["generations"]] == [0, 1, 2]
    seeds = []
    for g in range(3):
        ck = load_checkpoint(os.path.join(ban, "gen%d" % g))
        assert ck["model"] == "cnn1d-s" and ck["epoch"] == 2
        assert ck["kind"] == ("teacher" if g == 0 else "distill")
        assert ck["config"]["teacher"] == ([] if g == 0 else [os.path.join(ban, "gen%d" % (g - 1))])
        seeds.append(ck["config"]["seed"])
    assert seeds == [3, 3 + born_again.SEED_STRIDE, 3 + 2 * born_again.SEED_STRIDE]
    assert load_checkpoint(os.path.join(ban, "gen1"))["config"]["hp"]["temperature"] == 2.0
    # generation 2 is exactly `kdops distill` from generation 1 with the generation's seed
    alone = str(tmp_path / "alone")
    run("distill", "--method", "kd", "--temperature", 2, "--teacher", os.path.join(ban, "gen1"), "--model", "cnn1d-s",
        "--seed", 3 + 2 * born_again.SEED_STRIDE, "--out", alone, *TINY)
    a, b = load_checkpoint(alone)["model_state"], load_checkpoint(os.path.join(ban, "gen2"))["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert s["generations"][2]["test_acc"] == summary(alone)["final_test_acc"] == s["final_test_acc"]


def test_ensembles_are_the_mean_of_the_generations_probabilities(ban):
    d = data.load("mnist1d").subset(256, 128)
    probs = []
    for g in range(3):
        ck = load_checkpoint(os.path.join(ban, "gen%d" % g))
        m = models.build(ck["model"], ck["num_classes"], ck["input_shape"])
        m.load_state_dict(ck["model_state"])
        with torch.no_grad():
            probs.append(torch.softmax(m.eval()(d.x_test).double(), 1))
    acc = lambda p: (p.argmax(1) == d.y_test).double().mean().item()  # noqa: E731
    rows = summary(ban)["generations"]
    for g, row in enumerate(rows):
        assert row["test_acc"] == pytest.approx(acc(probs[g]), abs=1e-12)
        assert row["ensemble_all_acc"] == pytest.approx(acc(sum(probs[:g + 1]) / (g + 1)), abs=1e-12)
        expect = None if g == 0 else acc(sum(probs[1:g + 1]) / g)
        assert row["ensemble_acc"] == (None if expect is None else pytest.approx(expect, abs=1e-12))
    assert os.path.getsize(os.path.join(ban, "generations.png")) > 1000


def test_resume_matches_an_uninterrupted_run(ban, tmp_path):
    out = str(tmp_path / "r")
    args = ["born-again", "--generations", 2, "--model", "cnn1d-s", "--seed", 3, "--temperature", 2, "--out", out,
            *TINY]
    run(*args, "--stop-after", 1)  # ends generation 0 after its first epoch
    assert load_checkpoint(os.path.join(out, "gen0"))["epoch"] == 1 and not os.path.exists(os.path.join(out, "gen1"))
    assert cli.main(args) == 2  # an existing run is never overwritten
    run(*args, "--resume")
    assert summary(out)["generations"] == [dict(r, run=r["run"].replace(ban, out)) for r in summary(ban)["generations"]]
    before = os.path.getmtime(os.path.join(out, "gen1", "checkpoint.pt"))
    run(*args, "--resume")  # finished generations are reused, not retrained
    assert os.path.getmtime(os.path.join(out, "gen1", "checkpoint.pt")) == before


@pytest.mark.parametrize("extra, message", [
    (["--generations", "0"], "--generations must be >= 1"),
    (["--method", "none"], "--method none distils nothing"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--method-arg", "gamma=2"], "method kd has no hyper-parameter gamma"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    assert cli.main(["born-again", "--out", str(tmp_path / "x"), *TINY, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x")


def test_resume_with_other_options_is_refused(ban, capsys):
    assert cli.main(["born-again", "--generations", 3, "--model", "cnn1d-s", "--seed", 3, "--out", ban, "--resume",
                     *TINY]) == 2
    assert "used different generations, temperature" in capsys.readouterr().err
