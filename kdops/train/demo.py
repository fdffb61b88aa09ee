"""`make demo`: distillation on mnist1d with a small training set (or `--dataset digits`) with the kdops trainer,
on a CPU.

Trains a teacher (cnn1d-l, 127k parameters, on all 4000 training signals; cnn-l on digits), then a student
(cnn1d-s, 2.4k parameters; cnn-s) on the first ``--train-subset`` (1000) training samples, alone and with each
method in ``METHODS``, over several seeds, and prints: method, test accuracy (mean and 95 % t-interval over
seeds), the paired difference to the student alone (same seeds) with its interval, training time per epoch,
and the time of the method's term (forward + backward on one batch of student and teacher outputs, its
connector / projector included) with the kdops ops and with the pure-PyTorch reference losses in their place.
With all 4000 training signals the students are within noise of each other; with 1000 the teacher's help
is measurable (see docs/reproductions.md, claim kd-small-data, for the controlled version). Writes the table
(``results.md``, ``results.json``), an accuracy plot (``accuracy.png``) and every run's directory under
``runs/demo/``. Adding a method to the demo is adding its name to ``METHODS``.
"""

import argparse
import contextlib
import json
import os
import shutil
import statistics
import time

import torch

import kdops
from kdops.train import cli, data, methods, models
from kdops.train.reproduce import interval
from kdops.train.runlog import load_checkpoint

METHODS = ["none", "kd", "dkd", "fkd", "ofd", "logsum"]


def run_quiet(argv, log):
    with open(log, "w") as f, contextlib.redirect_stdout(f):
        code = cli.main([str(a) for a in argv])
    if code != 0:
        raise SystemExit("demo: `kdops %s` failed, see %s" % (" ".join(map(str, argv)), log))


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def loss_times(method_name, dataset, teacher_dir, student_model, batch, repeats):
    """(kdops ms, reference ms, |difference|) of the method's loss, forward + backward, on one batch."""
    method = methods.get(method_name)
    d = data.load(dataset)
    ck = load_checkpoint(teacher_dir)
    teacher = models.build(ck["model"], ck["num_classes"], ck["input_shape"])
    teacher.load_state_dict(ck["model_state"])
    teacher.eval()
    torch.manual_seed(0)
    student = models.build(student_model, d.num_classes, d.input_shape)
    x, y = d.x_train[:batch], d.y_train[:batch]
    dist = methods.build_distiller(method, method.hparams({}), student, [teacher], x[:2])
    with torch.no_grad():
        t_out = teacher(x, features=True)
        s_out = student(x, features=True)
    s_out = type(s_out)(*[[f.detach().requires_grad_() for f in v] if isinstance(v, list) else v.detach().requires_grad_()
                          for v in s_out])

    def step():
        dist.zero_grad(set_to_none=True)
        loss = dist(s_out, [t_out], y, 1)[2]
        loss.backward()
        return loss.detach()

    ours = step()
    t_ours = median_ms(step, repeats)
    dist.use_reference(True)
    ref = step()
    t_ref = median_ms(step, repeats)
    return t_ours, t_ref, abs(ours.item() - ref.item())


def plot(out_dir, curves, teacher_curve, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(teacher_curve) + 1), teacher_curve, "k--", label="teacher")
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy.png"), dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "demo"))
    p.add_argument("--dataset", choices=("digits", "mnist1d"), default="mnist1d")
    p.add_argument("--train-subset", type=int, default=1000,
                   help="the students' training samples (the first N; 0: all); the teacher sees all of them")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20, help="student epochs")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--repeats", type=int, default=20, help="timed loss calls per measurement (median shown)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    info = kdops.build_info()
    print("kdops %s | torch %s | CUDA kernels %s | CPU, %d threads"
          % (info["version"], info["torch"], "built" if info["cuda_built"] else "not built", torch.get_num_threads()))
    for name in args.methods:
        methods.get(name)
    if os.path.isdir(args.out) and os.listdir(args.out):
        # a previous demo is replaced; anything else is left alone
        if not os.path.exists(os.path.join(args.out, "teacher.log")):
            raise SystemExit("demo: --out %s exists and does not hold a previous demo; choose another" % args.out)
        shutil.rmtree(args.out)
    os.makedirs(args.out, exist_ok=True)
    d = data.load(args.dataset)
    t_model, s_model = cli.default_model(d, "teacher"), cli.default_model(d, "student")
    common = ["--dataset", args.dataset, "--batch-size", 64, "--lr", 0.05, "--no-progress"]

    teacher_dir = os.path.join(args.out, "teacher")
    run_quiet(["teacher", "--model", t_model, "--epochs", args.teacher_epochs, "--out", teacher_dir, *common],
              os.path.join(args.out, "teacher.log"))
    teacher_hist = load_checkpoint(teacher_dir)["history"]
    print("teacher %s: test acc %.4f, %.2f s/epoch" % (t_model, teacher_hist[-1]["test_acc"],
                                                      statistics.mean(r["epoch_time"] for r in teacher_hist)))
    subset = ["--train-subset", args.train_subset] if args.train_subset else []
    rows, curves, alone = [], {}, None
    for name in args.methods:
        accs, epoch_times, hists = [], [], []
        for seed in range(args.seeds):
            out = os.path.join(args.out, "%s-seed%d" % (name, seed))
            run_quiet(["distill", "--method", name, "--teacher", teacher_dir, "--model", s_model, "--seed", seed,
                       "--epochs", args.epochs, "--out", out, *subset, *common], out + ".log")
            hist = load_checkpoint(out)["history"]
            hists.append([r["test_acc"] for r in hist])
            accs.append(hist[-1]["test_acc"])
            epoch_times += [r["epoch_time"] for r in hist]
        curves[name] = [statistics.mean(v) for v in zip(*hists)]
        t_ours = t_ref = diff = None
        if name != "none":
            t_ours, t_ref, diff = loss_times(name, args.dataset, teacher_dir, s_model, 64, args.repeats)
        ci = interval(accs)
        if name == "none":
            alone = accs
        gain = interval([a - b for a, b in zip(accs, alone)]) if alone is not None and name != "none" else None
        row = {"method": name, "test_acc_mean": statistics.mean(accs),
               "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "seeds": len(accs),
               "test_acc_ci": [ci["lo"], ci["hi"]] if len(accs) > 1 else None,
               "gain_vs_alone": None if gain is None else {"mean": gain["mean"], "ci": [gain["lo"], gain["hi"]]
                                                           if len(accs) > 1 else None},
               "s_per_epoch": statistics.mean(epoch_times), "loss_ms_kdops": t_ours, "loss_ms_reference": t_ref,
               "loss_abs_diff": diff}
        rows.append(row)
        print("  %-8s done: test acc %.4f" % (name, row["test_acc_mean"]), flush=True)

    header = ("| method | test acc (mean ± 95 %% CI, %d seeds) | vs student alone (paired, 95 %% CI) | s / epoch | "
              "loss ms kdops | loss ms reference | reference / kdops |" % args.seeds)
    lines = [header, "|---|---|---|---|---|---|---|"]
    lines.append("| teacher (%s) | %.4f | | %.3f | | | |" % (t_model,
        teacher_hist[-1]["test_acc"], statistics.mean(r["epoch_time"] for r in teacher_hist)))

    def pm(mean, ci):
        return "%.4f" % mean if ci is None else "%.4f ± %.4f" % (mean, (ci[1] - ci[0]) / 2)

    for r in rows:
        timing = "| | |" if r["loss_ms_kdops"] is None else "%.3f | %.3f | %.2fx |" % (
            r["loss_ms_kdops"], r["loss_ms_reference"], r["loss_ms_reference"] / r["loss_ms_kdops"])
        g = r["gain_vs_alone"]
        gain = "" if g is None else ("%+.4f" % g["mean"] if g["ci"] is None else "%+.4f [%+.4f, %+.4f]" % (
            g["mean"], g["ci"][0], g["ci"][1]))
        lines.append("| %s | %s | %s | %.3f | %s" % (
            "student alone" if r["method"] == "none" else r["method"], pm(r["test_acc_mean"], r["test_acc_ci"]),
            gain, r["s_per_epoch"], timing))
    table = "\n".join(lines)
    total = time.perf_counter() - start
    n_student = min(args.train_subset or len(d.y_train), len(d.y_train))
    note = ("%s (%d train / %d test), teacher %s %d epochs on all %d, students %s %d epochs on the first %d, SGD + "
            "cosine, batch 64; intervals: 95 %% t over seeds (the same seeds for every method). Loss "
            "times: forward + backward of the method's term (connector / projector included) on one batch of 64, "
            "median of %d.\nTotal demo time %.0f s."
            % (args.dataset, len(d.y_train), len(d.y_test), t_model, args.teacher_epochs, len(d.y_train), s_model,
               args.epochs, n_student, args.repeats, total))
    print("\n" + table + "\n\n" + note)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n\n" + note + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"teacher_test_acc": teacher_hist[-1]["test_acc"], "rows": rows, "total_s": total}, f, indent=2)
    plot(args.out, curves, [r["test_acc"] for r in teacher_hist],
         "%s: %s students of a %s teacher" % (args.dataset, s_model, t_model))
    return rows


if __name__ == "__main__":
    main()
