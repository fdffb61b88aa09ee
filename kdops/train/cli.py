"""The kdops trainer: train a teacher, then distil a student with any kdops loss.

    python -m kdops.train teacher --dataset digits --epochs 20 --out runs/teacher
    python -m kdops.train distill --method kd --teacher runs/teacher --epochs 20 --out runs/kd
    torchrun --nproc_per_node 2 -m kdops.train distill ...      (DDP: gloo on CPU, nccl on GPU)

(``kdops`` is the same command once the package is installed.) Every epoch appends to ``metrics.jsonl`` and
rewrites ``checkpoint.pt`` atomically (model, method modules, optimiser, scheduler, RNG state, history);
``--resume`` continues from the last completed epoch and gives the same result as an uninterrupted run. At
the end: ``summary.json`` and ``curves.png`` (train / test accuracy per epoch).
"""

import argparse
import ast
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from kdops.train import compress, data, methods, models, runlog

COMPARED_ON_RESUME = ("command", "dataset", "model", "method", "teacher", "teacher_cache", "teacher_dataset", "hp",
                      "epochs", "batch_size", "lr", "lr_schedule", "lr_milestones", "lr_gamma", "optimizer", "momentum",
                      "weight_decay", "seed", "train_subset", "test_subset", "val_split", "augment", "sync_bn",
                      "student_init", "prune", "quantize")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


def add_common_args(q, multi_model=False):
    """The options every training command shares (teacher, distill, mutual); `multi_model`: --model repeatable."""
    q.add_argument("--dataset", default="digits", help="one of %s (default digits)" % ", ".join(data.DATASETS))
    q.add_argument("--data-dir", help="where cifar10 / cifar100 / svhn files are (nothing is downloaded)")
    q.add_argument("--model", action="append" if multi_model else "store",
                   help=("once per peer or once for all peers: " if multi_model else "")
                   + "one of %s; default: the dataset's small family, size l for a teacher, s for a student "
                     "(resnet32x4 / resnet8x4 on CIFAR and SVHN)" % ", ".join(models.MODELS))
    q.add_argument("--epochs", type=int, default=20)
    q.add_argument("--batch-size", type=int, default=64, help="global batch (split over DDP processes)")
    q.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd")
    q.add_argument("--lr", type=float, default=0.05)
    q.add_argument("--momentum", type=float, default=0.9)
    q.add_argument("--weight-decay", type=float, default=5e-4)
    q.add_argument("--lr-schedule", choices=("cosine", "step", "constant"), default="cosine")
    q.add_argument("--lr-milestones", type=int, nargs="+", help="epochs of the step schedule (default: 50%%, 75%%)")
    q.add_argument("--lr-gamma", type=float, default=0.1, help="step schedule factor")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="cpu", help="cpu or cuda")
    q.add_argument("--threads", type=int, help="torch intra-op threads")
    q.add_argument("--out", required=True, help="run directory (created)")
    q.add_argument("--resume", action="store_true", help="continue the run in --out from its last completed epoch")
    q.add_argument("--stop-after", type=int, metavar="EPOCH",
                   help="end this process after that epoch (for time-limited job slots; continue with --resume)")
    q.add_argument("--train-subset", type=int, help="use the first N training samples")
    q.add_argument("--test-subset", type=int, help="use the first N test samples")
    q.add_argument("--val-split", type=int, metavar="N",
                   help="hold out the last N training samples (before --train-subset) and evaluate on them "
                        "instead of the test set, for choosing hyper-parameters")
    q.add_argument("--no-augment", dest="augment", action="store_false", help="no crop / flip on CIFAR and SVHN")
    q.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines are still printed)")
    q.add_argument("--sync-bn", action="store_true", help="under DDP on CUDA: BatchNorm statistics over the "
                                                            "global batch (SyncBatchNorm)")


def build_parser():
    p = Parser(prog="kdops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    teacher = sub.add_parser("teacher", help="train a model on labels alone (a teacher)")
    distill = sub.add_parser("distill", help="train a student with a distillation method")
    sub.add_parser("reproduce", help="re-run a published claim over seeds (see: kdops reproduce --help)",
                   add_help=False)
    sub.add_parser("mutual", help="train N peers together from scratch, Deep Mutual Learning (see: kdops mutual "
                                  "--help)", add_help=False)
    sub.add_parser("cache-teacher", help="store a teacher's logits on the training set for distill --teacher-cache "
                                         "(see: kdops cache-teacher --help)", add_help=False)
    sub.add_parser("one", help="ONE: a shared trunk and M branches distilled from their gated ensemble (see: kdops "
                               "one --help)", add_help=False)
    sub.add_parser("born-again", help="Born-Again Networks: generations of one architecture, each distilled from "
                                      "the last (see: kdops born-again --help)", add_help=False)
    for q in (teacher, distill):
        add_common_args(q)
    distill.add_argument("--teacher", action="append", default=[], help="teacher checkpoint or run dir; repeat for an "
                                                                       "ensemble (the terms are averaged)")
    distill.add_argument("--teacher-cache", metavar="DIR", help="a teacher's logits cached by kdops cache-teacher, "
                                                                "instead of --teacher (logit methods, no augmentation)")
    distill.add_argument("--teacher-dataset", help="the teacher's training dataset when it differs from --dataset "
                                                   "(feature methods only: logits need one label space)")
    add_method_args(distill)
    distill.add_argument("--student-init", metavar="RUN", help="start the student from the final weights of this "
                                                                "run (same model and data), e.g. to prune it")
    distill.add_argument("--prune", type=float, metavar="AMOUNT",
                         help="magnitude pruning: set the AMOUNT fraction (0..1) of the smallest Conv / Linear "
                              "weights to 0 at the start and keep them 0 (recovered by the method's training)")
    distill.add_argument("--quantize", choices=("int8",),
                         help="quantization-aware training of the student (CPU): int8 weights, uint8 activations; "
                              "the run's final accuracy is the converted int8 model's")
    return p


def add_method_args(q, default=None):
    """--method and its hyper-parameter flags (distill, born-again)."""
    q.add_argument("--method", required=default is None, default=default,
                   help="one of: %s%s" % (", ".join(sorted(methods.METHODS)),
                                          "" if default is None else " (default %s)" % default))
    for flag in ("alpha", "beta", "temperature", "loss-weight", "ce-weight"):
        q.add_argument("--" + flag, type=float, help="method hyper-parameter %s" % flag.replace("-", "_"))
    q.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other method hyper-parameter (python literal or string), repeatable")


def parse_method_args(args):
    hp = {}
    for flag in ("alpha", "beta", "temperature", "loss_weight", "ce_weight"):
        if getattr(args, flag) is not None:
            hp[flag] = getattr(args, flag)
    for item in args.method_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError("--method-arg expects KEY=VALUE, got %r" % item)
        try:
            hp[key.strip().replace("-", "_")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            hp[key.strip().replace("-", "_")] = value
    return hp


def default_model(dataset, role):
    if dataset.name in ("cifar10", "cifar100", "svhn"):
        return "resnet32x4" if role == "teacher" else "resnet8x4"
    return "%s-%s" % (models.default_family(dataset.input_shape), "l" if role == "teacher" else "s")


class Step(torch.nn.Module):
    """Student and method modules in one module, so DDP synchronises the gradients of both."""

    def __init__(self, student, distiller):
        super().__init__()
        self.student, self.distiller = student, distiller

    def forward(self, x, teacher_outs, y, epoch, idx=None):
        out = self.student(x, features=True)
        loss, ce, kd = self.distiller(out, teacher_outs, y, epoch, idx)
        return loss, ce, kd, out.logits


def setup_distributed(args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    if world <= 1:
        return 0, 1, torch.device(args.device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
    return rank, world, torch.device("cuda", local) if cuda else torch.device("cpu")


def refuse_quantized(path, ck):
    """A --quantize run's checkpoint holds the float weights it trained, not the int8 model it reports."""
    if ck.get("config", {}).get("quantize"):
        raise ValueError("teacher %s is an int8 quantization-aware run: its checkpoint holds the float weights, not "
                         "the int8 model its accuracy is of (that is %s); it cannot serve as a teacher"
                         % (path, os.path.join(os.path.dirname(runlog.checkpoint_path(path)), "quantized.pt2")))


def load_teachers(args, dataset, method, device):
    if method.name != "none" and not args.teacher:
        raise ValueError("method %s needs at least one --teacher checkpoint" % method.name)
    teachers = []
    for path in args.teacher:
        ck = runlog.load_checkpoint(path, "teacher")
        refuse_quantized(path, ck)
        t_data = ck["dataset"]
        if t_data != dataset.name and args.teacher_dataset != t_data:
            raise ValueError("teacher %s was trained on %s, the student on %s: pass --teacher-dataset %s to distil "
                             "across datasets" % (path, t_data, dataset.name, t_data))
        if args.teacher_dataset is not None and args.teacher_dataset != t_data:
            raise ValueError("--teacher-dataset %s, but teacher %s was trained on %s"
                             % (args.teacher_dataset, path, t_data))
        if method.logits and (t_data != dataset.name or ck["num_classes"] != dataset.num_classes):
            raise ValueError("method %s compares logits, so the teacher needs the student's label space: teacher %s has "
                             "%d classes of %s, the student %d classes of %s; use a feature method (%s)"
                             % (method.name, path, ck["num_classes"], t_data, dataset.num_classes, dataset.name,
                                ", ".join(sorted(m for m, e in methods.METHODS.items() if not e.logits and e.needs))))
        if tuple(ck["input_shape"]) != tuple(dataset.input_shape):
            raise ValueError("teacher %s takes inputs of shape %s, the data has shape %s"
                             % (path, tuple(ck["input_shape"]), tuple(dataset.input_shape)))
        t = models.build(ck["model"], ck["num_classes"], ck["input_shape"])
        t.load_state_dict(ck["model_state"])
        t.to(device).eval().requires_grad_(False)
        teachers.append(t)
    return teachers


def make_optimizer(args, params):
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    cls = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=args.lr, weight_decay=args.weight_decay)


def make_scheduler(args, opt):
    if args.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    if args.lr_schedule == "step":
        milestones = args.lr_milestones or [max(1, args.epochs // 2), max(1, args.epochs * 3 // 4)]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=args.lr_gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)


def check_args(args):
    for name in ("epochs", "batch_size", "train_subset", "test_subset", "val_split", "threads", "stop_after"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError("--%s must be >= 1, got %d" % (name.replace("_", "-"), v))
    if not args.lr > 0:
        raise ValueError("--lr must be > 0, got %r" % args.lr)


def load_dataset(args):
    """The dataset of a training command: --val-split holds out the tail of the training set and evaluates on
    it instead of the test set; then --train-subset / --test-subset."""
    dataset = data.load(args.dataset, args.data_dir, augment=args.augment)
    if args.val_split:
        n = len(dataset.y_train) - args.val_split
        if n < 2:
            raise ValueError("--val-split %d leaves %d training samples" % (args.val_split, n))
        dataset = data.Dataset(dataset.name, dataset.x_train[:n], dataset.y_train[:n], dataset.x_train[n:],
                               dataset.y_train[n:], dataset.num_classes, dataset.input_shape, dataset.prepare)
    if args.train_subset or args.test_subset:
        dataset = dataset.subset(args.train_subset, args.test_subset)
    return dataset


def resumed_checkpoint(args, cfg, compared):
    """The checkpoint in --out to continue (None for a new run). A run is never overwritten: an existing one
    needs --resume, and the options named in `compared` must be those it was started with."""
    ckpt_file = os.path.join(args.out, runlog.CHECKPOINT)
    if not os.path.exists(ckpt_file):
        return None
    if not args.resume:
        raise ValueError("%s already holds a run; pass --resume to continue it or choose another --out" % args.out)
    ck = runlog.load_checkpoint(ckpt_file)
    diff = [k for k in compared if ck["config"].get(k) != cfg.get(k)]
    if diff:
        raise ValueError("--resume: the run in %s used different %s" % (args.out, ", ".join(diff)))
    return ck


def config_of(args, hp):
    cfg = {k: getattr(args, k, None) for k in COMPARED_ON_RESUME if k != "hp"}
    cfg["hp"] = hp
    return cfg


def _seed_epoch(seed, epoch, rank):
    """Every epoch draws from generators seeded by (seed, epoch, rank), so a resumed run replays the same
    shuffles, augmentations and dropout masks as one that never stopped."""
    s = (seed * 1_000_003 + epoch * 7919 + rank) % (2 ** 63)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


def single_process_device(args, command):
    """The device of a command that runs in one process (mutual, one), after its threads are set."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.sync_bn:
        raise ValueError("%s runs in one process (no DDP, so no --sync-bn); run it without torchrun" % command)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    return device


def epoch_batches(n, batch_size, gen):
    """One process's shuffled batches of an epoch from `gen`; a trailing batch of one joins the one before it
    (BatchNorm in train mode cannot take a batch of one)."""
    order = torch.randperm(n, generator=gen)
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def start_run(args, cfg, compared, restore):
    """The history and first epoch of a run: `restore(checkpoint)` loads a resumed run's states; the run
    directory and its metrics.jsonl are (re)written."""
    history, start = [], 0
    ck = resumed_checkpoint(args, cfg, compared)
    if ck is not None:
        restore(ck)
        torch.set_rng_state(ck["rng"]["torch"])
        history, start = list(ck["history"]), ck["epoch"]
    os.makedirs(args.out, exist_ok=True)
    runlog.write_metrics(args.out, history)
    return history, start


def _reduce(values, world, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(student, dataset, rank, world, device, batch):
    student.eval()
    idx = torch.arange(rank, len(dataset.y_test), world)  # a disjoint shard per process, summed below
    correct = loss = 0.0
    for i in range(0, len(idx), batch):
        j = idx[i:i + batch]
        x = dataset.batch(dataset.x_test[j].to(device))
        y = dataset.y_test[j].to(device)
        logits = student(x)
        loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    correct, loss, n = _reduce([correct, loss, float(len(idx))], world, device)
    return correct / n, loss / n


def train(args):
    check_args(args)
    rank, world, device = setup_distributed(args)
    try:
        return _train(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _train(args, rank, world, device):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sync_bn and device.type != "cuda":
        raise ValueError("--sync-bn needs --device cuda (SyncBatchNorm has no CPU kernels)")
    if args.batch_size % world:
        raise ValueError("--batch-size %d must be divisible by the %d processes" % (args.batch_size, world))
    method = methods.get(args.method if args.command == "distill" else "none")
    hp = method.hparams(parse_method_args(args) if args.command == "distill" else {})
    dataset = load_dataset(args)
    if args.command == "distill" and args.teacher_cache:
        from kdops.train import teacher_cache

        teachers = [teacher_cache.load_for_distill(args, dataset, method, device)]
    else:
        teachers = load_teachers(args, dataset, method, device) if args.command == "distill" else []
    args.model = args.model or default_model(dataset, args.command)
    torch.manual_seed(args.seed)
    student = models.build(args.model, dataset.num_classes, dataset.input_shape).to(device)
    init, amount = getattr(args, "student_init", None), getattr(args, "prune", None)
    if init:
        compress.load_init(student, init, args.model, dataset)
    masks = compress.magnitude_masks(student, amount) if amount is not None else None
    if masks is not None:
        compress.apply_masks(student, masks)
    plain = None  # under --quantize: the float model whose key layout model_state keeps
    if getattr(args, "quantize", None):
        from kdops.train import quantize

        quantize.check(args, world, device)
        plain = student
        student = quantize.QATStudent(student, dataset.batch(dataset.x_train[:2].to(device)))
    probe = dataset.batch(dataset.x_train[:2].to(device))
    distiller = methods.build_distiller(method, hp, student, teachers, probe, world, dataset.y_train).to(device)
    step = Step(student, distiller)
    if args.sync_bn and world > 1:  # converted with the method modules, so connector BatchNorms sync too
        step = torch.nn.SyncBatchNorm.convert_sync_batchnorm(step)
        student, distiller = step.student, step.distiller
    opt = make_optimizer(args, list(step.parameters()))
    sched = make_scheduler(args, opt)
    cfg = config_of(args, hp)

    ckpt_file = os.path.join(args.out, runlog.CHECKPOINT)
    history, start = [], 0
    ck = resumed_checkpoint(args, cfg, COMPARED_ON_RESUME)
    if ck is not None:
        student.load_state_dict(ck["model_state"] if plain is None else ck["qat_state"])
        distiller.load_state_dict(ck["distiller_state"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"]["torch"])
        history, start = list(ck["history"]), ck["epoch"]
        if masks is not None:
            masks = {k: v.to(device) for k, v in ck["prune_masks"].items()}
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        runlog.write_metrics(args.out, history)
    ddp = DistributedDataParallel(step) if world > 1 else step
    sampler = DistributedSampler(range(len(dataset.y_train)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed)
    per_rank = args.batch_size // world
    show = rank == 0 and not args.no_progress
    if rank == 0:
        print("kdops %s: %s on %s, %s%s, %d epochs, %d process(es), device %s"
              % (args.command, args.model, dataset.name, method.name,
                 "" if method.name == "none" else " %s from %d teacher(s)" % (hp, len(teachers)),
                 args.epochs, world, device), flush=True)
    from tqdm import tqdm

    last = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
    for epoch in range(start, last):
        t0 = time.perf_counter()
        gen = _seed_epoch(args.seed, epoch, rank)
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        batches = [order[i:i + per_rank] for i in range(0, len(order), per_rank)]
        if len(batches) > 1 and len(batches[-1]) < 2:  # BatchNorm in train mode cannot take a batch of one
            batches[-2:] = [torch.cat(batches[-2:])]
        step.train()
        sums = [0.0] * 5  # loss, ce, kd, correct, samples
        bar = tqdm(batches, desc="epoch %d/%d" % (epoch + 1, args.epochs), disable=not show, leave=False,
                   dynamic_ncols=True)
        for idx in bar:
            x = dataset.batch(dataset.x_train[idx].to(device), train=True, generator=gen)
            y = dataset.y_train[idx].to(device)
            with torch.no_grad():
                t_outs = [t.outputs(idx.to(device)) if hasattr(t, "outputs") else t(x, features=True)
                          for t in teachers]
            loss, ce, kd, logits = ddp(x, t_outs, y, epoch, idx.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if masks is not None:
                compress.apply_masks(student, masks)
            b = len(idx)
            sums[0] += loss.item() * b
            sums[1] += ce.item() * b
            sums[2] += float(kd.detach()) * b
            sums[3] += (logits.argmax(1) == y).sum().item()
            sums[4] += b
            bar.set_postfix(loss="%.3f" % (sums[0] / sums[4]), acc="%.3f" % (sums[3] / sums[4]))
        sums = _reduce(sums, world, device)
        lr = opt.param_groups[0]["lr"]
        sched.step()
        test_acc, test_loss = evaluate(student, dataset, rank, world, device, 512)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": sums[0] / sums[4], "train_ce": sums[1] / sums[4],
               "train_kd": sums[2] / sums[4], "train_acc": sums[3] / sums[4], "test_loss": test_loss,
               "test_acc": test_acc, "epoch_time": time.perf_counter() - t0, "samples": int(sums[4])}
        history.append(row)
        if rank == 0:
            runlog.save_atomic({
                "format": 1, "kind": args.command, "model": args.model, "dataset": dataset.name,
                "num_classes": dataset.num_classes, "input_shape": list(dataset.input_shape), "method": method.name,
                "config": cfg, "epoch": epoch + 1,
                "model_state": student.state_dict() if plain is None else student.float_state(plain),
                "qat_state": None if plain is None else student.state_dict(),
                "distiller_state": distiller.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": {"torch": torch.get_rng_state()}, "history": history,
                "prune_masks": masks,
            }, ckpt_file)
            runlog.write_metrics(args.out, history)
            print("epoch %d/%d  loss %.4f  train acc %.4f  test acc %.4f  %.2fs"
                  % (epoch + 1, args.epochs, row["train_loss"], row["train_acc"], test_acc, row["epoch_time"]),
                  flush=True)
    done = len(history) == args.epochs
    summary = None
    int8 = None
    if rank == 0 and done and plain is not None:
        int8 = quantize.Int8Model(student.convert())
        int8_acc, int8_loss = evaluate(int8, dataset, rank, world, device, 512)
        example = dataset.batch(dataset.x_train[:2].to(device))
        quantize.save(int8, example, os.path.join(args.out, "quantized.pt2"))
        print("int8 model: test acc %.4f (fake-quantized %.4f) -> %s"
              % (int8_acc, history[-1]["test_acc"], os.path.join(args.out, "quantized.pt2")), flush=True)
    if rank == 0 and done:
        summary = {"command": args.command, "dataset": dataset.name, "model": args.model, "method": method.name,
                   "hp": hp, "teachers": list(args.teacher) if args.command == "distill" else [],
                   "teacher_cache": getattr(args, "teacher_cache", None),
                   "epochs": args.epochs, "seed": args.seed, "world_size": world, "device": str(device),
                   "evaluated_on": "validation" if args.val_split else "test",
                   "params": sum(p.numel() for p in student.parameters()),
                   "sparsity": compress.sparsity(student) if masks is not None else None,
                   "quantize": getattr(args, "quantize", None),
                   "fake_quant_test_acc": history[-1]["test_acc"] if int8 is not None else None,
                   "final_test_acc": history[-1]["test_acc"] if int8 is None else int8_acc,
                   "best_test_acc": max(r["test_acc"] for r in history),
                   "mean_epoch_time": sum(r["epoch_time"] for r in history) / len(history)}
        runlog.write_summary(args.out, summary)
        runlog.plot_curves(args.out, history, "%s %s on %s" % (args.model, method.name, dataset.name))
    return summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] == ["reproduce"]:  # a driver of many runs with its own options
        from kdops.train import reproduce

        return reproduce.main(argv[1:])
    if argv[:1] == ["mutual"]:  # N models and their optimisers: a training loop of its own
        from kdops.train import mutual

        return mutual.main(argv[1:])
    if argv[:1] == ["cache-teacher"]:
        from kdops.train import teacher_cache

        return teacher_cache.main(argv[1:])
    if argv[:1] == ["one"]:  # one branched model and its own loss
        from kdops.train import one

        return one.main(argv[1:])
    if argv[:1] == ["born-again"]:  # a driver of teacher / distill runs
        from kdops.train import born_again

        return born_again.main(argv[1:])
    return run_command(train, build_parser().parse_args(argv))


def run_command(fn, args):
    """Runs a training command; a bad argument or missing file is one line on stderr and exit code 2."""
    try:
        fn(args)
    except (ValueError, FileNotFoundError) as e:
        print("kdops: error: %s" % str(e).replace("\n", " "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
