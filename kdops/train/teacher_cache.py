"""Cached teachers: the teacher's logits on the training set computed once, then distillation without the
teacher's forward pass.

    python -m kdops.train cache-teacher --teacher runs/teacher --dataset mnist1d --out runs/teacher-cache [--top-k K]
    python -m kdops.train distill --method kd --teacher-cache runs/teacher-cache --dataset mnist1d --out runs/kd

``cache-teacher`` runs the teacher (eval mode, no augmentation) over every training sample of the dataset,
in the dataset's order, and writes ``DIR/teacher_cache.pt``: the fp32 logits (N, C) or, with ``--top-k K``,
only the K largest logits and their class ids per sample (the rest of the teacher's distribution is then
renormalised away: KD sees the teacher's softmax restricted to its top K classes), with a per-sample checksum
of the inputs. ``distill --teacher-cache DIR`` looks the rows of each batch up instead of running a teacher:

- only logit methods can use it (nothing but logits is cached); a top-k cache only with ``kd`` (forward KL,
  whose terms vanish where the teacher's probability is 0; the other divergences would be infinite there);
- the training inputs must be the cached ones: augmentation is refused with a one-line reason (a cached output
  does not match an augmented input), and the checksums of the (possibly --train-subset / --val-split) training
  set are checked against the cache's;
- the cache is of a fixed teacher: there is no cache of a trainable or online teacher (mutual learning's peers
  change every step), and ``cache-teacher`` takes a finished ``teacher`` or ``distill`` run.
"""

import os

import torch
from torch import nn

from kdops.train import cli, data, models, runlog
from kdops.train.models.base import Outputs

FILE = "teacher_cache.pt"


def _checksums(x):
    """One float64 number per sample: the sum of its inputs (catches another dataset, order or subset)."""
    return x.flatten(1).double().sum(1)


def build_parser():
    p = cli.Parser(prog="kdops cache-teacher", description=__doc__,
                   formatter_class=cli.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the teacher's run directory or checkpoint")
    p.add_argument("--dataset", default="digits", help="one of %s (default digits)" % ", ".join(data.DATASETS))
    p.add_argument("--data-dir", help="where cifar10 / cifar100 / svhn files are")
    p.add_argument("--out", required=True, help="the cache directory (created; never overwritten)")
    p.add_argument("--top-k", type=int, help="keep only the K largest logits per sample (default: all)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    return p


@torch.no_grad()
def cache_teacher(args):
    if args.top_k is not None and args.top_k < 1:
        raise ValueError("--top-k must be >= 1, got %d" % args.top_k)
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1, got %d" % args.batch_size)
    path = os.path.join(args.out, FILE)
    if os.path.exists(path):
        raise ValueError("%s already holds a teacher cache; choose another --out" % args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    ck = runlog.load_checkpoint(args.teacher, "teacher")
    cli.refuse_quantized(args.teacher, ck)
    if ck["kind"] not in ("teacher", "distill"):
        raise ValueError("teacher %s is a %s run: only a fixed teacher (a teacher or distill run) can be cached"
                         % (args.teacher, ck["kind"]))
    planned = ck["config"].get("epochs", ck["epoch"])  # a mutual peer's checkpoint records no plan
    if ck["epoch"] != planned:
        raise ValueError("teacher %s is unfinished (%d of %d epochs): finish it first (--resume)"
                         % (args.teacher, ck["epoch"], planned))
    dataset = data.load(args.dataset, args.data_dir, augment=False)
    if ck["dataset"] != dataset.name or tuple(ck["input_shape"]) != tuple(dataset.input_shape):
        raise ValueError("teacher %s was trained on %s %s, the cache is asked of %s %s"
                         % (args.teacher, ck["dataset"], tuple(ck["input_shape"]), dataset.name,
                            tuple(dataset.input_shape)))
    k = ck["num_classes"]
    if args.top_k is not None and args.top_k > k:
        raise ValueError("--top-k %d exceeds the teacher's %d classes" % (args.top_k, k))
    device = torch.device(args.device)
    model = models.build(ck["model"], k, ck["input_shape"])
    model.load_state_dict(ck["model_state"])
    model.to(device).eval()
    rows = []
    for i in range(0, len(dataset.y_train), args.batch_size):
        x = dataset.batch(dataset.x_train[i:i + args.batch_size].to(device))
        rows.append(model(x).float().cpu())
    logits = torch.cat(rows)
    entry = {"format": 1, "kind": "teacher-cache", "dataset": dataset.name, "num_classes": k,
             "input_shape": list(dataset.input_shape), "teacher": os.path.abspath(args.teacher),
             "teacher_model": ck["model"], "n": len(logits), "checksums": _checksums(dataset.x_train),
             "top_k": args.top_k, "train_acc": (logits.argmax(1) == dataset.y_train).double().mean().item()}
    if args.top_k is None:
        entry["logits"] = logits
    else:
        values, ids = logits.topk(args.top_k, dim=1)
        entry["topk_values"], entry["topk_ids"] = values, ids
    os.makedirs(args.out, exist_ok=True)
    runlog.save_atomic(entry, path)
    print("kdops cache-teacher: %d samples of %s, %s, teacher train acc %.4f -> %s"
          % (len(logits), dataset.name, "all %d logits" % k if args.top_k is None else "top %d logits" % args.top_k,
             entry["train_acc"], path), flush=True)
    return entry


class CachedTeacher(nn.Module):
    """A teacher read from a cache: ``outputs(idx)`` gives the cached logits of training samples ``idx`` (a
    top-k cache gives -inf outside the top k). Its forward serves the trainer's probe batch, which is the first
    training samples."""

    def __init__(self, entry):
        super().__init__()
        if entry.get("logits") is not None:
            logits = entry["logits"]
        else:
            logits = torch.full((entry["n"], entry["num_classes"]), float("-inf"))
            logits.scatter_(1, entry["topk_ids"], entry["topk_values"])
        self.register_buffer("logits", logits.float(), persistent=False)
        self.top_k = entry.get("top_k")

    def outputs(self, idx):
        return Outputs(self.logits[idx], None, None, None)

    def forward(self, x, features=False):
        out = self.outputs(torch.arange(x.shape[0], device=self.logits.device))
        return out if features else out.logits


def load_for_distill(args, dataset, method, device):
    """The CachedTeacher of ``--teacher-cache`` for a distill run, after every check that it fits."""
    path = args.teacher_cache
    file = os.path.join(path, FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError("--teacher-cache %s: no %s there (make one with kdops cache-teacher)" % (path, FILE))
    entry = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(entry, dict) or entry.get("kind") != "teacher-cache":
        raise ValueError("--teacher-cache %s is not a kdops teacher cache" % file)
    if args.teacher:
        raise ValueError("--teacher-cache replaces --teacher: give one or the other")
    if args.teacher_dataset:
        raise ValueError("--teacher-cache holds logits, which need the student's label space: no --teacher-dataset")
    if method.name == "none":
        raise ValueError("method none uses no teacher: drop --teacher-cache or choose a logit method")
    if not method.logits or tuple(method.needs) != ("logits",):
        raise ValueError("--teacher-cache holds the teacher's logits only; method %s needs %s: run the teacher "
                         "instead (--teacher)" % (method.name, ", ".join(method.needs)))
    if entry.get("top_k") is not None and method.name != "kd":
        raise ValueError("a top-k teacher cache gives the teacher probability 0 outside its top %d classes, where "
                         "method %s is infinite; use kd or a full cache" % (entry["top_k"], method.name))
    if dataset.prepare is not None and getattr(dataset.prepare, "augment", False):
        raise ValueError("--teacher-cache with augmentation on: cached outputs do not match augmented inputs "
                         "(pass --no-augment)")
    if entry["dataset"] != dataset.name or entry["num_classes"] != dataset.num_classes:
        raise ValueError("--teacher-cache %s is of %s (%d classes), the student trains on %s (%d classes)"
                         % (path, entry["dataset"], entry["num_classes"], dataset.name, dataset.num_classes))
    n = len(dataset.y_train)
    if n > entry["n"] or not torch.equal(entry["checksums"][:n], _checksums(dataset.x_train)):
        raise ValueError("--teacher-cache %s was made of other training inputs than this run's %d samples"
                         % (path, n))
    return CachedTeacher(entry).to(device)


def main(argv=None):
    return cli.run_command(cache_teacher, build_parser().parse_args(argv))
