"""The examples run and learn: a broken loss (NaN, wrong sign, no gradient) would leave the distilled
student near chance (0.1 on these 10 classes; a perplexity near 256 for the byte-level language models)."""

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest


def load(name):
    path = Path(__file__).resolve().parent.parent / "examples" / (name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kd_minimal_example_learns():
    results = load("kd_minimal").main(["--epochs", "5"])
    assert results["teacher"] > 0.9
    assert results["student + KD"] > 0.6


def test_lm_distill_example_learns(tmp_path):
    example = load("lm_distill")
    try:
        example.corpus_files()
    except SystemExit as e:  # a Python without its standard library's sources (an embedded or stripped build)
        pytest.skip(str(e))
    out = str(tmp_path / "run")
    results = example.main(["--quick", "--out", out, "--no-progress"])
    uniform = 256.0  # an untrained byte-level model
    # Observed with --quick, seeds 0 / 1 / 2 (test-split perplexity): teacher 12.5 / 12.5 / 13.7, student
    # 13.8 / 14.2 / 14.4, student + KD 13.7 / 13.7 / 14.8. Distillation beats the baseline in 2 of 3 seeds
    # only, so that is not asserted.
    assert results["teacher"] < uniform / 8
    assert results["teacher"] < results["student"]
    assert math.isfinite(results["student + KD"]) and results["student + KD"] < uniform / 8
    # a soft term that pulls the wrong way (or a mis-scaled gradient) shows as a distilled student far behind
    # the one trained alone
    assert results["student + KD"] < 1.25 * results["student"]
    assert results["temperature"] in (1.0, 2.0)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["test_ppl"]["student + KD"] == pytest.approx(results["student + KD"])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    runs = {r["run"] for r in rows}
    assert runs == {"teacher", "student", "student + KD (T=1)", "student + KD (T=2)"}
    assert all(sum(r["run"] == k for r in rows) == 80 for k in runs)
    assert os.path.getsize(os.path.join(out, "curves.png")) > 0
    # a run is never overwritten without --force (refused before anything is trained)
    with pytest.raises(SystemExit, match="already holds a run"):
        example.main(["--quick", "--out", out, "--no-progress"])
