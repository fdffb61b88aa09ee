"""The examples run and learn: a broken loss (NaN, wrong sign, no gradient) would leave the distilled
student near chance (0.1 on these 10 classes)."""

import importlib.util
from pathlib import Path


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
