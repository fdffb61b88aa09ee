import json
import os

import pytest
import torch

# CI runs the suite against installed builds (CPU-only, other torch versions): it names the install so that a
# suite which silently imported the checkout's own build fails instead.
if os.environ.get("KDOPS_EXPECT_INSTALL"):
    import kdops
    assert os.path.abspath(kdops.__file__).startswith(os.path.abspath(os.environ["KDOPS_EXPECT_INSTALL"])), (
        "the tests imported %s, not the build under test in %s" % (kdops.__file__, os.environ["KDOPS_EXPECT_INSTALL"]))

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def pytest_collection_modifyitems(items):
    """Marks every test that runs on a CUDA device `cuda` (device-parametrized ones and @needs_cuda ones), so
    that `pytest -m cuda` selects exactly the CUDA tests (the GPU check, tools/gpu_check.py, does)."""
    for item in items:
        spec = getattr(item, "callspec", None)
        on_cuda = spec is not None and any(str(v) == "cuda" or str(v).startswith("cuda:") for v in spec.params.values())
        if on_cuda or any(m.kwargs.get("reason") == needs_cuda.kwargs["reason"] for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def read_metrics(out):
    """The per-epoch rows a trainer run wrote to OUT/metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# A two-epoch trainer run on a slice of mnist1d, and a command that must succeed.
TINY_1D = ["--dataset", "mnist1d", "--train-subset", "256", "--test-subset", "128", "--batch-size", "32",
           "--threads", "1", "--no-progress", "--epochs", "2"]


def run_cli(*argv):
    from kdops.train import cli

    assert cli.main([str(a) for a in argv]) == 0
