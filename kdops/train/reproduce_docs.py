"""docs/reproductions.md from the summaries ``kdops reproduce`` writes: per claim the arms (mean and 95 %
interval over seeds), the comparisons with their verdicts, the paper's own figure, the setup, what was not
run and why, and the recipe at full scale; one plot per claim under ``docs/reproductions/``."""

import glob
import json
import os
import re

from kdops.train.claims import CLAIMS

# Descriptions come from the registry when the claim is still in it (they are documentation, not results),
# so a reworded claim needs no re-run; everything measured comes from the summary.
TEXTS = ("source", "statement", "paper", "notes", "full_scale", "missing")

COMMANDS = """```bash
make reproduce                                   # every claim, 5 seeds, then this page (24 min from scratch, 2 idle cores)
python -m kdops.train reproduce --list           # the claims
python -m kdops.train reproduce fkd-ensemble --seeds 5 6 7 8 9 --out runs/fkd-ensemble-b   # one claim, other seeds
python -m kdops.train reproduce kd-small-data --quick                  # smoke run: 1 seed, 1 epoch, no verdict
python -m kdops.train reproduce --report runs/reproduce --docs docs/reproductions.md       # this page again
make reproduce-rerun                             # every claim again on seeds 5-9, and the rerun section below
```"""


def _ci(lo, hi, fmt="%.4f"):
    return "-" if lo is None or hi is None else "[%s, %s]" % (fmt % lo, fmt % hi)


def _hp(hp):
    return ", ".join("%s=%s" % (k, v) for k, v in sorted(hp.items())) or "-"


def _trained(s):
    r = s.get("runs")
    if not r:
        return "run counts not recorded"
    return ("%d of its %d runs trained in that call, the rest reused from the cache; the training time of all its "
            "runs, summed, is %.0f s (one thread each)" % (r["trained"], r["total"], r.get("train_s", float("nan"))))


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary["arms"].items())
    comps = summary["comparisons"]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 0.22 * (len(arms) + len(comps)) + 2.0),
                               gridspec_kw={"height_ratios": [len(arms) + 1, len(comps) + 1]})
    for i, (name, arm) in enumerate(arms):
        m = arm["metrics"]["acc"]
        err = None if m["lo"] is None else [[m["mean"] - m["lo"]], [m["hi"] - m["mean"]]]
        a.errorbar(m["mean"], i, xerr=err, fmt="o", color="C0", capsize=3)
        a.plot(m["per_seed"], [i] * len(m["per_seed"]), ".", color="0.6", ms=4)
    a.set_yticks(range(len(arms)), [n for n, _ in arms], fontsize=7)
    a.invert_yaxis()
    a.set_xlabel("test accuracy (mean, 95 % CI; grey: seeds)", fontsize=8)
    colours = {"agree": "C2", "disagree": "C3", "inconclusive": "0.4", None: "C0"}
    for i, c in enumerate(comps):
        err = None if c["lo"] is None else [[c["diff_mean"] - c["lo"]], [c["hi"] - c["diff_mean"]]]
        b.errorbar(c["diff_mean"], i, xerr=err, fmt="o", color=colours[c["verdict"]], capsize=3)
    b.axvline(0, color="k", lw=0.8)
    b.set_yticks(range(len(comps)), [c["comparison"] for c in comps], fontsize=6)
    b.invert_yaxis()
    b.set_xlabel("paired difference (green agree, red disagree, grey inconclusive)", fontsize=8)
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("%s (n = %d seeds)" % (summary["claim"], len(summary["seeds"])), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def plot_gain_vs_size(summary, path):
    """For claims whose comparisons read 'M-X-nN > none-X-nN': the gain against the training-set size, one line
    per student X. Returns False when the claim has no such comparisons."""
    lines = {}
    for c in summary["comparisons"]:
        m = re.fullmatch(r"(\w+)-(\w+)-n(\d+) > none-\2-n\3", c["comparison"])
        if m:
            lines.setdefault("%s, student %s" % (m.group(1), m.group(2)), []).append((int(m.group(3)), c))
    if not lines:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for k, (label, pts) in enumerate(sorted(lines.items())):
        pts.sort()
        xs = [n * (1 + 0.04 * k) for n, _ in pts]  # a small offset so the intervals do not overlap
        ys = [c["diff_mean"] for _, c in pts]
        err = None if any(c["lo"] is None for _, c in pts) else [
            [c["diff_mean"] - c["lo"] for _, c in pts], [c["hi"] - c["diff_mean"] for _, c in pts]]
        ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label=label)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks([n for n, _ in pts], [str(n) for n, _ in pts])
    ax.set_xlabel("training samples", fontsize=8)
    ax.set_ylabel("test acc gain over the student alone", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return True


def claim_section(s, plot_rel, gain_rel=None):
    out = ["## `%s`" % s["claim"], "", "**Claim** (%s): %s." % (s["source"], s["statement"]), ""]
    if s["quick"]:
        out += ["*Quick smoke run: one seed, one epoch; no verdict.*", ""]
    out += ["| comparison | mean difference | 95 % CI | verdict |", "|---|---|---|---|"]
    for c in s["comparisons"]:
        out.append("| `%s` | %+.4f | %s | **%s** |" % (c["comparison"], c["diff_mean"], _ci(c["lo"], c["hi"], "%+.4f"),
                                                    c["verdict"] or "-"))
    out += ["", "**The paper's own figure:** %s" % s["paper"], ""]
    metrics = sorted({m for a in s["arms"].values() for m in a["metrics"]} - {"acc"})
    head = "| arm | method | student | train samples | teachers | chosen hp | test acc (95 % CI) |"
    head += "".join(" %s acc (95 %% CI) |" % m.replace("_", "-") for m in metrics)
    out += [head, "|" + "---|" * (7 + len(metrics))]
    for name, a in s["arms"].items():
        m = a["metrics"]["acc"]
        row = "| %s | %s | %s | %s | %s | %s | %.4f %s |" % (
            name, a["method"], a["model"], a["subset"], ", ".join(a.get("teachers", ())) or "-", _hp(a["hp"]),
            m["mean"], _ci(m["lo"], m["hi"]))
        for k in metrics:
            v = a["metrics"].get(k)
            row += " %s |" % ("-" if v is None else "%.4f %s" % (v["mean"], _ci(v["lo"], v["hi"])))
        out.append(row)
    out += ["", "![%s](%s)" % (s["claim"], plot_rel), ""]
    if gain_rel:
        out += ["![%s: gain against the training-set size](%s)" % (s["claim"], gain_rel), ""]
    for miss in s["missing"]:
        out += ["**Not run:** %s" % miss, ""]
    st, tu = s["setup"], s["tuning"]
    teachers = "; ".join("%s (%s on %s) %.4f %s" % (k, t["model"], t["dataset"], t["mean"], _ci(t["lo"], t["hi"]))
                         for k, t in s["teachers"].items()) or "none"
    out += ["**Setup.** %s, student %s unless the arm says otherwise, trained for %d epochs; teachers trained by "
            "the command on the first %d training samples for %d epochs, one per seed (teacher seed: %s). %s; %s. "
            "Seeds %s: the seed "
            "fixes the student's initialisation and data order, and every arm of the claim shares the seeds and the "
            "teachers of each seed. %s" % (
                st["dataset"], st["student"], st["epochs"], st["teacher_train_samples"], st["teacher_epochs"],
                st["teacher_seeds"], st["optimizer"], st["metric"], ", ".join(map(str, s["seeds"])), s["notes"]),
            "", "**Teachers' test accuracy** (mean, 95 %% CI over seeds): %s." % teachers, "",
            "**Hyper-parameters**, chosen on tuning seed %d (a seed of its own, never an evaluation seed) against "
            "a validation split, %s: %s; %s. Validation accuracy per candidate:" % (
                tu["seed"], tu["validation"], tu["grid"], tu["rule"]), ""]
    for arm, ch in tu["choices"].items():
        if ch["candidates"]:
            cands = [c["hp"] for c in ch["candidates"]]
            edge = " (an edge of the grid)" if cands.index(ch["chosen"]) in (0, len(cands) - 1) else ""
            out.append("- %s: %s -> **%s**%s" % (arm, ", ".join("%s %.4f" % (c["hp"].get("loss_weight"), c["val_acc"])
                                                                for c in ch["candidates"]),
                                                  ch["chosen"]["loss_weight"], edge))
    out += ["", "**At full scale (GPU).** %s" % s["full_scale"], "",
            "Wall time of this claim's last call: %.0f s, %s." % (s["wall_s"], _trained(s)), ""]
    return out


def _inside(x, lo, hi):
    return lo is not None and hi is not None and lo <= x <= hi


def rerun_section(first, second):
    """The rerun check: each claim run again on other seeds (same teachers' recipe, same hyper-parameters, which
    the tuning seed fixes). Per comparison and per arm, whether the rerun's mean lies inside the first run's
    95 % interval, and both verdicts. `first`, `second`: claim name -> summary."""
    both = [n for n in first if n in second and not first[n]["quick"] and not second[n]["quick"]]
    both.sort(key=lambda n: list(CLAIMS).index(n) if n in CLAIMS else len(CLAIMS))
    if not both:
        return []
    rows, n_in, n_tot, a_in, a_tot, same = [], 0, 0, 0, 0, 0
    for name in both:
        f, r = first[name], second[name]
        rc = {c["comparison"]: c for c in r["comparisons"]}
        for c in f["comparisons"]:
            d = rc.get(c["comparison"])
            if d is None:
                continue
            ok = _inside(d["diff_mean"], c["lo"], c["hi"])
            n_in, n_tot, same = n_in + ok, n_tot + 1, same + (c["verdict"] == d["verdict"])
            rows.append("| %s | `%s` | %+.4f %s | %+.4f %s | %s | %s -> %s |" % (
                name, c["comparison"], c["diff_mean"], _ci(c["lo"], c["hi"], "%+.4f"), d["diff_mean"],
                _ci(d["lo"], d["hi"], "%+.4f"), "yes" if ok else "**no**", c["verdict"], d["verdict"]))
        for arm, a in f["arms"].items():
            b = r["arms"].get(arm)
            if b is not None:
                m, k = a["metrics"]["acc"], b["metrics"]["acc"]
                a_in, a_tot = a_in + _inside(k["mean"], m["lo"], m["hi"]), a_tot + 1
    seeds = sorted({tuple(second[n]["seeds"]) for n in both})
    out = ["## Rerun with other seeds", "",
           "Every claim below was run a second time on seeds %s (new teachers and students; the hyper-parameters "
           "are the same, chosen on the tuning seed). A comparison's rerun is *inside* when its mean lies in the "
           "first run's 95 %% interval. With 5 seeds on each side, the mean of an independent rerun falls inside "
           "a 95 %% t-interval about 88 %% of the time (its difference from the first mean has twice the variance "
           "of one mean), so a few outside are expected." % ", ".join(" ".join(map(str, t)) for t in seeds), "",
           "**Inside: %d of %d comparisons; %d of %d arms' mean test accuracies. Same verdict: %d of %d "
           "comparisons.**" % (n_in, n_tot, a_in, a_tot, same, n_tot), "",
           "| claim | comparison | first run (95 % CI) | rerun (95 % CI) | inside | verdicts |",
           "|---|---|---|---|---|---|"]
    return out + rows + [""]


def _summaries(summary_dir):
    found = {}
    for path in sorted(glob.glob(os.path.join(summary_dir, "*", "summary.json"))):
        with open(path) as f:
            s = json.load(f)
        if s["claim"] in CLAIMS:
            s.update({k: CLAIMS[s["claim"]].get(k, s.get(k)) for k in TEXTS})
        found[s["claim"]] = s
    return found


def write(summary_dir, docs, rerun_dir=None):
    found = _summaries(summary_dir)
    if not found:
        raise SystemExit("reproduce --report: no */summary.json under %s" % summary_dir)
    plots = os.path.join(os.path.dirname(docs) or ".", "reproductions")
    os.makedirs(plots, exist_ok=True)
    ordered = [found[n] for n in CLAIMS if n in found] + [s for n, s in found.items() if n not in CLAIMS]
    lines = ["# Reproductions", "",
             "The seed papers' claims re-run at CPU scale by `kdops reproduce` (kdops/train/reproduce.py, the claims "
             "in kdops/train/claims.py). Each comparison `a > b` is the mean over seeds of the paired difference "
             "of test accuracies, with a 95 % t-interval over seeds; the verdict is **agree** when the interval lies "
             "above 0, **disagree** when it lies below, **inconclusive** otherwise. The verdicts are as they came "
             "out: no claim was tuned until it agreed. Hyper-parameters were chosen on a validation split carved "
             "from the training set, on a seed of their own, with the same three candidates for every method.",
             "", COMMANDS, "", "## Verdicts", "", "| claim | comparison | mean difference | 95 % CI | verdict |",
             "|---|---|---|---|---|"]
    for s in ordered:
        for c in s["comparisons"]:
            lines.append("| %s | `%s` | %+.4f | %s | %s |" % (s["claim"], c["comparison"], c["diff_mean"],
                                                          _ci(c["lo"], c["hi"], "%+.4f"), c["verdict"] or "-"))
    missing = [(s["claim"], m) for s in ordered for m in s["missing"]]
    if missing:
        lines += ["", "Parts of claims not run (the trainer lacks the method options; details under each claim): "
                  + "; ".join("%s" % c for c, _ in missing) + "."]
    train_s = sum(s.get("runs", {}).get("train_s", 0.0) for s in ordered)
    lines += ["", "Training time of every run behind this page, summed per claim (a run shared by two claims counts "
              "in both): %.0f s on one thread each; `make reproduce` trains two at once." % train_s, ""]
    if rerun_dir:
        lines += rerun_section(found, _summaries(rerun_dir))
    for s in ordered:
        png = os.path.join(plots, "%s.png" % s["claim"])
        plot(s, png)
        gain = os.path.join(plots, "%s-gain.png" % s["claim"])
        rel = lambda p: os.path.relpath(p, os.path.dirname(docs) or ".")  # noqa: E731
        lines += claim_section(s, rel(png), rel(gain) if plot_gain_vs_size(s, gain) else None)
    with open(docs, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
