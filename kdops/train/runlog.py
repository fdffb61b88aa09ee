"""The trainer's files: atomic checkpoints, metrics.jsonl, summary.json and the accuracy-curve plot."""

import json
import os

import torch

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CURVES = "curves.png"


def save_atomic(obj, path):
    """torch.save to a temporary file in the same directory, then rename: a reader (or a resumed run after a
    kill) sees the previous complete file or the new complete file, never a partial one."""
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_path(path):
    """A checkpoint file, or a run directory holding one."""
    return os.path.join(path, CHECKPOINT) if os.path.isdir(path) else path


def load_checkpoint(path, what="checkpoint"):
    file = checkpoint_path(path)
    if not os.path.isfile(file):
        raise FileNotFoundError("%s %s not found (a %s file or a run directory holding one)" % (what, path, CHECKPOINT))
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one, not a pickle traceback
        raise ValueError("%s %s is not a readable kdops checkpoint: %s" % (what, file, str(e).splitlines()[0]))
    if not isinstance(ckpt, dict) or ckpt.get("format") != 1:
        raise ValueError("%s %s is not a kdops trainer checkpoint" % (what, file))
    return ckpt


def write_metrics(out_dir, history):
    """Rewrites metrics.jsonl from the full history (atomically), so after a resume it holds each completed
    epoch exactly once."""
    path = os.path.join(out_dir, METRICS)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def write_summary(out_dir, summary):
    tmp = os.path.join(out_dir, SUMMARY + ".tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, SUMMARY))


def plot_curves(out_dir, history, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [r["train_acc"] for r in history], label="train")
    ax.plot(epochs, [r["test_acc"] for r in history], label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, CURVES), dpi=100)
    plt.close(fig)
