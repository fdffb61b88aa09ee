"""`kdops one` (ONE): the shared trunk and branches against plain networks, the gate, the loss against its
formula, the ramp-up, branch checkpoints as teachers, resume, and bad command lines."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as TF

from conftest import TINY_1D, run_cli

from kdops.train import cli, data, models, one
from kdops.train.runlog import load_checkpoint

TINY = TINY_1D
run = run_cli


@pytest.mark.parametrize("name, shape", [("cnn1d-s", (1, 40)), ("cnn-s", (1, 8, 8)), ("mlp-s", (64,))])
def test_branches_are_plain_networks_sharing_the_trunk(name, shape):
    torch.manual_seed(0)
    net = one.ONENet(name, 10, shape, 3).eval()
    x = torch.randn(6, *shape)
    z, gate, z_e = net(x)
    for i, plain in enumerate(net.nets):
        torch.testing.assert_close(z[i], plain(x))  # trunk + branch i is the plain model's forward
    layers = "convs" if net.kind == "conv" else "linears"
    assert getattr(net.nets[1], layers)[0] is getattr(net.nets[0], layers)[0]  # shared trunk
    assert getattr(net.nets[1], layers)[-1] is not getattr(net.nets[0], layers)[-1]  # own last stage
    torch.testing.assert_close(gate.sum(1), torch.ones(6))
    torch.testing.assert_close(z_e, sum(gate[:, i:i + 1] * z[i] for i in range(3)))
    shared = sum(p.numel() for p in net.parameters())
    assert shared < 3 * sum(p.numel() for p in models.build(name, 10, shape).parameters())


def test_loss_follows_the_formula_and_detaches_the_target():
    torch.manual_seed(0)
    z = torch.randn(3, 8, 5, requires_grad=True)
    z_e = torch.randn(8, 5, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    total, ce, kd = one.one_loss(z, z_e, y, 0.4, 3.0)
    ref_ce = sum(TF.cross_entropy(z[i], y) for i in range(3)) + TF.cross_entropy(z_e, y)
    ref_kd = sum(TF.kl_div(TF.log_softmax(z[i] / 3, 1), TF.softmax(z_e.detach() / 3, 1), reduction="batchmean") * 9
                 for i in range(3))
    torch.testing.assert_close(ce, ref_ce)
    torch.testing.assert_close(kd, ref_kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, ref_ce + 0.4 * ref_kd, rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(total, z_e)[0]
    torch.testing.assert_close(g, torch.autograd.grad(TF.cross_entropy(z_e, y), z_e)[0])  # the target is detached


def test_rampup():
    assert one.rampup(0, 80) == pytest.approx(math.exp(-5))
    assert one.rampup(40, 80) == pytest.approx(math.exp(-1.25))
    assert one.rampup(80, 80) == one.rampup(200, 80) == one.rampup(0, 0) == 1.0


def test_run_resume_and_branches_as_teachers(tmp_path):
    common = ["one", "--branches", 2, "--model", "cnn1d-s", "--rampup", 1, *TINY]
    run(*common, "--out", tmp_path / "full")
    run(*common, "--out", tmp_path / "part", "--stop-after", 1)
    run(*common, "--out", tmp_path / "part", "--resume")
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert rows[0]["kd_weight"] == pytest.approx(math.exp(-5)) and rows[1]["kd_weight"] == 1.0
    s = json.load(open(tmp_path / "full" / "summary.json"))
    assert s["final_test_acc"] == pytest.approx(sum(s["branch_final_test_acc"]) / 2)
    # a branch checkpoint is the plain network: its accuracy is the branch's, and it distils like a teacher
    ck = load_checkpoint(tmp_path / "full" / "branch1")
    net = models.build("cnn1d-s", 10, (1, 40))
    net.load_state_dict(ck["model_state"])
    d = data.load("mnist1d").subset(256, 128)
    with torch.no_grad():
        acc = (net.eval()(d.x_test).argmax(1) == d.y_test).double().mean().item()
    assert acc == pytest.approx(s["branch_final_test_acc"][1], abs=1e-12)
    run("distill", "--method", "kd", "--teacher", tmp_path / "full" / "branch1", "--out", tmp_path / "kd", *TINY)
    assert cli.main([*map(str, common), "--out", str(tmp_path / "full")]) == 2  # never overwritten


@pytest.mark.parametrize("extra, message", [
    (["--branches", "1"], "--branches must be >= 2"),
    (["--model", "resnet20"], "image inputs"),
    (["--temperature", "0"], "--temperature must be > 0"),
])
def test_bad_command_lines(tmp_path, capsys, extra, message):
    assert cli.main(["one", "--out", str(tmp_path / "x"), *TINY, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x")
