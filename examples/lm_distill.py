"""Language-model distillation with kdops: a small byte-level causal transformer teacher, then a smaller student
trained with cross-entropy alone and with cross-entropy + forward KL through kdops.nn.FusedLinearKDLoss (the
lm_head fused with the divergence: the tokens x vocab logits are never formed), on the standard library's own
Python sources (no downloads).

    python examples/lm_distill.py [--out runs/lm_distill] [--force] [--steps 300] [--seed 0] [--quick]

The corpus: the top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``, sorted by name, as bytes
(vocabulary 256); every 20th file is the validation split, the one after it the test split, the rest train
(so the corpus depends on the Python version only). The teacher and the baseline student minimise
``F.cross_entropy`` of ``lm_head(hidden)``; the distilled student minimises ``FusedLinearKDLoss(divergence="kl",
temperature=T, scale_t2=True, soft_weight=1 - hard_weight, hard_weight=hard_weight)`` of its final hidden
states and lm_head weight against the frozen teacher's. The students start from the same init and are trained in
lockstep on the same batches (the same seed, the same steps and schedule); T is chosen on the validation split
among ``--temperatures`` (each candidate is a full student run). The final table is the perplexity,
exp(mean per-token CE), on the validation split (where T was chosen) and on the test split (which chose nothing;
main() returns these). Written to --out: metrics.jsonl (one row per run and step: lr, train loss, and the
validation perplexity every --eval-every steps), summary.json and curves.png (validation perplexity per step).
A directory that already holds a run is refused unless --force.
"""

import argparse
import copy
import hashlib
import json
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import kdops

METRICS, SUMMARY, CURVES = "metrics.jsonl", "summary.json", "curves.png"
VOCAB = 256  # bytes


# ----------------------------------------------------------------------------------------------------- corpus

def corpus_files(root=None):
    """The corpus files: the standard library's top-level .py sources, sorted by name (a fixed list for a
    given Python version)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if len(files) < 40:
        raise SystemExit("lm_distill: only %d .py files in %s; the corpus needs the standard library's sources"
                         % (len(files), root))
    return files


def load_corpus(files):
    """(train, val, test) uint8 tensors: file i goes to val when i % 20 == 0, to test when i % 20 == 1, else to
    train; files are joined by a blank line. Also the sha256 of the three splits (the corpus' fingerprint)."""
    parts = {"train": [], "val": [], "test": []}
    for i, f in enumerate(files):
        parts["val" if i % 20 == 0 else "test" if i % 20 == 1 else "train"].append(f.read_bytes() + b"\n\n")
    data = {k: b"".join(v) for k, v in parts.items()}
    digest = hashlib.sha256(b"".join(data[k] for k in ("train", "val", "test"))).hexdigest()
    return {k: torch.frombuffer(bytearray(v), dtype=torch.uint8).long() for k, v in data.items()}, digest


def random_windows(tokens, batch_size, ctx, gen):
    """A batch of `batch_size` random windows: inputs (B, ctx) and their next tokens (B, ctx)."""
    start = torch.randint(0, len(tokens) - ctx - 1, (batch_size,), generator=gen)
    idx = start[:, None] + torch.arange(ctx + 1)
    w = tokens[idx]
    return w[:, :-1], w[:, 1:]


def eval_windows(tokens, ctx, max_tokens):
    """Consecutive non-overlapping windows from the start of a split (at most `max_tokens` predicted tokens): a
    fixed evaluation set."""
    n = min((len(tokens) - 1) // ctx, max(1, max_tokens // ctx))
    w = tokens[:n * ctx + 1]
    return w[:-1].reshape(n, ctx), w[1:].reshape(n, ctx)


# ----------------------------------------------------------------------------------------------------- models

class Block(nn.Module):
    """Pre-LN transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # the causal mask
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Decoder-only byte LM: token + learned position embeddings, `layers` blocks, a final LayerNorm.
    ``forward(ids)`` gives the final hidden states (B, L, d); the logits are ``lm_head(hidden)``, kept
    separate so that the fused loss takes ``lm_head.weight`` itself."""

    def __init__(self, d, layers, heads, ctx, vocab=VOCAB):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for b in self.blocks:
            x = b(x)
        return self.ln_f(x)


def param_count(model):
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------- training

def ce_loss(model, ids, target):
    """Plain next-token cross-entropy, mean over tokens (the teacher's and the baseline student's loss, and
    the evaluation's)."""
    logits = model.lm_head(model(ids))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


@torch.no_grad()
def perplexity(model, windows, batch_size=64):
    """exp(mean per-token CE) over a fixed set of windows."""
    was = model.training
    model.eval()
    x, y = windows
    total = 0.0
    for i in range(0, len(x), batch_size):
        total += ce_loss(model, x[i:i + batch_size], y[i:i + batch_size]).item() * y[i:i + batch_size].numel()
    model.train(was)
    return math.exp(total / y.numel())


def lr_at(step, steps, lr, warmup):
    """Linear warmup, then cosine decay to 10% of `lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_phase(runs, steps, args, splits, val_windows, rows, teacher=None, desc="train"):
    """Trains the models of `runs` ({name: (model, kd_loss or None)}) in lockstep for `steps` steps, each with
    its own AdamW, on the same random training windows (a generator seeded with args.seed: every run, in every
    phase, sees the same batches in the same order). A run without a loss minimises the plain CE; one with
    `kd_loss` minimises kd_loss(student hidden, student lm_head.weight, teacher hidden, teacher lm_head.weight,
    target), the frozen teacher's hidden states computed once per step under no_grad. Appends one row per run and
    step to `rows`; returns {name: validation perplexity curve [(step, ppl)]} and {name: seconds}."""
    from tqdm import tqdm

    warmup = args.warmup if args.warmup is not None else max(1, min(30, steps // 2))
    gen = torch.Generator().manual_seed(args.seed)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
            for k, (m, _) in runs.items()}
    curves = {k: [(0, perplexity(m, val_windows))] for k, (m, _) in runs.items()}
    seconds = dict.fromkeys(runs, 0.0)
    t_teacher = 0.0
    for m, _ in runs.values():
        m.train()
    bar = tqdm(range(steps), desc=desc, disable=args.no_progress, dynamic_ncols=True)
    for step in bar:
        lr = lr_at(step, steps, args.lr, warmup)
        ids, target = random_windows(splits["train"], args.batch_size, args.ctx, gen)
        t_hidden = None
        if any(loss_fn is not None for _, loss_fn in runs.values()):
            t0 = time.perf_counter()
            with torch.no_grad():
                t_hidden = teacher(ids)
            t_teacher += time.perf_counter() - t0
        evaluate = (step + 1) % args.eval_every == 0 or step + 1 == steps
        postfix = {}
        for name, (model, loss_fn) in runs.items():
            t0 = time.perf_counter()
            opt = opts[name]
            for g in opt.param_groups:
                g["lr"] = lr
            if loss_fn is None:
                loss = ce_loss(model, ids, target)
            else:
                loss = loss_fn(model(ids), model.lm_head.weight, t_hidden, teacher.lm_head.weight, target=target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            row = {"run": name, "step": step + 1, "lr": lr, "train_loss": loss.item()}
            if not math.isfinite(row["train_loss"]):
                raise SystemExit("lm_distill: %s: the training loss is %r at step %d"
                                 % (name, row["train_loss"], step + 1))
            if evaluate:
                row["val_ppl"] = perplexity(model, val_windows)
                curves[name].append((step + 1, row["val_ppl"]))
            rows.append(row)
            seconds[name] += time.perf_counter() - t0
            postfix[name.replace("student + KD ", "KD ")] = "%.2f" % curves[name][-1][1]
        bar.set_postfix(val_ppl=" ".join("%s %s" % kv for kv in postfix.items()) if len(postfix) > 1
                        else next(iter(postfix.values())))
    bar.close()
    for m, _ in runs.values():
        m.eval()
    if t_hidden is not None:
        seconds["teacher forward"] = t_teacher
    return curves, seconds


# ------------------------------------------------------------------------------------------------------ files

def prepare_out(out, force):
    """Refuses a directory that already holds a run (any of this example's files) unless `force`; with `force`
    only those files are replaced, nothing else in the directory is touched."""
    ours = [f for f in (METRICS, SUMMARY, CURVES) if os.path.exists(os.path.join(out, f))]
    if ours and not force:
        raise SystemExit("lm_distill: %s already holds a run (%s); pass --force to overwrite it or choose another "
                         "--out" % (out, ", ".join(ours)))
    os.makedirs(out, exist_ok=True)
    for f in ours:
        os.remove(os.path.join(out, f))


def write_json_atomic(path, obj, lines=False):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        if lines:
            for row in obj:
                f.write(json.dumps(row) + "\n")
        else:
            json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def plot_curves(out, curves, title, chosen):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([s for s, _ in curve], [p for _, p in curve], label=name + (" (chosen)" if name == chosen else ""),
                linestyle="-" if not name.startswith("student + KD") or name == chosen else ":")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity (bytes)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, CURVES), dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------- main

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "lm_distill"), help="output directory")
    p.add_argument("--force", action="store_true", help="overwrite a previous run's files in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="student steps (default 300; --quick 80)")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default: --steps)")
    p.add_argument("--quick", action="store_true", help="a short run (~30 s on 2 idle cores) for the tests: 80 "
                                                        "steps, smaller val / test sets")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ctx", type=int, default=128, help="context length in bytes")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default 30, at most half the "
                                                            "steps; shorter warmups stall the teacher)")
    p.add_argument("--teacher-dim", type=int, default=128)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--student-dim", type=int, default=64)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--hard-weight", type=float, default=0.5, help="weight of the CE term; the KL gets 1 - it")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0],
                   help="candidate KD temperatures, chosen on the validation split")
    p.add_argument("--eval-every", type=int, default=None, help="steps between validation evaluations")
    p.add_argument("--eval-tokens", type=int, default=None, help="tokens of the val / test sets (default 32768; "
                                                                 "--quick 8192)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default). These models are too small to gain much from more "
                        "(0.13 vs 0.19 s per teacher step on 2 idle cores), and several threads on busy cores "
                        "can be many times slower")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    quick = args.quick
    if args.threads < 0:
        raise SystemExit("lm_distill: --threads must be >= 0, got %r" % args.threads)
    if args.steps is None:
        args.steps = 80 if quick else 300
    if args.teacher_steps is None:
        args.teacher_steps = args.steps
    if args.eval_tokens is None:
        args.eval_tokens = 8192 if quick else 32768
    if args.eval_every is None:
        args.eval_every = max(1, min(args.steps, args.teacher_steps) // 10)
    for arg in ("steps", "teacher_steps", "eval_tokens", "eval_every", "batch_size", "ctx"):
        if getattr(args, arg) < 1:
            raise SystemExit("lm_distill: --%s must be >= 1, got %r" % (arg.replace("_", "-"), getattr(args, arg)))
    if not 0 <= args.hard_weight <= 1:
        raise SystemExit("lm_distill: --hard-weight must be in [0, 1], got %r" % args.hard_weight)
    if not all(math.isfinite(T) and T > 0 for T in args.temperatures):
        raise SystemExit("lm_distill: --temperatures must be > 0, got %r" % args.temperatures)
    args.temperatures = list(dict.fromkeys(args.temperatures))
    prepare_out(args.out, args.force)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run_all(args)
    finally:  # main() may be called from a test: leave the process' thread count as it was
        torch.set_num_threads(threads)


def run_all(args):
    t_start = time.perf_counter()

    files = corpus_files()
    splits, digest = load_corpus(files)
    val_w = eval_windows(splits["val"], args.ctx, args.eval_tokens)
    test_w = eval_windows(splits["test"], args.ctx, args.eval_tokens)
    print("corpus: %d stdlib .py files, %s train / %s val / %s test bytes (sha256 %s...), vocabulary %d bytes"
          % (len(files), f"{len(splits['train']):,}", f"{len(splits['val']):,}", f"{len(splits['test']):,}",
             digest[:12], VOCAB))

    torch.manual_seed(args.seed)
    teacher = TinyLM(args.teacher_dim, args.teacher_layers, max(1, args.teacher_dim // 32), args.ctx)
    torch.manual_seed(args.seed + 1)
    init = TinyLM(args.student_dim, args.student_layers, max(1, args.student_dim // 32), args.ctx)
    print("teacher d=%d x %d layers (%s params), student d=%d x %d layers (%s params); %d teacher / %d student "
          "steps of %d x %d bytes, seed %d, %d threads"
          % (args.teacher_dim, args.teacher_layers, f"{param_count(teacher):,}", args.student_dim,
             args.student_layers, f"{param_count(init):,}", args.teacher_steps, args.steps, args.batch_size,
             args.ctx, args.seed, torch.get_num_threads()))
    rows = []
    curves, timings = train_phase({"teacher": (teacher, None)}, args.teacher_steps, args, splits, val_w, rows,
                                  desc="teacher")
    write_json_atomic(os.path.join(args.out, METRICS), rows, lines=True)  # the teacher's rows, before the students
    for p in teacher.parameters():
        p.requires_grad_(False)
    students = {"student": (copy.deepcopy(init), None)}  # the same init for all
    for T in args.temperatures:
        loss_fn = kdops.nn.FusedLinearKDLoss(divergence="kl", temperature=T, scale_t2=True,
                                             soft_weight=1.0 - args.hard_weight, hard_weight=args.hard_weight)
        students["student + KD (T=%g)" % T] = (copy.deepcopy(init), loss_fn)
    c, t = train_phase(students, args.steps, args, splits, val_w, rows, teacher=teacher,
                       desc="students (%d)" % len(students))
    curves.update(c)
    timings.update(t)
    write_json_atomic(os.path.join(args.out, METRICS), rows, lines=True)
    alone = students["student"][0]
    distilled = {T: students["student + KD (T=%g)" % T][0] for T in args.temperatures}
    val_kd = {T: curves["student + KD (T=%g)" % T][-1][1] for T in args.temperatures}
    best_T = min(args.temperatures, key=lambda T: val_kd[T])
    print("KD temperature chosen on the validation split: T=%g (%s)"
          % (best_T, ", ".join("T=%g: val ppl %.3f" % (T, p) for T, p in val_kd.items())))

    models = {"teacher": teacher, "student": alone, "student + KD": distilled[best_T]}
    val = {"teacher": curves["teacher"][-1][1], "student": curves["student"][-1][1], "student + KD": val_kd[best_T]}
    test = {k: perplexity(m, test_w) for k, m in models.items()}
    seconds = time.perf_counter() - t_start

    print()
    print("%-14s %10s %10s  (byte perplexity; uniform = %d)" % ("", "val ppl", "test ppl", VOCAB))
    for k in models:
        print("%-14s %10.3f %10.3f" % (k, val[k], test[k]))
    print("student + KD: forward KL, T=%g (chosen on val), hard_weight %g; %.1f s in all"
          % (best_T, args.hard_weight, seconds))

    summary = {"test_ppl": test, "val_ppl": val, "kd_val_ppl_by_temperature": {str(T): p for T, p in val_kd.items()},
               "temperature": best_T, "seconds": seconds, "train_seconds": timings,
               "config": {k: v for k, v in vars(args).items() if k not in ("force", "no_progress")},
               "corpus": {"files": [f.name for f in files], "sha256": digest,
                          "bytes": {k: len(v) for k, v in splits.items()}},
               "params": {"teacher": param_count(teacher), "student": param_count(init)},
               "torch": torch.__version__, "kdops": kdops.__version__}
    write_json_atomic(os.path.join(args.out, SUMMARY), summary)
    plot_curves(args.out, curves, "byte LM on stdlib sources (seed %d)" % args.seed, "student + KD (T=%g)" % best_T)
    print("wrote %s, %s and %s in %s" % (METRICS, SUMMARY, CURVES, args.out))
    return dict(test, temperature=best_T)


if __name__ == "__main__":
    main()
