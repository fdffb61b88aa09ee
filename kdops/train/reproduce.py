"""``python -m kdops.train reproduce NAME``: re-run one published distillation claim at CPU scale.

    python -m kdops.train reproduce --list
    python -m kdops.train reproduce kd-small-data [--seeds 0 1 2 3 4] [--out DIR] [--cache DIR] [--jobs 2] [--quick]
    python -m kdops.train reproduce --report runs/reproduce --docs docs/reproductions.md [--rerun runs/reproduce-b]

A claim (:data:`CLAIMS`, the texts in :mod:`kdops.train.claims`) is a set of arms (a method, a student, a
training-set size, its teachers) and comparisons ``"a > b"`` between them. The command trains the teachers
it needs (one per seed and ensemble member, cached under ``--cache``), chooses each arm's loss weight on a
validation split carved from the training set (one tuning seed, the same grid for every method), trains every
arm on every seed with the chosen weight, and writes ``DIR/summary.json``: per arm the per-seed test accuracies,
mean and 95 % t-interval; per comparison the mean paired difference over seeds, its interval and a verdict
(``agree``: the interval lies above 0; ``disagree``: below; ``inconclusive``: it contains 0). Every run is a
plain ``kdops distill`` / ``kdops teacher`` run directory under the cache; one that already has a summary is
reused, one that was killed is resumed. ``--quick`` is a smoke run (one seed, one epoch, small subsets, no
verdict). ``--report`` turns the summaries under a directory into the markdown page with its plots.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from kdops.train import claims as claims_mod
from kdops.train.claims import CLAIMS, TEACHERS

DEFAULT_SEEDS = (0, 1, 2, 3, 4)
TUNING_SEED = 100  # not among the evaluation seeds: the choice never sees a run it is then scored on
VAL_SPLIT = 500  # the last 500 training samples; students and teachers train on the first 3500 at most
TEACHER_POOL = 3500
GRID = (0.25, 1.0, 4.0)  # loss_weight candidates, as factors of the method's registered default
EPOCHS, TEACHER_EPOCHS = 30, 15
QUICK = {"epochs": 1, "teacher_epochs": 1, "max_subset": 300}

# two-sided 95 % quantiles of Student's t, for when scipy is missing
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


# ---------------------------------------------------------------------------------------------- statistics

def t975(df):
    """The 0.975 quantile of Student's t with `df` degrees of freedom (scipy when installed, else a table,
    rounding df down to the nearest tabulated value, which widens the interval slightly)."""
    if df < 1:
        raise ValueError("t interval needs at least 2 values")
    try:
        from scipy.stats import t
    except ImportError:
        return _T975[max(k for k in _T975 if k <= df)]
    return float(t.ppf(0.975, df))


def interval(values):
    """Mean, standard deviation and 95 % t-interval of `values` (lo = hi = mean's nan for a single value)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"n": n, "mean": mean, "sd": float("nan"), "lo": float("nan"), "hi": float("nan")}
    sd = statistics.stdev(values)
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def verdict(lo, hi):
    """The interval rule: above 0 agrees with the claimed direction, below 0 disagrees, else inconclusive."""
    if math.isnan(lo) or math.isnan(hi):
        return "inconclusive"
    if lo > 0:
        return "agree"
    if hi < 0:
        return "disagree"
    return "inconclusive"


def parse_side(side):
    """'a - b + c' -> [(+1, 'a'), (-1, 'b'), (+1, 'c')]; a term is an arm name with an optional [metric]."""
    out, sign = [], 1
    for tok in side.split():
        if tok in "+-":
            sign = 1 if tok == "+" else -1
            continue
        out.append((sign, tok))
        sign = 1
    if not out:
        raise ValueError("empty side in comparison %r" % side)
    return out


def _term_values(values, term):
    name, _, metric = term.partition("[")
    metric = metric.rstrip("]") or "acc"
    if name not in values or metric not in values[name]:
        raise ValueError("comparison names %s, which is not an arm / metric of the claim" % term)
    return values[name][metric]


def compare(values, comparison, with_verdict=True):
    """Paired difference over seeds of the two sides of ``"a > b"``: values[arm][metric] is a per-seed list."""
    left, sep, right = comparison.partition(">")
    if not sep:
        raise ValueError("a comparison reads 'a > b', got %r" % comparison)
    terms = [(s, t) for s, t in parse_side(left)] + [(-s, t) for s, t in parse_side(right)]
    n = {len(_term_values(values, t)) for _, t in terms}
    if len(n) != 1:
        raise ValueError("comparison %r: its arms ran on different numbers of seeds" % comparison)
    per_seed = [sum(s * _term_values(values, t)[i] for s, t in terms) for i in range(n.pop())]
    st = interval(per_seed)
    out = {"comparison": comparison, "per_seed": per_seed, "diff_mean": st["mean"], "lo": st["lo"], "hi": st["hi"],
           "n": st["n"]}
    out["verdict"] = verdict(st["lo"], st["hi"]) if with_verdict else None
    return out


# ---------------------------------------------------------------------------------------------- runs

def _hash(argv):
    return hashlib.sha1(json.dumps(argv).encode()).hexdigest()[:10]


def _patched_load(relabel):
    """data.load that also knows the relabelled datasets of :data:`kdops.train.claims.RELABELLED` (teachers
    on another label space over the same inputs), used only while a teacher of one is trained."""
    from kdops.train import data

    base_load = data.load

    def load(name, *a, **kw):
        if name != relabel:
            return base_load(name, *a, **kw)
        base, fn, k = claims_mod.RELABELLED[name]
        d = base_load(base, *a, **kw)
        return data.Dataset(name, d.x_train, fn(d.y_train), d.x_test, fn(d.y_test), k, d.input_shape, d.prepare)

    return data, base_load, load


def run_job(job):
    """One trainer run, quiet (its output goes to a log beside the run dir). Skipped when its summary exists;
    a run killed half-way is resumed (--resume is always passed)."""
    from kdops.train import cli

    argv, out, relabel = job["argv"], job["out"], job.get("relabel")
    if os.path.exists(os.path.join(out, "summary.json")):
        return out, 0, 0.0
    os.makedirs(os.path.dirname(out), exist_ok=True)
    t0 = time.perf_counter()
    data, base_load, load = _patched_load(relabel)
    data.load = load if relabel else base_load
    try:
        with open(out + ".log", "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            code = cli.main([str(a) for a in argv] + ["--out", out, "--resume"])
    finally:
        data.load = base_load
    return out, code, time.perf_counter() - t0


class Runner:
    """Runs batches of jobs: in this process (jobs=1) or in a pool of spawned processes, one thread each."""

    def __init__(self, jobs):
        self.jobs = jobs
        self.pool = ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) if jobs > 1 else None

    def run(self, batch):
        todo = list({j["out"]: j for j in batch if not os.path.exists(os.path.join(j["out"], "summary.json"))}.values())
        results = self.pool.map(run_job, todo) if self.pool else map(run_job, todo)
        failed = [(out, code) for out, code, _ in results if code != 0]
        if failed:
            raise SystemExit("reproduce: %d run(s) failed, first %s (see its .log)" % (len(failed), failed[0][0]))
        return len(todo)

    def close(self):
        if self.pool:
            self.pool.shutdown()


def teacher_job(cache, spec_name, seed, cfg):
    spec = TEACHERS[spec_name]
    argv = ["teacher", "--dataset", spec["dataset"], "--model", spec["model"], "--epochs", cfg["teacher_epochs"],
            "--train-subset", TEACHER_POOL, "--seed", seed + spec.get("seed_offset", 0), "--threads", 1,
            "--no-progress"]
    out = os.path.join(cache, "teachers", "%s-e%d-seed%d" % (spec_name, cfg["teacher_epochs"], seed))
    return {"argv": argv, "out": out, "relabel": spec["dataset"] if spec["dataset"] in claims_mod.RELABELLED else None}


def arm_job(cache, claim, arm, seed, hp, cfg, tuning):
    subset = min(arm.get("subset", 1000), cfg["max_subset"]) if cfg["max_subset"] else arm.get("subset", 1000)
    if arm.get("scheme") == "mutual":  # N peers trained together (kdops mutual): no teacher, its own options
        argv = ["mutual", "--dataset", claim["dataset"], "--model", arm.get("model", claim["student"]),
                "--peers", arm.get("peers", 2), "--epochs", cfg["epochs"], "--train-subset", subset, "--seed", seed,
                "--threads", 1, "--no-progress", "--mutual-weight", hp["loss_weight"]] + list(arm.get("args", ()))
    elif arm.get("scheme") == "one":  # one branched network distilled from its own gated ensemble (kdops one)
        argv = ["one", "--dataset", claim["dataset"], "--model", arm.get("model", claim["student"]),
                "--branches", arm.get("branches", 3), "--epochs", cfg["epochs"], "--train-subset", subset,
                "--seed", seed, "--threads", 1, "--no-progress", "--kd-weight", hp["loss_weight"]] \
            + list(arm.get("args", ()))
    elif arm.get("scheme") == "born-again":  # generation 0 on labels, then G generations each from the last
        argv = ["born-again", "--dataset", claim["dataset"], "--model", arm.get("model", claim["student"]),
                "--generations", arm.get("generations", 2), "--method", arm["method"], "--epochs", cfg["epochs"],
                "--train-subset", subset, "--seed", seed, "--threads", 1, "--no-progress"]
        for key, value in sorted(hp.items()):
            argv += ["--method-arg", "%s=%r" % (key, value)]
    else:
        argv = ["distill", "--dataset", claim["dataset"], "--model", arm.get("model", claim["student"]),
                "--method", arm["method"], "--epochs", cfg["epochs"], "--train-subset", subset, "--seed", seed,
                "--threads", 1, "--no-progress"]
        for key, value in sorted(hp.items()):
            argv += ["--method-arg", "%s=%r" % (key, value)]
    if arm.get("init"):  # a compressed student: start from a trained run (a TEACHERS entry) of its model
        argv += ["--student-init", teacher_job(cache, arm["init"], seed, cfg)["out"]]
    if arm.get("prune") is not None:
        argv += ["--prune", arm["prune"]]
    if arm.get("quantize"):
        argv += ["--quantize", arm["quantize"]]
    teachers = [teacher_job(cache, t, seed, cfg)["out"] for t in arm.get("teachers", ())]
    for t in teachers:
        argv += ["--teacher", t]
    t_data = {TEACHERS[t]["dataset"] for t in arm.get("teachers", ())} - {claim["dataset"]}
    if t_data:
        argv += ["--teacher-dataset", t_data.pop()]
    if tuning:
        argv += ["--val-split", VAL_SPLIT]
    key = [a.replace(cache, "<cache>") if isinstance(a, str) else a for a in argv]
    name = "%s-%s-n%d-seed%d-%s" % (arm["method"], arm.get("model", claim["student"]), subset, seed, _hash(key))
    return {"argv": argv, "out": os.path.join(cache, "tuning" if tuning else "runs", name)}


def _run_seconds(out):
    """Training time of one finished run (its epochs' times), whether trained now or reused from the cache."""
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    return s["mean_epoch_time"] * s["epochs"]


def _final_acc(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)["final_test_acc"]


def candidates(arm):
    """The loss-weight grid of an arm: GRID times the method's default weight, the arm's fixed hp kept.
    The student alone has nothing to tune."""
    from kdops.train import methods

    if arm["method"] == "none":
        return [dict(arm.get("hp", {}))]
    if arm.get("scheme") in ("mutual", "one"):  # the online term's weight (--mutual-weight / --kd-weight, 1)
        return [dict(arm.get("hp", {}), loss_weight=round(1.0 * f, 6)) for f in GRID]
    base = methods.get(arm["method"]).hparams(arm.get("hp", {}))["loss_weight"]
    return [dict(arm.get("hp", {}), loss_weight=round(base * f, 6)) for f in GRID]


def _log(msg):
    print(msg, flush=True)


def reproduce(name, seeds=DEFAULT_SEEDS, out=None, cache=None, jobs=2, quick=False, log=_log):
    """Runs claim `name` and writes ``out/summary.json``; returns the summary."""
    claim = CLAIMS[name]
    cfg = dict(QUICK) if quick else {"epochs": claim.get("epochs", EPOCHS), "teacher_epochs": TEACHER_EPOCHS,
                                     "max_subset": None}
    seeds = list(seeds)[:1] if quick else list(seeds)
    out = out or os.path.join("runs", "reproduce", name)
    cache = os.path.abspath(cache or os.path.join(out, "cache"))
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    runner = Runner(jobs)
    try:
        specs = sorted({t for arm in claim["arms"] for t in arm.get("teachers", ())}
                       | {arm["init"] for arm in claim["arms"] if arm.get("init")})
        batch = [teacher_job(cache, s, seed, cfg) for s in specs for seed in [TUNING_SEED] + seeds]
        every = [j["out"] for j in batch]
        n = runner.run(batch)
        trained, total = n, len(batch)
        log("%s: teachers ready (%d trained), %.0f s" % (name, n, time.perf_counter() - t0))

        tuning, jobs_by_arm = {}, {}
        for arm in claim["arms"]:
            cands = candidates(arm)
            jobs_by_arm[arm["name"]] = [(hp, arm_job(cache, claim, arm, TUNING_SEED, hp, cfg, True)) for hp in cands]
        to_tune = [j for arm in claim["arms"] if len(jobs_by_arm[arm["name"]]) > 1 for _, j in jobs_by_arm[arm["name"]]]
        n = runner.run(to_tune)
        trained, total = trained + n, total + len(to_tune)
        every += [j["out"] for j in to_tune]
        for arm in claim["arms"]:
            cands = jobs_by_arm[arm["name"]]
            if len(cands) == 1:
                tuning[arm["name"]] = {"candidates": [], "chosen": cands[0][0]}
                continue
            scored = [{"hp": hp, "val_acc": _final_acc(j["out"])} for hp, j in cands]
            # the highest validation accuracy; a tie goes to the candidate nearest the default (the middle one)
            order = sorted(range(len(scored)), key=lambda i: (-scored[i]["val_acc"], abs(i - len(scored) // 2)))
            tuning[arm["name"]] = {"candidates": scored, "chosen": scored[order[0]]["hp"]}
        log("%s: hyper-parameters chosen (%d tuning runs), %.0f s" % (name, n, time.perf_counter() - t0))

        runs = {arm["name"]: [arm_job(cache, claim, arm, s, tuning[arm["name"]]["chosen"], cfg, False) for s in seeds]
                for arm in claim["arms"]}
        batch = [j for arm in claim["arms"] for j in runs[arm["name"]]]
        n = runner.run(batch)
        trained, total = trained + n, total + len(batch)
        every += [j["out"] for j in batch]
        log("%s: arms done (%d runs), %.0f s" % (name, n, time.perf_counter() - t0))
    finally:
        runner.close()

    values = {a: {"acc": [_final_acc(j["out"]) for j in js]} for a, js in runs.items()}
    hook = claim.get("extra_metrics")
    if hook:
        for arm_name, metrics in hook(claim, {a: [j["out"] for j in js] for a, js in runs.items()}).items():
            values[arm_name].update(metrics)
    teachers = {}
    for s in specs:
        accs = [_final_acc(teacher_job(cache, s, seed, cfg)["out"]) for seed in seeds]
        teachers[s] = dict(TEACHERS[s], per_seed=accs, **interval(accs))
    arms = {}
    for arm in claim["arms"]:
        a = dict(arm)
        a.pop("name")
        a["model"] = arm.get("model", claim["student"])
        a["subset"] = runs[arm["name"]][0]["argv"][runs[arm["name"]][0]["argv"].index("--train-subset") + 1]
        a["hp"] = tuning[arm["name"]]["chosen"]
        a["metrics"] = {m: dict(per_seed=v, **interval(v)) for m, v in values[arm["name"]].items()}
        arms[arm["name"]] = a
    summary = {
        "claim": name, "quick": quick, "seeds": seeds, "source": claim["source"], "statement": claim["statement"],
        "paper": claim["paper"], "missing": claim.get("missing", []), "notes": claim.get("notes", ""),
        "full_scale": claim["full_scale"],
        "setup": {"dataset": claim["dataset"], "student": claim["student"], "epochs": cfg["epochs"],
                  "teacher_epochs": cfg["teacher_epochs"], "teacher_train_samples": TEACHER_POOL,
                  "optimizer": "SGD momentum 0.9, lr 0.05, weight decay 5e-4, cosine schedule, batch 64",
                  "metric": "test accuracy after the last epoch",
                  "teacher_seeds": "the student's seed, plus 1000 per ensemble member after the first"},
        "tuning": {"seed": TUNING_SEED, "validation": "the last %d training samples (never trained on, the test "
                   "set never looked at)" % VAL_SPLIT, "grid": "loss_weight = default x %s, other hp as "
                   "registered (or as the arm fixes them); the same 3 candidates for every method; the student "
                   "alone has none" % list(GRID), "rule": "highest validation accuracy after the last epoch; "
                   "ties go to the default", "choices": tuning},
        "teachers": teachers, "arms": arms,
        "comparisons": [compare(values, c, with_verdict=not quick) for c in claim["comparisons"]],
        "wall_s": time.perf_counter() - t0, "runs": {"trained": trained, "total": total,
                                                          "train_s": sum(_run_seconds(o) for o in set(every))},
    }
    summary = _json_safe(summary)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
    return summary


def _json_safe(x):
    """NaN (the interval of a single seed) as null, so that summary.json is strict JSON; callables dropped."""
    if isinstance(x, float):
        return None if math.isnan(x) else x
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items() if not callable(v)}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _f(x, fmt):
    return "-" if x is None else fmt % x


def print_summary(s, file=None):
    file = file or sys.stdout
    print("claim %s (%s)%s" % (s["claim"], s["source"], " [quick: no verdict]" if s["quick"] else ""), file=file)
    for name, a in s["arms"].items():
        m = a["metrics"]["acc"]
        print("  %-22s %.4f  [%s, %s]  n=%d" % (name, m["mean"], _f(m["lo"], "%.4f"), _f(m["hi"], "%.4f"), m["n"]),
              file=file)
    for c in s["comparisons"]:
        print("  %-46s %+.4f  [%s, %s]  %s" % (c["comparison"], c["diff_mean"], _f(c["lo"], "%+.4f"),
                                              _f(c["hi"], "%+.4f"), c["verdict"] or "-"), file=file)
    print("  %.0f s" % s["wall_s"], file=file)


def build_parser():
    p = argparse.ArgumentParser(prog="kdops reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="the claim (see --list)")
    p.add_argument("--list", action="store_true", help="list the claims")
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    p.add_argument("--out", help="where summary.json goes (default runs/reproduce/NAME)")
    p.add_argument("--cache", help="teachers' and runs' directories (default OUT/cache); share one between claims "
                                   "to reuse the runs they have in common")
    p.add_argument("--jobs", type=int, default=2, help="parallel runs, one thread each (default 2)")
    p.add_argument("--quick", action="store_true", help="smoke run: one seed, one epoch, no verdict")
    p.add_argument("--report", metavar="DIR", help="write the docs page from DIR/*/summary.json instead")
    p.add_argument("--docs", default=os.path.join("docs", "reproductions.md"), help="with --report: the page")
    p.add_argument("--rerun", metavar="DIR", help="with --report: the same claims run on other seeds "
                                                  "(DIR/*/summary.json), compared with the first run's intervals")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.list:
        for name, c in CLAIMS.items():
            print("%-18s %-28s %s" % (name, c["source"], c["statement"]))
        return 0
    if args.report:
        from kdops.train import reproduce_docs

        if args.rerun and not os.path.isdir(args.rerun):
            print("kdops reproduce: error: --rerun %s is not a directory" % args.rerun, file=sys.stderr)
            return 2
        reproduce_docs.write(args.report, args.docs, args.rerun)
        print("wrote %s" % args.docs)
        return 0
    if args.name not in CLAIMS:
        print("kdops reproduce: error: name one claim of: %s (or --list)" % ", ".join(CLAIMS), file=sys.stderr)
        return 2
    if len(set(args.seeds)) != len(args.seeds) or TUNING_SEED in args.seeds:
        print("kdops reproduce: error: seeds must be distinct and not the tuning seed %d" % TUNING_SEED,
              file=sys.stderr)
        return 2
    if args.jobs < 1:
        print("kdops reproduce: error: --jobs must be >= 1", file=sys.stderr)
        return 2
    print_summary(reproduce(args.name, args.seeds, args.out, args.cache, args.jobs, args.quick))
    sys.stdout.flush()
    return 0
