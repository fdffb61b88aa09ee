"""The trainer as separate processes: a run killed mid-epoch resumes without losing completed epochs and ends
where an uninterrupted run ends, and a 2-process DDP run (gloo, CPU) matches a single-process run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import read_metrics
import torch

from kdops.train import cli
from kdops.train.runlog import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env():
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    e.pop("WORLD_SIZE", None)
    return e


metrics = read_metrics


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("teacher"))
    assert cli.main(["teacher", "--model", "cnn-m", "--epochs", "2", "--out", out, "--threads", "1",
                       "--no-progress"]) == 0
    return out


def test_killed_run_resumes_to_the_uninterrupted_result(teacher, tmp_path):
    args = ["distill", "--method", "kd", "--teacher", teacher, "--model", "cnn-s", "--epochs", "12", "--batch-size",
            "8", "--train-subset", "640", "--test-subset", "64", "--threads", "1", "--no-progress"]
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "kdops.train", *args, "--out", killed], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = os.path.join(killed, "checkpoint.pt")
    deadline = time.time() + 300
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # into the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    ck = load_checkpoint(killed)
    done = ck["epoch"]
    assert 1 <= done < 12 and not os.path.exists(os.path.join(killed, "summary.json"))
    before = ck["history"]
    assert len(before) == done

    resumed = subprocess.run([sys.executable, "-m", "kdops.train", *args, "--out", killed, "--resume"], cwd=ROOT,
                             env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    rows = metrics(killed)
    assert [r["epoch"] for r in rows] == list(range(1, 13))
    assert rows[:done] == before  # completed epochs kept as they were

    full = str(tmp_path / "full")
    assert cli.main([*args, "--out", full]) == 0
    a, b = load_checkpoint(full)["model_state"], load_checkpoint(killed)["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "epoch_time"} for r in rs]  # noqa: E731
    assert strip(metrics(full)) == strip(rows)


def test_ddp_two_processes_match_one(teacher, tmp_path):
    # an MLP student (no BatchNorm) and KD (a per-sample loss): the global batch's loss is the mean of the two
    # half-batch losses, so DDP's averaged gradients equal the single-process ones up to rounding
    args = ["distill", "--method", "kd", "--teacher", teacher, "--model", "mlp-s", "--epochs", "2", "--batch-size",
            "32", "--train-subset", "256", "--test-subset", "128", "--threads", "1", "--no-progress"]
    ddp = str(tmp_path / "ddp")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "kdops.train", *args, "--out", ddp], cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("epoch 2/2") == 1  # only rank 0 logs
    single = str(tmp_path / "single")
    assert cli.main([*args, "--out", single]) == 0
    a, b = load_checkpoint(single), load_checkpoint(ddp)
    for k in a["model_state"]:
        torch.testing.assert_close(b["model_state"][k], a["model_state"][k], rtol=1e-4, atol=1e-5)
    ra, rb = metrics(single), metrics(ddp)
    for x, y in zip(ra, rb):
        assert y["samples"] == x["samples"] == 256  # the two shards cover the data once
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-4
        assert abs(x["test_acc"] - y["test_acc"]) <= 1 / 128
    assert json.load(open(os.path.join(ddp, "summary.json")))["world_size"] == 2


RELATIONAL = """
import sys
import torch
from torch.distributed.nn.functional import all_gather
from kdops.train import cli, methods


def gram_loss(fs, ft, gather_distributed=False):
    # a relational loss: it compares the batch's similarity structures, so it needs the whole (global) batch
    if gather_distributed:
        fs, ft = torch.cat(all_gather(fs)), torch.cat(all_gather(ft))
    gs = torch.nn.functional.normalize(fs @ fs.T, dim=1)
    gt = torch.nn.functional.normalize(ft @ ft.T, dim=1)
    return ((gs - gt) ** 2).mean()


methods.register(methods.Method("gram", needs=("pooled",), build=methods.pair_term(gram_loss), distributed=True,
                                defaults={"loss_weight": 100.0}))
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ddp_relational_loss_sees_the_global_batch(teacher, tmp_path):
    # with gather_distributed the loss on every rank is the single-process loss of the whole batch, so the
    # DDP run matches one process; without the gather each rank would compare only its half of the batch
    script = tmp_path / "relational.py"
    script.write_text(RELATIONAL)
    args = ["distill", "--method", "gram", "--teacher", teacher, "--model", "mlp-s", "--epochs", "1", "--batch-size",
            "32", "--train-subset", "128", "--test-subset", "64", "--threads", "1", "--no-progress"]
    ddp, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), *args, "--out", ddp], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([sys.executable, str(script), *args, "--out", single], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_checkpoint(single), load_checkpoint(ddp)
    assert a["history"][0]["train_kd"] > 0
    assert abs(a["history"][0]["train_kd"] - b["history"][0]["train_kd"]) < 1e-5
    for k in a["model_state"]:
        torch.testing.assert_close(b["model_state"][k], a["model_state"][k], rtol=1e-4, atol=1e-5)
