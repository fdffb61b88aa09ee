"""Online distillation: N peers trained together from scratch, no pretrained teacher. Deep Mutual Learning
(Zhang et al. 2018, the default) or KDCL (Guo et al. 2020, ``--scheme kdcl``).

    python -m kdops.train mutual --peers 2 --model cnn1d-s --dataset mnist1d --epochs 20 --out runs/dml
    python -m kdops.train mutual --model cnn1d-s --model cnn1d-m --out runs/dml-mixed     (one peer per --model)

Peer i minimises CE(z_i, y) + lam * T^2 * sum_{j != i} KL(p_j || p_i) with the other peers' outputs detached
(``kdops.functional.mutual_kd_loss``: all N terms from one fused pass). ``--average-peers`` divides the sum by
N - 1 (the paper's average; the official code sums). By default every peer is updated on the same batch from the
same forward pass (what most PyTorch versions do); ``--sequential`` updates the peers one after another, each
against the others' current outputs (the official code's order: peer i sees peers < i already updated).

KDCL (``--scheme kdcl``): every peer sees its own draw of the augmentation of the batch (on data without
augmentation, the same inputs), and minimises CE(z_m, y) + lam * T^2 * KL(softmax(t / T) || softmax(z_m / T)) against
one shared target t built from all peers' logits and detached: their mean (``--kdcl-target mean``, what public
re-implementations use) or MinLogit (``--kdcl-target minlogit``: t_k = min_m (z_m,k - z_m,y), the paper's).

Each peer has its own optimiser and schedule (the shared flags). Every epoch appends to ``metrics.jsonl`` (per
peer test accuracy, their mean and the accuracy of the peers' ensemble, the mean of their probabilities) and
rewrites ``checkpoint.pt`` atomically (all peers, optimisers, schedules, RNG state, history); ``--resume``
continues from the last completed epoch. Each peer is also saved on its own as ``peer<i>/checkpoint.pt``, a
checkpoint that ``distill --teacher`` accepts. At the end: ``summary.json`` and ``curves.png``.
"""

import os
import time

import torch

from kdops import functional as KF
from kdops.train import cli, models, runlog

COMPARED_ON_RESUME = ("command", "dataset", "models", "peers", "epochs", "batch_size", "lr", "lr_schedule",
                      "lr_milestones", "lr_gamma", "optimizer", "momentum", "weight_decay", "seed", "train_subset",
                      "test_subset", "val_split", "augment", "temperature", "mutual_weight", "average_peers",
                      "sequential", "scheme", "kdcl_target")
SCHEMES = ("dml", "kdcl")
KDCL_TARGETS = ("mean", "minlogit")


def build_parser():
    p = cli.Parser(prog="kdops mutual", description=__doc__,
                   formatter_class=cli.argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p, multi_model=True)
    p.add_argument("--peers", type=int, help="number of peers (default: one per --model, or 2)")
    p.add_argument("--temperature", type=float, default=1.0, help="T of the mutual term (default 1, as DML)")
    p.add_argument("--mutual-weight", type=float, default=1.0, help="lam, the weight of the mutual term (default 1)")
    p.add_argument("--average-peers", action="store_true", help="divide the mutual term by N - 1")
    p.add_argument("--sequential", action="store_true", help="update the peers one after another (official code)")
    p.add_argument("--scheme", choices=SCHEMES, default="dml",
                   help="dml: each peer against the others (default); kdcl: each peer against one shared target "
                        "built from all peers, each peer on its own augmentation of the batch")
    p.add_argument("--kdcl-target", choices=KDCL_TARGETS, default="mean",
                   help="with --scheme kdcl: the target logits, the peers' mean (default) or MinLogit")
    return p


def peer_models(args, dataset):
    """The model name of each peer: --model once for all peers, or once per peer."""
    given = args.model or []
    n = args.peers if args.peers is not None else max(len(given), 2)
    if n < 2:
        raise ValueError("--peers must be >= 2 (mutual learning needs at least two peers), got %d" % n)
    if len(given) > 1 and len(given) != n:
        raise ValueError("--model given %d times for %d peers: give it once (every peer) or once per peer"
                         % (len(given), n))
    return given * n if len(given) == 1 else (given or [cli.default_model(dataset, "student")] * n)


def check_args(args):
    cli.check_args(args)
    if not args.temperature > 0:
        raise ValueError("--temperature must be > 0, got %r" % args.temperature)
    if not args.mutual_weight >= 0:
        raise ValueError("--mutual-weight must be >= 0, got %r" % args.mutual_weight)
    if args.scheme == "kdcl" and (args.sequential or args.average_peers):
        raise ValueError("--scheme kdcl updates every peer against one shared target: no --sequential or "
                         "--average-peers (those are DML's options)")


@torch.no_grad()
def evaluate(peers, dataset, device, batch=512):
    """Each peer's test accuracy and loss, and the accuracy of their ensemble (mean of probabilities)."""
    for m in peers:
        m.eval()
    n = len(dataset.y_test)
    correct, loss, ens = [0.0] * len(peers), [0.0] * len(peers), 0.0
    for i in range(0, n, batch):
        x = dataset.batch(dataset.x_test[i:i + batch].to(device))
        y = dataset.y_test[i:i + batch].to(device)
        probs = 0
        for k, m in enumerate(peers):
            z = m(x)
            loss[k] += torch.nn.functional.cross_entropy(z, y, reduction="sum").item()
            correct[k] += (z.argmax(1) == y).sum().item()
            probs = probs + torch.softmax(z.float(), 1)
        ens += (probs.argmax(1) == y).sum().item()
    return [c / n for c in correct], [v / n for v in loss], ens / n


def _mutual_terms(logits, args):
    return KF.mutual_kd_loss(logits, temperature=args.temperature, average_peers=args.average_peers)


def kdcl_target(logits, y, kind):
    """KDCL's shared target logits (detached): the mean of the peers' logits, or MinLogit: with
    z'_m = z_m - z_m[y] (each peer's logits shifted so that the true class is at 0), the element-wise minimum
    over the peers, min_m z'_m (the most confident combination; the true class stays at 0)."""
    with torch.no_grad():
        z = torch.stack([t.float() for t in logits])  # (N, b, C)
        if kind == "mean":
            return z.mean(0)
        shifted = z - z.gather(2, y.view(1, -1, 1).expand(z.shape[0], -1, 1))
        return shifted.min(0).values


def train_batch_kdcl(peers, opts, xs, y, args):
    """KDCL: peer m minimises CE(z_m, y) + lam T^2 KL(softmax(t / T) || softmax(z_m / T)), t the shared target."""
    logits = [m(x) for m, x in zip(peers, xs)]
    target = kdcl_target(logits, y, args.kdcl_target)
    ce = [torch.nn.functional.cross_entropy(z, y) for z in logits]
    terms = [KF.kd_loss(z, target.to(z.dtype), temperature=args.temperature) for z in logits]
    loss = sum(ce) + args.mutual_weight * sum(terms)
    for o in opts:
        o.zero_grad(set_to_none=True)
    loss.backward()
    for o in opts:
        o.step()
    return [c.item() for c in ce], [t.item() for t in terms], [(z.argmax(1) == y).sum().item() for z in logits]


def train_batch(peers, opts, x, y, args):
    """One batch: returns (each peer's CE, each peer's mutual term, each peer's correct count). Under KDCL `x`
    is a list, one (augmented) batch per peer."""
    lam, n = args.mutual_weight, len(peers)
    if args.scheme == "kdcl":
        return train_batch_kdcl(peers, opts, x, y, args)
    if not args.sequential:
        logits = [m(x) for m in peers]
        ce = [torch.nn.functional.cross_entropy(z, y) for z in logits]
        terms = _mutual_terms(logits, args)  # entry i's gradient reaches peer i only
        loss = sum(ce) + lam * terms.sum()
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        return [c.item() for c in ce], terms.detach().tolist(), [(z.argmax(1) == y).sum().item() for z in logits]
    ces, mks, hits = [], [], []
    # peer i against the others' current outputs (peers before it already updated); the others' forward passes
    # run in train mode, as in the official code, so their BatchNorm statistics see the batch again
    for i in range(n):
        with torch.no_grad():
            others = [m(x) if j != i else None for j, m in enumerate(peers)]
        zi = peers[i](x)
        logits = [zi if j == i else others[j] for j in range(n)]
        ce = torch.nn.functional.cross_entropy(zi, y)
        term = _mutual_terms(logits, args)[i]
        opts[i].zero_grad(set_to_none=True)
        (ce + lam * term).backward()
        opts[i].step()
        ces.append(ce.item())
        mks.append(term.item())
        hits.append((zi.argmax(1) == y).sum().item())
    return ces, mks, hits


def config_of(args, names):
    cfg = {k: getattr(args, k, None) for k in COMPARED_ON_RESUME}
    cfg["models"], cfg["peers"] = list(names), len(names)
    if cfg["scheme"] == "dml":  # as runs from before the schemes were recorded, so they still resume
        cfg.pop("scheme")
        cfg.pop("kdcl_target")
    return cfg


def peer_checkpoint(args, dataset, name, model, epoch, history, k):
    """Peer k alone, in the format of a `teacher` run (so `distill --teacher OUT/peer<k>` accepts it)."""
    rows = [{"epoch": r["epoch"], "test_acc": r["peer_test_acc"][k], "test_loss": r["peer_test_loss"][k],
             "train_acc": r["peer_train_acc"][k], "epoch_time": r["epoch_time"]} for r in history]
    return {"format": 1, "kind": "teacher", "model": name, "dataset": dataset.name,
            "num_classes": dataset.num_classes, "input_shape": list(dataset.input_shape), "method": "mutual",
            "config": {"trained_by": "mutual", "peer": k, "seed": args.seed}, "epoch": epoch,
            "model_state": model.state_dict(), "history": rows}


def train(args):
    check_args(args)
    device = cli.single_process_device(args, "mutual")
    dataset = cli.load_dataset(args)
    names = peer_models(args, dataset)
    torch.manual_seed(args.seed)
    peers = [models.build(name, dataset.num_classes, dataset.input_shape).to(device) for name in names]
    opts = [cli.make_optimizer(args, list(m.parameters())) for m in peers]
    scheds = [cli.make_scheduler(args, o) for o in opts]
    cfg = config_of(args, names)

    ckpt_file = os.path.join(args.out, runlog.CHECKPOINT)

    def restore(ck):
        for m, o, s, st in zip(peers, opts, scheds, ck["peers"]):
            m.load_state_dict(st["model_state"])
            o.load_state_dict(st["optimizer"])
            s.load_state_dict(st["scheduler"])

    history, start = cli.start_run(args, cfg, COMPARED_ON_RESUME, restore)
    print("kdops mutual: %s, %d peers (%s) on %s, T=%g, weight %g%s%s, %d epochs, device %s"
          % ("DML" if args.scheme == "dml" else "KDCL (%s target)" % args.kdcl_target, len(peers),
             ", ".join(names), dataset.name, args.temperature, args.mutual_weight,
             ", averaged" if args.average_peers else "", ", sequential" if args.sequential else "", args.epochs,
             device), flush=True)
    n_train = len(dataset.y_train)
    last = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
    for epoch in range(start, last):
        t0 = time.perf_counter()
        gen = cli._seed_epoch(args.seed, epoch, 0)
        batches = cli.epoch_batches(n_train, args.batch_size, gen)
        for m in peers:
            m.train()
        n = len(peers)
        sums_ce, sums_mk, sums_hit, seen = [0.0] * n, [0.0] * n, [0.0] * n, 0
        for idx in batches:
            raw = dataset.x_train[idx].to(device)
            if args.scheme == "kdcl":  # each peer its own draw of the augmentation (identical without one)
                x = [dataset.batch(raw, train=True, generator=gen) for _ in peers]
            else:
                x = dataset.batch(raw, train=True, generator=gen)
            y = dataset.y_train[idx].to(device)
            ce, mk, hit = train_batch(peers, opts, x, y, args)
            b = len(idx)
            for k in range(n):
                sums_ce[k] += ce[k] * b
                sums_mk[k] += mk[k] * b
                sums_hit[k] += hit[k]
            seen += b
        lr = opts[0].param_groups[0]["lr"]
        for s in scheds:
            s.step()
        accs, losses, ens = evaluate(peers, dataset, device)
        row = {"epoch": epoch + 1, "lr": lr, "peer_train_ce": [v / seen for v in sums_ce],
               "peer_train_mutual": [v / seen for v in sums_mk], "peer_train_acc": [v / seen for v in sums_hit],
               "peer_test_acc": accs, "peer_test_loss": losses, "train_acc": sum(sums_hit) / (n * seen),
               "test_acc": sum(accs) / n, "ensemble_test_acc": ens, "epoch_time": time.perf_counter() - t0,
               "samples": seen}
        history.append(row)
        for k, (name, m) in enumerate(zip(names, peers)):
            os.makedirs(os.path.join(args.out, "peer%d" % k), exist_ok=True)
            runlog.save_atomic(peer_checkpoint(args, dataset, name, m, epoch + 1, history, k),
                               os.path.join(args.out, "peer%d" % k, runlog.CHECKPOINT))
        runlog.save_atomic({
            "format": 1, "kind": "mutual", "models": names, "dataset": dataset.name,
            "num_classes": dataset.num_classes, "input_shape": list(dataset.input_shape), "config": cfg,
            "epoch": epoch + 1, "rng": {"torch": torch.get_rng_state()}, "history": history,
            "peers": [{"model_state": m.state_dict(), "optimizer": o.state_dict(), "scheduler": s.state_dict()}
                      for m, o, s in zip(peers, opts, scheds)],
        }, ckpt_file)
        runlog.write_metrics(args.out, history)
        print("epoch %d/%d  peers' test acc %s  ensemble %.4f  %.2fs"
              % (epoch + 1, args.epochs, " ".join("%.4f" % a for a in accs), ens, row["epoch_time"]), flush=True)
    summary = None
    if len(history) == args.epochs:
        final = history[-1]
        summary = {"command": "mutual", "dataset": dataset.name, "models": names, "peers": len(names),
                   "temperature": args.temperature, "mutual_weight": args.mutual_weight,
                   "average_peers": args.average_peers, "sequential": args.sequential, "scheme": args.scheme,
                   "kdcl_target": args.kdcl_target if args.scheme == "kdcl" else None, "epochs": args.epochs,
                   "seed": args.seed, "device": str(device),
                   "evaluated_on": "validation" if args.val_split else "test",
                   "peer_final_test_acc": final["peer_test_acc"], "final_test_acc": final["test_acc"],
                   "ensemble_final_test_acc": final["ensemble_test_acc"],
                   "mean_epoch_time": sum(r["epoch_time"] for r in history) / len(history)}
        runlog.write_summary(args.out, summary)
        runlog.plot_curves(args.out, history, "%s: %d peers on %s (mean over peers)"
                           % (args.scheme.upper(), len(names), dataset.name))
    return summary


def main(argv=None):
    return cli.run_command(train, build_parser().parse_args(argv))
