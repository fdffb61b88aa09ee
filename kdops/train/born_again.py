"""Born-Again Networks (Furlanello et al. 2018): generations of one architecture, each distilled from the last.

    python -m kdops.train born-again --generations 3 --model cnn1d-s --dataset mnist1d --out runs/ban
    python -m kdops.train born-again --generations 2 --method dkd --beta 2 --out runs/ban-dkd

Generation 0 is trained on the labels alone (a ``kdops teacher`` run in ``OUT/gen0``). Generation g + 1 has the
same architecture and a fresh initialisation (seed ``--seed + 10007 (g + 1)``, so no two generations, and no
generation of one seed and another generation of a nearby seed, share an initialisation or a data order) and is
distilled from generation g with ``--method`` (default ``kd``; any distill method and its hyper-parameter flags)
in ``OUT/gen<g+1>``. Every generation is a plain run directory (checkpoint, ``metrics.jsonl``, ``summary.json``,
``curves.png``), kept, and usable as a ``--teacher``. Generation g + 1 is distilled from generation g's final
checkpoint.

The ensemble of generations is evaluated after each generation: the mean of the softmax of generations 1..g (the
paper's BAN ensemble) and of generations 0..g. ``OUT/summary.json`` holds per generation its test accuracy and
both ensembles' accuracies, ``OUT/generations.png`` plots them. ``--resume`` reuses finished generations and
continues the unfinished one from its last epoch; an existing OUT is never overwritten without it.
"""

import copy
import json
import os

import torch

from kdops.train import cli, methods, models, runlog

SEED_STRIDE = 10007
CONFIG = "born_again.json"
KEPT = ("dataset", "data_dir", "model", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
        "lr_schedule", "lr_milestones", "lr_gamma", "seed", "train_subset", "test_subset", "val_split", "augment",
        "generations", "method", "alpha", "beta", "temperature", "loss_weight", "ce_weight", "method_arg")


def build_parser():
    p = cli.Parser(prog="kdops born-again", description=__doc__,
                   formatter_class=cli.argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)
    p.add_argument("--generations", type=int, default=3, help="distilled generations after generation 0 (default 3)")
    cli.add_method_args(p, default="kd")
    return p


def generation_args(args, g):
    """The teacher (g = 0) or distill (g >= 1) arguments of generation g."""
    a = copy.copy(args)
    a.out = os.path.join(args.out, "gen%d" % g)
    a.seed = args.seed + SEED_STRIDE * g
    a.command = "teacher" if g == 0 else "distill"
    a.teacher = [] if g == 0 else [os.path.join(args.out, "gen%d" % (g - 1))]
    a.teacher_dataset = a.teacher_cache = None
    a.sync_bn = False
    return a


@torch.no_grad()
def probabilities(run, dataset, device, batch=512):
    """Softmax of one generation's final model on the evaluation set (test, or validation under --val-split)."""
    ck = runlog.load_checkpoint(run)
    model = models.build(ck["model"], ck["num_classes"], ck["input_shape"])
    model.load_state_dict(ck["model_state"])
    model.to(device).eval()
    out = []
    for i in range(0, len(dataset.y_test), batch):
        x = dataset.batch(dataset.x_test[i:i + batch].to(device))
        out.append(torch.softmax(model(x).double(), 1).cpu())
    return torch.cat(out)


def _acc(probs, y):
    return (probs.argmax(1) == y).double().mean().item()


def plot(out, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = [r["generation"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(gens, [r["test_acc"] for r in rows], "o-", label="generation alone")
    ax.plot(gens[1:], [r["ensemble_acc"] for r in rows[1:]], "s--", label="ensemble of generations 1..g")
    ax.plot(gens, [r["ensemble_all_acc"] for r in rows], "^:", label="ensemble of generations 0..g")
    ax.set_xlabel("generation")
    ax.set_ylabel("accuracy")
    ax.set_xticks(gens)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "generations.png"), dpi=100)
    plt.close(fig)


def check_args(args):
    cli.check_args(args)
    if args.generations < 1:
        raise ValueError("--generations must be >= 1 (generation 0 alone is `kdops teacher`), got %d"
                         % args.generations)
    method = methods.get(args.method)
    if method.name == "none":
        raise ValueError("--method none distils nothing: choose a method for generations 1..G (default kd)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("born-again runs in one process; launch each generation's distill under torchrun instead")
    method.hparams(cli.parse_method_args(args))  # an unknown hyper-parameter fails now, not after generation 0


def train(args):
    check_args(args)
    dataset = cli.load_dataset(args)
    args.model = args.model or cli.default_model(dataset, "student")  # every generation, gen0 included
    cfg = {k: getattr(args, k) for k in KEPT}
    cfg_file = os.path.join(args.out, CONFIG)
    if os.path.exists(cfg_file):
        if not args.resume:
            raise ValueError("%s already holds a run; pass --resume to continue it or choose another --out" % args.out)
        with open(cfg_file) as f:
            old = json.load(f)
        diff = [k for k in KEPT if old.get(k) != json.loads(json.dumps(cfg[k]))]
        if diff:
            raise ValueError("--resume: the run in %s used different %s" % (args.out, ", ".join(diff)))
    elif os.path.isdir(args.out) and os.listdir(args.out):
        raise ValueError("%s is not empty and holds no born-again run; choose another --out" % args.out)
    os.makedirs(args.out, exist_ok=True)
    with open(cfg_file + ".tmp", "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(cfg_file + ".tmp", cfg_file)

    device = torch.device(args.device)
    rows, probs = [], []
    for g in range(args.generations + 1):
        a = generation_args(args, g)
        if not os.path.exists(os.path.join(a.out, runlog.SUMMARY)):
            a.resume = os.path.exists(os.path.join(a.out, runlog.CHECKPOINT))
            print("kdops born-again: generation %d of %d -> %s" % (g, args.generations, a.out), flush=True)
            cli.train(a)
            if not os.path.exists(os.path.join(a.out, runlog.SUMMARY)):  # --stop-after ended it early
                print("kdops born-again: stopped in generation %d; continue with --resume" % g, flush=True)
                return None
        probs.append(probabilities(a.out, dataset, device))
        with open(os.path.join(a.out, runlog.SUMMARY)) as f:
            final = json.load(f)["final_test_acc"]
        row = {"generation": g, "run": a.out, "test_acc": final,
               "ensemble_all_acc": _acc(torch.stack(probs).mean(0), dataset.y_test),
               "ensemble_acc": _acc(torch.stack(probs[1:]).mean(0), dataset.y_test) if g else None}
        rows.append(row)
        print("generation %d  test acc %.4f  ensemble 1..%d %s  ensemble 0..%d %.4f"
              % (g, final, g, "-" if row["ensemble_acc"] is None else "%.4f" % row["ensemble_acc"], g,
                 row["ensemble_all_acc"]), flush=True)
    summary = {"command": "born-again", "dataset": dataset.name, "model": args.model, "method": args.method,
               "hp": methods.get(args.method).hparams(cli.parse_method_args(args)),
               "generations": rows, "evaluated_on": "validation" if args.val_split else "test",
               "final_test_acc": rows[-1]["test_acc"], "ensemble_acc": rows[-1]["ensemble_acc"],
               "ensemble_all_acc": rows[-1]["ensemble_all_acc"], "seed": args.seed, "epochs": args.epochs,
               # one epoch of every generation: epochs x this is the training time of the whole run
               "mean_epoch_time": sum(_epoch_time(r["run"]) for r in rows)}
    runlog.write_summary(args.out, summary)
    plot(args.out, rows)
    return summary


def _epoch_time(run):
    with open(os.path.join(run, runlog.SUMMARY)) as f:
        return json.load(f)["mean_epoch_time"]


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.command = "born-again"
    return cli.run_command(train, args)
