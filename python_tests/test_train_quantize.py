"""`distill --quantize int8`: every conv / linear of the student fake-quantized and then converted to int8, the
run's accuracy the converted model's, a plain float checkpoint, the saved int8 program, resume, feature methods,
and refusals."""

import json
import os
from collections import Counter

import pytest
import torch

from conftest import TINY_1D, run_cli
from kdops.train import cli, data, models, quantize
from kdops.train.runlog import load_checkpoint

pytest.importorskip("torchao")

TINY = TINY_1D
run = run_cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("qat")
    run("teacher", "--model", "cnn1d-m", "--out", d / "t", *TINY)
    run("teacher", "--model", "cnn1d-s", "--out", d / "s", *TINY)
    run("distill", "--method", "kd", "--teacher", d / "t", "--model", "cnn1d-s", "--student-init", d / "s",
        "--quantize", "int8", "--out", d / "q", *TINY)
    return d


def test_every_conv_and_linear_is_int8_and_the_accuracy_is_the_int8_models(runs):
    program = torch.export.load(str(runs / "q" / "quantized.pt2"))
    graph = program.module()
    ops = Counter(str(n.target) for n in graph.graph.nodes if n.op == "call_function")
    assert ops["aten.conv1d.default"] == 3 and ops["aten.linear.default"] == 1
    assert ops["quantized_decomposed.dequantize_per_channel.default"] == 4  # the four weights, int8 per channel
    assert not any("batch_norm" in k for k in ops)  # folded into the convolutions
    weights = [n.args[0] for n in graph.graph.nodes if "dequantize_per_channel" in str(n.target)]
    for w in weights:
        t = getattr(graph, w.target) if w.op == "get_attr" else None
        if t is not None:
            assert t.dtype == torch.int8
    d = data.load("mnist1d").subset(256, 128)
    with torch.no_grad():
        acc = (graph(d.x_test)[0].argmax(1) == d.y_test).double().mean().item()
    s = json.load(open(runs / "q" / "summary.json"))
    assert s["quantize"] == "int8" and s["final_test_acc"] == pytest.approx(acc, abs=1e-12)
    rows = [json.loads(line) for line in open(runs / "q" / "metrics.jsonl")]
    assert s["fake_quant_test_acc"] == rows[-1]["test_acc"]
    assert abs(s["final_test_acc"] - s["fake_quant_test_acc"]) <= 0.05  # int8 matches its fake quantization


def test_checkpoint_keeps_a_plain_float_model(runs):
    ck = load_checkpoint(runs / "q")
    m = models.build("cnn1d-s", 10, (1, 40))
    m.load_state_dict(ck["model_state"])  # strict: the plain model's keys exactly
    init = load_checkpoint(runs / "s")["model_state"]
    assert not torch.equal(ck["model_state"]["convs.0.weight"], init["convs.0.weight"])  # trained from the init
    assert any("activation_post_process" in k for k in ck["qat_state"])  # the observers, for --resume


def test_qat_starts_from_the_init_and_fake_quantizes_it():
    torch.manual_seed(0)
    m = models.build("cnn1d-s", 10, (1, 40)).eval()
    x = torch.randn(16, 1, 40)
    q = quantize.QATStudent(m, x[:2])
    q.eval()
    with torch.no_grad():
        a, b = m(x), q(x)
    assert not torch.equal(a, b)  # quantization changes the outputs ...
    torch.testing.assert_close(b, a, rtol=0.0, atol=0.15 * a.abs().max().item())  # ... a little
    out = q(x, features=True)
    assert out.pooled.shape == (16, 32) and [s.shape[1] for s in out.stages] == [8, 16, 32]


def test_resume_matches_an_uninterrupted_run(runs, tmp_path):
    args = ["distill", "--method", "kd", "--teacher", runs / "t", "--model", "cnn1d-s", "--student-init", runs / "s",
            "--quantize", "int8", *TINY]
    run(*args, "--out", tmp_path / "r", "--stop-after", 1)
    run(*args, "--out", tmp_path / "r", "--resume")
    a, b = load_checkpoint(tmp_path / "r"), load_checkpoint(runs / "q")
    assert all(torch.equal(a["qat_state"][k], b["qat_state"][k]) for k in b["qat_state"])
    assert json.load(open(tmp_path / "r" / "summary.json"))["final_test_acc"] == \
        json.load(open(runs / "q" / "summary.json"))["final_test_acc"]


def test_a_feature_method_trains_the_fake_quantized_features(runs, tmp_path):
    run("distill", "--method", "fkd", "--teacher", runs / "t", "--model", "cnn1d-s", "--quantize", "int8",
        "--out", tmp_path / "f", *TINY)
    rows = [json.loads(line) for line in open(tmp_path / "f" / "metrics.jsonl")]
    assert all(r["train_kd"] > 0 for r in rows)
    assert os.path.exists(tmp_path / "f" / "quantized.pt2")


def test_a_quantized_run_is_not_a_teacher(runs, tmp_path, capsys):
    assert cli.main(["distill", "--method", "kd", "--teacher", str(runs / "q"), "--out", str(tmp_path / "x"),
                     *TINY]) == 2
    assert "int8 quantization-aware run" in capsys.readouterr().err
    assert cli.main(["cache-teacher", "--teacher", str(runs / "q"), "--dataset", "mnist1d",
                     "--out", str(tmp_path / "c")]) == 2
    assert "cannot serve as a teacher" in capsys.readouterr().err


def test_refusals(runs, tmp_path, capsys):
    assert cli.main(["distill", "--method", "none", "--model", "cnn1d-s", "--quantize", "int8", "--prune", "0.5",
                     "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "one compression at a time" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["distill", "--method", "none", "--quantize", "int4", "--out", str(tmp_path / "y"), *TINY])
    assert e.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err

    class A:
        quantize, prune = "int8", None
    with pytest.raises(ValueError, match="--quantize int8 trains on CPU"):
        quantize.check(A, 1, torch.device("cuda"))
    with pytest.raises(ValueError, match="one process"):
        quantize.check(A, 2, torch.device("cpu"))
