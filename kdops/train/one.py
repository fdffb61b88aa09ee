"""On-the-fly Native Ensemble (ONE, Lan et al. 2018): one network with a shared trunk and M branches, distilled
from its own gated ensemble while it trains.

    python -m kdops.train one --branches 3 --model cnn1d-s --dataset mnist1d --epochs 30 --out runs/one

The trunk is every stage of ``--model`` but the last; each of the M branches is a copy of the last stage with its
own classifier. The gate, on the trunk's output: global average pool, Linear(C -> M), BatchNorm, ReLU, softmax;
the teacher logits are z_e = sum_i g_i z_i. The loss:

    sum_i CE(z_i, y) + CE(z_e, y) + w(epoch) * sum_i T^2 KL(softmax(z_e / T) || softmax(z_i / T)),

T = 3, the ensemble target detached, w = exp(-5 (1 - e / R)^2) for epochs e < R (``--rampup``, default 80 as the
paper over its 300 epochs), then 1. ``metrics.jsonl`` holds each branch's test accuracy, their mean and the gated
ensemble's; ``checkpoint.pt`` the whole model (resumable like ``distill``); ``branch<i>/checkpoint.pt`` the trunk
with branch i as a plain ``--model`` network, which ``distill --teacher`` and ``cache-teacher`` accept (ONE's
deployable single net). Small models (``mlp-*``, ``cnn-*``, ``cnn1d-*``); one process.
"""

import math
import os
import time

import torch
from torch import nn

from kdops import functional as KF
from kdops.train import cli, models, runlog
from kdops.train.models.small import MLP, ConvNet

COMPARED_ON_RESUME = ("command", "dataset", "model", "branches", "epochs", "batch_size", "lr", "lr_schedule",
                      "lr_milestones", "lr_gamma", "optimizer", "momentum", "weight_decay", "seed", "train_subset",
                      "test_subset", "val_split", "augment", "temperature", "rampup", "kd_weight")


class ONENet(nn.Module):
    """M copies of one small network sharing every stage but the last (the modules themselves are shared, so
    ``nets[i]`` is branch i as a plain network), and the gate."""

    def __init__(self, name, num_classes, input_shape, branches):
        super().__init__()
        nets = [models.build(name, num_classes, input_shape) for _ in range(branches)]
        if not isinstance(nets[0], (ConvNet, MLP)):
            raise ValueError("one: --model must be a small model (mlp-*, cnn-*, cnn1d-*), got %s" % name)
        self.kind = "conv" if isinstance(nets[0], ConvNet) else "mlp"
        layers = "convs" if self.kind == "conv" else "linears"
        n = len(getattr(nets[0], layers))
        if n < 2:
            raise ValueError("one: the model needs at least two stages (a trunk and a branch)")
        for net in nets[1:]:
            for j in range(n - 1):
                getattr(net, layers)[j] = getattr(nets[0], layers)[j]
                if self.kind == "conv":
                    net._bns[j] = nets[0]._bns[j]
        self.nets = nn.ModuleList(nets)
        trunk_width = nets[0].stage_channels[-2]
        self.gate = nn.Sequential(nn.Linear(trunk_width, branches), nn.BatchNorm1d(branches), nn.ReLU())

    def _stage(self, net, j, x):
        if self.kind == "mlp":
            return torch.relu(net.linears[j](x.flatten(1) if j == 0 else x))
        if j > 0 and min(x.shape[2:]) >= 2:
            x = net.pool(x)
        return torch.relu(net._bns[j](net.convs[j](x)))

    def forward(self, x):
        """(branch logits (M, b, C), gate weights (b, M), ensemble logits (b, C))."""
        base = self.nets[0]
        n = len(base.stage_channels)
        h = x
        for j in range(n - 1):
            h = self._stage(base, j, h)
        pooled_trunk = h if self.kind == "mlp" else h.flatten(2).mean(-1)
        gate = torch.softmax(self.gate(pooled_trunk), dim=1)
        outs = []
        for net in self.nets:
            o = self._stage(net, n - 1, h)
            outs.append(net.fc(o if self.kind == "mlp" else o.flatten(2).mean(-1)))
        z = torch.stack(outs)
        return z, gate, (gate.t().unsqueeze(-1) * z).sum(0)


def rampup(epoch, length):
    """ONE's weight of the distillation term at (0-based) epoch `epoch`."""
    if length <= 0 or epoch >= length:
        return 1.0
    return math.exp(-5.0 * (1.0 - epoch / length) ** 2)


def one_loss(z, z_e, y, weight, temperature):
    """(total, sum of the CEs, sum of the KD terms) of ONE for branch logits z (M, b, C), ensemble z_e."""
    ce = sum(torch.nn.functional.cross_entropy(zi, y) for zi in z) + torch.nn.functional.cross_entropy(z_e, y)
    target = z_e.detach()
    kd = sum(KF.kd_loss(zi, target, temperature=temperature) for zi in z)
    return ce + weight * kd, ce, kd


def build_parser():
    p = cli.Parser(prog="kdops one", description=__doc__, formatter_class=cli.argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)
    p.add_argument("--branches", type=int, default=3, help="M, the number of branches (default 3)")
    p.add_argument("--temperature", type=float, default=3.0, help="T of the KD term (default 3)")
    p.add_argument("--rampup", type=int, default=80, help="epochs of the sigmoid ramp-up of the KD weight (80)")
    p.add_argument("--kd-weight", type=float, default=1.0, help="a factor on the ramped KD term (default 1)")
    return p


@torch.no_grad()
def evaluate(model, dataset, device, batch=512):
    model.eval()
    n, m = len(dataset.y_test), len(model.nets)
    correct, ens = [0.0] * m, 0.0
    for i in range(0, n, batch):
        x = dataset.batch(dataset.x_test[i:i + batch].to(device))
        y = dataset.y_test[i:i + batch].to(device)
        z, _, z_e = model(x)
        for k in range(m):
            correct[k] += (z[k].argmax(1) == y).sum().item()
        ens += (z_e.argmax(1) == y).sum().item()
    return [c / n for c in correct], ens / n


def train(args):
    cli.check_args(args)
    if args.branches < 2:
        raise ValueError("--branches must be >= 2, got %d" % args.branches)
    if not args.temperature > 0:
        raise ValueError("--temperature must be > 0, got %r" % args.temperature)
    if args.rampup < 0 or not args.kd_weight >= 0:
        raise ValueError("--rampup and --kd-weight must be >= 0")
    device = cli.single_process_device(args, "one")
    dataset = cli.load_dataset(args)
    args.model = args.model or cli.default_model(dataset, "student")
    torch.manual_seed(args.seed)
    model = ONENet(args.model, dataset.num_classes, dataset.input_shape, args.branches).to(device)
    opt = cli.make_optimizer(args, list(model.parameters()))
    sched = cli.make_scheduler(args, opt)
    cfg = {k: getattr(args, k, None) for k in COMPARED_ON_RESUME}

    def restore(ck):
        model.load_state_dict(ck["model_state"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])

    history, start = cli.start_run(args, cfg, COMPARED_ON_RESUME, restore)
    print("kdops one: %s with %d branches on %s, T=%g, ramp-up %d epochs, %d epochs, device %s"
          % (args.model, args.branches, dataset.name, args.temperature, args.rampup, args.epochs, device), flush=True)
    n_train = len(dataset.y_train)
    last = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
    for epoch in range(start, last):
        t0 = time.perf_counter()
        gen = cli._seed_epoch(args.seed, epoch, 0)
        batches = cli.epoch_batches(n_train, args.batch_size, gen)
        model.train()
        w = args.kd_weight * rampup(epoch, args.rampup)
        sums, seen = [0.0, 0.0, 0.0, 0.0], 0
        for idx in batches:
            x = dataset.batch(dataset.x_train[idx].to(device), train=True, generator=gen)
            y = dataset.y_train[idx].to(device)
            z, _, z_e = model(x)
            loss, ce, kd = one_loss(z, z_e, y, w, args.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            b = len(idx)
            sums[0] += loss.item() * b
            sums[1] += ce.item() * b
            sums[2] += kd.item() * b
            sums[3] += (z_e.argmax(1) == y).sum().item()
            seen += b
        lr = opt.param_groups[0]["lr"]
        sched.step()
        accs, ens = evaluate(model, dataset, device)
        row = {"epoch": epoch + 1, "lr": lr, "kd_weight": w, "train_loss": sums[0] / seen, "train_ce": sums[1] / seen,
               "train_kd": sums[2] / seen, "train_acc": sums[3] / seen, "branch_test_acc": accs,
               "test_acc": sum(accs) / len(accs), "ensemble_test_acc": ens,
               "epoch_time": time.perf_counter() - t0, "samples": seen}
        history.append(row)
        for k, net in enumerate(model.nets):
            os.makedirs(os.path.join(args.out, "branch%d" % k), exist_ok=True)
            runlog.save_atomic({
                "format": 1, "kind": "teacher", "model": args.model, "dataset": dataset.name,
                "num_classes": dataset.num_classes, "input_shape": list(dataset.input_shape), "method": "one",
                "config": {"trained_by": "one", "branch": k, "seed": args.seed, "epochs": args.epochs},
                "epoch": epoch + 1, "model_state": net.state_dict(),
                "history": [{"epoch": r["epoch"], "test_acc": r["branch_test_acc"][k]} for r in history],
            }, os.path.join(args.out, "branch%d" % k, runlog.CHECKPOINT))
        runlog.save_atomic({
            "format": 1, "kind": "one", "model": args.model, "dataset": dataset.name,
            "num_classes": dataset.num_classes, "input_shape": list(dataset.input_shape), "config": cfg,
            "epoch": epoch + 1, "model_state": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": {"torch": torch.get_rng_state()}, "history": history,
        }, os.path.join(args.out, runlog.CHECKPOINT))
        runlog.write_metrics(args.out, history)
        print("epoch %d/%d  branches' test acc %s  ensemble %.4f  %.2fs"
              % (epoch + 1, args.epochs, " ".join("%.4f" % a for a in accs), ens, row["epoch_time"]), flush=True)
    summary = None
    if len(history) == args.epochs:
        final = history[-1]
        summary = {"command": "one", "dataset": dataset.name, "model": args.model, "branches": args.branches,
                   "temperature": args.temperature, "rampup": args.rampup, "kd_weight": args.kd_weight,
                   "epochs": args.epochs, "seed": args.seed, "device": str(device),
                   "evaluated_on": "validation" if args.val_split else "test",
                   "branch_final_test_acc": final["branch_test_acc"], "final_test_acc": final["test_acc"],
                   "ensemble_final_test_acc": final["ensemble_test_acc"],
                   "mean_epoch_time": sum(r["epoch_time"] for r in history) / len(history)}
        runlog.write_summary(args.out, summary)
        runlog.plot_curves(args.out, history, "ONE: %d branches of %s on %s (mean over branches)"
                           % (args.branches, args.model, dataset.name))
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.command = "one"
    return cli.run_command(train, args)
