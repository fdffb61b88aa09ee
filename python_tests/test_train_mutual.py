"""`kdops mutual` (Deep Mutual Learning): one batch's update against the pairwise definition, both update orders,
files, per-peer checkpoints usable as teachers, resume, and bad command lines."""

import json
import os

import pytest
import torch
import torch.nn.functional as TF

from conftest import read_metrics
from kdops import reference as R
from kdops.train import cli, models, mutual
from kdops.train.runlog import load_checkpoint

TINY = ["--dataset", "mnist1d", "--train-subset", "256", "--test-subset", "128", "--batch-size", "32",
        "--threads", "1", "--no-progress"]


def run(*argv):
    assert cli.main([str(a) for a in argv]) == 0


def args_for(**kw):
    argv = ["--out", "unused"] + sum([["--" + k.replace("_", "-"), str(v)] for k, v in kw.items()
                                      if not isinstance(v, bool)], [])
    argv += ["--" + k.replace("_", "-") for k, v in kw.items() if v is True]
    return mutual.build_parser().parse_args(argv)


@pytest.mark.parametrize("sequential", [False, True])
def test_one_batch_follows_the_pairwise_definition(sequential):
    # plain SGD (lr 0.1, no momentum or decay): each peer's step is -0.1 * grad of CE_i + lam T^2 sum_{j != i}
    # KL(p_j || p_i), the others detached; in sequential order peer i sees the peers before it already updated
    torch.manual_seed(0)
    peers = [models.build("mlp-s", 5, (8,)) for _ in range(3)]
    ref_peers = [models.build("mlp-s", 5, (8,)) for _ in range(3)]
    for a, b in zip(ref_peers, peers):
        a.load_state_dict(b.state_dict())
    x, y = torch.randn(16, 8), torch.randint(0, 5, (16,))
    args = args_for(temperature=2.0, mutual_weight=0.7, sequential=sequential)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in peers]
    mutual.train_batch(peers, opts, x, y, args)
    ref_opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in ref_peers]
    if not sequential:
        outs = [m(x) for m in ref_peers]
    for i, (m, o) in enumerate(zip(ref_peers, ref_opts)):
        if sequential:
            outs = [p(x) for p in ref_peers]
        loss = TF.cross_entropy(outs[i], y) + 0.7 * R.mutual_kd_loss(outs, temperature=2.0)[i]
        o.zero_grad()
        grads = torch.autograd.grad(loss, list(m.parameters()), retain_graph=True)
        for p, g in zip(m.parameters(), grads):
            p.grad = g
        if sequential:
            o.step()
    if not sequential:
        for o in ref_opts:
            o.step()
    for a, b in zip(peers, ref_peers):
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_run_files_resume_and_peers_as_teachers(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    common = ["mutual", "--model", "cnn1d-s", "--model", "cnn1d-m", "--epochs", 2, *TINY]
    run(*common, "--out", full)
    rows = read_metrics(full)
    assert [r["epoch"] for r in rows] == [1, 2] and all(len(r["peer_test_acc"]) == 2 for r in rows)
    assert all(r["test_acc"] == pytest.approx(sum(r["peer_test_acc"]) / 2) for r in rows)
    summary = json.load(open(os.path.join(full, "summary.json")))
    assert summary["models"] == ["cnn1d-s", "cnn1d-m"] and summary["final_test_acc"] == rows[-1]["test_acc"]
    assert 0 <= summary["ensemble_final_test_acc"] <= 1 and os.path.getsize(os.path.join(full, "curves.png")) > 1000
    # interrupted after epoch 1, resumed: the same history as the uninterrupted run
    run(*common, "--out", part, "--stop-after", 1)
    assert len(read_metrics(part)) == 1 and not os.path.exists(os.path.join(part, "summary.json"))
    run(*common, "--out", part, "--resume")
    again = read_metrics(part)
    assert [r["peer_test_acc"] for r in again] == [r["peer_test_acc"] for r in rows]
    # each peer alone is a teacher checkpoint with its own weights
    ck = load_checkpoint(os.path.join(full, "peer1"))
    assert ck["kind"] == "teacher" and ck["model"] == "cnn1d-m" and ck["epoch"] == 2
    whole = load_checkpoint(full)
    assert all(torch.equal(ck["model_state"][k], v) for k, v in whole["peers"][1]["model_state"].items())
    run("distill", "--method", "kd", "--teacher", os.path.join(full, "peer1"), "--model", "cnn1d-s", "--epochs", 1,
        "--out", str(tmp_path / "kd"), *TINY)


def test_sequential_differs_from_simultaneous(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run("mutual", "--peers", 2, "--epochs", 1, "--out", a, *TINY)
    run("mutual", "--peers", 2, "--epochs", 1, "--out", b, "--sequential", *TINY)
    sa, sb = load_checkpoint(a)["peers"][0]["model_state"], load_checkpoint(b)["peers"][0]["model_state"]
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("extra, message", [
    (["--peers", "1"], "--peers must be >= 2"),
    (["--peers", "3", "--model", "cnn1d-s", "--model", "cnn1d-m"], "--model given 2 times for 3 peers"),
    (["--model", "no-such-net"], "unknown model"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--sync-bn"], "no --sync-bn"),
    (["--scheme", "kdcl", "--sequential"], "--scheme kdcl updates every peer against one shared target"),
])
def test_bad_command_lines(tmp_path, capsys, extra, message):
    assert cli.main(["mutual", "--epochs", "1", "--out", str(tmp_path / "x"), *TINY, *extra]) == 2
    assert message in capsys.readouterr().err


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = str(tmp_path / "r")
    run("mutual", "--epochs", 1, "--out", out, *TINY)
    before = os.path.getmtime(os.path.join(out, "checkpoint.pt"))
    assert cli.main(["mutual", "--epochs", "1", "--out", out, *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    assert os.path.getmtime(os.path.join(out, "checkpoint.pt")) == before


def test_minlogit_target_against_known_numbers():
    y = torch.tensor([0, 2])
    a = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 4.0]])
    b = torch.tensor([[2.0, 1.5, -2.0], [0.0, 3.0, 2.0]])
    # a - a[y]: [[0, -2, -3], [-3, -2, 0]]; b - b[y]: [[0, -0.5, -4], [-2, 1, 0]]; min: [[0, -2, -4], [-3, -2, 0]]
    assert torch.equal(mutual.kdcl_target([a, b], y, "minlogit"), torch.tensor([[0.0, -2.0, -4.0], [-3.0, -2.0, 0.0]]))
    assert torch.equal(mutual.kdcl_target([a, b], y, "mean"), (a + b) / 2)


@pytest.mark.parametrize("target", ["mean", "minlogit"])
def test_kdcl_batch_follows_the_definition(target):
    # plain SGD: peer m's step is -0.1 * grad of CE_m + lam T^2 KL(softmax(t / T) || softmax(z_m / T)), with t the
    # detached target of every peer's logits on its own input
    torch.manual_seed(0)
    peers = [models.build("mlp-s", 5, (8,)) for _ in range(3)]
    ref = [models.build("mlp-s", 5, (8,)) for _ in range(3)]
    for a, b in zip(ref, peers):
        a.load_state_dict(b.state_dict())
    xs, y = [torch.randn(16, 8) for _ in range(3)], torch.randint(0, 5, (16,))
    args = args_for(temperature=3.0, mutual_weight=0.6, scheme="kdcl", kdcl_target=target)
    mutual.train_batch(peers, [torch.optim.SGD(m.parameters(), lr=0.1) for m in peers], xs, y, args)
    outs = [m(x) for m, x in zip(ref, xs)]
    z = torch.stack(outs).detach()
    t = z.mean(0) if target == "mean" else (z - z.gather(2, y.view(1, -1, 1).expand(3, -1, 1))).min(0).values
    for m, out in zip(ref, outs):
        kl = TF.kl_div(TF.log_softmax(out / 3, 1), TF.softmax(t / 3, 1), reduction="batchmean") * 9
        loss = TF.cross_entropy(out, y) + 0.6 * kl
        grads = torch.autograd.grad(loss, list(m.parameters()), retain_graph=True)
        with torch.no_grad():
            for p, g in zip(m.parameters(), grads):
                p -= 0.1 * g
    for a, b in zip(peers, ref):
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_kdcl_run_resumes_and_differs_from_dml(tmp_path):
    common = ["mutual", "--peers", 2, "--scheme", "kdcl", "--kdcl-target", "minlogit", "--temperature", 2,
              "--epochs", 2, *TINY]
    run(*common, "--out", tmp_path / "full")
    run(*common, "--out", tmp_path / "part", "--stop-after", 1)
    run(*common, "--out", tmp_path / "part", "--resume")
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert a["history"][-1]["peer_test_acc"] == b["history"][-1]["peer_test_acc"]
    for pa, pb in zip(a["peers"], b["peers"]):
        assert all(torch.equal(pa["model_state"][k], pb["model_state"][k]) for k in pa["model_state"])
    s = json.load(open(tmp_path / "full" / "summary.json"))
    assert s["scheme"] == "kdcl" and s["kdcl_target"] == "minlogit"
    assert cli.main(["mutual", "--peers", 2, "--scheme", "kdcl", "--temperature", 2, "--epochs", 2, *TINY,
                     "--out", str(tmp_path / "full"), "--resume"]) == 2  # another target: not the same run
    run("mutual", "--peers", 2, "--temperature", 2, "--epochs", 2, *TINY, "--out", tmp_path / "dml")
    d = load_checkpoint(tmp_path / "dml")["peers"][0]["model_state"]
    assert any(not torch.equal(d[k], a["peers"][0]["model_state"][k]) for k in d)
