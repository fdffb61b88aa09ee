"""kdops reproduce: the statistics and the verdict rule against known numbers, the claims registry, and small
runs of one claim that must write a strict, self-consistent summary.json."""

import json
import math
import os
import sys

import pytest

from kdops.train import cli, claims, methods, reproduce
from kdops.train.reproduce import compare, interval, t975, verdict

ISSUE_CLAIMS = ("kd-small-data", "fkd-vs-baselines", "fkd-ensemble", "fkd-cross-dataset", "fkd-multiview",
                "ofd-ablation", "logsum-recipe", "kd2m-metrics")


def test_t_quantiles_and_interval_match_tables():
    for df, q in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert t975(df) == pytest.approx(q, abs=1e-3)
    st = interval([1.0, 2.0, 3.0, 4.0, 5.0])  # sd sqrt(2.5), half width 2.776 * sd / sqrt(5)
    assert st["mean"] == 3.0 and st["sd"] == pytest.approx(math.sqrt(2.5))
    assert (st["lo"], st["hi"]) == pytest.approx((3 - 1.9632, 3 + 1.9632), abs=1e-3)
    one = interval([0.7])
    assert one["n"] == 1 and math.isnan(one["lo"]) and math.isnan(one["hi"])


def test_t_table_without_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # import fails: the built-in table answers
    assert t975(4) == 2.776 and t975(22) == 2.086  # df 22 rounds down to 20 (a slightly wider interval)
    assert interval([1.0, 2.0, 3.0, 4.0, 5.0])["hi"] == pytest.approx(3 + 2.776 * math.sqrt(2.5 / 5))


@pytest.mark.parametrize("lo, hi, expected", [(0.01, 0.2, "agree"), (-0.2, -1e-6, "disagree"),
                                              (-0.1, 0.1, "inconclusive"), (0.0, 0.1, "inconclusive"),
                                              (-0.1, 0.0, "inconclusive"), (float("nan"), float("nan"), "inconclusive")])
def test_verdict_rule(lo, hi, expected):
    assert verdict(lo, hi) == expected


def test_paired_comparison_against_known_numbers():
    values = {"a": {"acc": [0.90, 0.92, 0.91]}, "b": {"acc": [0.88, 0.90, 0.90]},
              "c": {"acc": [0.80, 0.80, 0.80]}, "d": {"acc": [0.79, 0.81, 0.80]}}
    c = compare(values, "a > b")  # differences 0.02, 0.02, 0.01: sd 0.005774, half 4.303 * sd / sqrt(3)
    assert c["per_seed"] == pytest.approx([0.02, 0.02, 0.01])
    assert c["diff_mean"] == pytest.approx(0.016667, abs=1e-6)
    assert (c["lo"], c["hi"]) == pytest.approx((0.016667 - 0.014344, 0.016667 + 0.014344), abs=1e-5)
    assert c["verdict"] == "agree" and compare(values, "b > a")["verdict"] == "disagree"
    # a gain against a gain: (a - b) - (c - d) = 0.02 - 0.01, 0.02 + 0.01, 0.01 + 0.0
    g = compare(values, "a - b > c - d")
    assert g["per_seed"] == pytest.approx([0.01, 0.03, 0.01]) and g["verdict"] == "inconclusive"
    assert compare(values, "a > b", with_verdict=False)["verdict"] is None
    with pytest.raises(ValueError, match="not an arm"):
        compare(values, "a > e")
    with pytest.raises(ValueError, match="different numbers of seeds"):
        compare(dict(values, e={"acc": [0.5]}), "a > e")


def test_registry_covers_the_issue_and_is_consistent():
    assert set(ISSUE_CLAIMS) <= set(claims.CLAIMS)
    assert len(reproduce.DEFAULT_SEEDS) >= 5 and reproduce.TUNING_SEED not in reproduce.DEFAULT_SEEDS
    for name, c in claims.CLAIMS.items():
        assert c["comparisons"], name
        names = [a["name"] for a in c["arms"]]
        assert len(names) == len(set(names)), name
        for arm in c["arms"]:
            scheme = arm.get("scheme")  # a scheme without a teacher (kdops mutual), or a distill method
            assert scheme in (None, "mutual", "born-again", "one"), (name, arm)
            assert scheme or arm["method"] in methods.METHODS, (name, arm)
            assert scheme != "born-again" or arm["method"] in methods.METHODS, (name, arm)
            assert all(t in claims.TEACHERS for t in arm.get("teachers", ())), (name, arm)
            assert (arm["method"] == "none" or scheme is not None) == (not arm.get("teachers")), (name, arm)
            assert len(reproduce.candidates(arm)) == (1 if arm["method"] == "none" else len(reproduce.GRID))
        fake = {a: {"acc": [0.5, 0.6], "single_view": [0.4, 0.5], "multi_view": [0.6, 0.7], "gen0": [0.5, 0.5],
                    "gen1": [0.5, 0.5], "gen2": [0.5, 0.5], "ensemble": [0.5, 0.5]} for a in names}
        for comp in c["comparisons"]:
            compare(fake, comp)  # every comparison names arms of its claim
        for key in ("source", "statement", "paper", "full_scale", "dataset", "student"):
            assert c[key], (name, key)


def test_single_view_mask():
    mask = claims._single_view_mask()
    assert mask.dtype == __import__("torch").bool and 0.05 < mask.float().mean().item() < 0.5


def _strict_json(path):
    with open(path) as f:
        return json.load(f, parse_constant=lambda c: pytest.fail("summary.json holds %s" % c))


def test_quick_run_writes_a_valid_summary_and_reuses_its_runs(tmp_path, capsys):
    out, cache = str(tmp_path / "mv"), str(tmp_path / "cache")
    assert cli.main(["reproduce", "fkd-multiview", "--quick", "--out", out, "--cache", cache, "--jobs", "1"]) == 0
    assert "fkd[single_view] > none[single_view]" in capsys.readouterr().out
    s = _strict_json(os.path.join(out, "summary.json"))
    assert s["claim"] == "fkd-multiview" and s["quick"] and s["seeds"] == [0]
    assert set(s["arms"]) == {"none", "fkd", "kd"}
    for arm in s["arms"].values():
        assert set(arm["metrics"]) == {"acc", "single_view", "multi_view"}
        assert len(arm["metrics"]["acc"]["per_seed"]) == 1 and 0.0 <= arm["metrics"]["acc"]["mean"] <= 1.0
    assert all(c["verdict"] is None for c in s["comparisons"])  # no verdict from a smoke run
    choices = s["tuning"]["choices"]
    assert choices["none"]["candidates"] == [] and len(choices["fkd"]["candidates"]) == 3
    assert choices["fkd"]["chosen"] in [c["hp"] for c in choices["fkd"]["candidates"]]
    for t in s["teachers"].values():
        assert t["model"] == "mlp-l" and len(t["per_seed"]) == 1
    runs = sorted(os.listdir(os.path.join(cache, "runs")))
    stamp = {r: os.path.getmtime(os.path.join(cache, "runs", r)) for r in runs}
    reproduce.reproduce("fkd-multiview", [0], out, cache, jobs=1, quick=True, log=lambda m: None)
    assert sorted(os.listdir(os.path.join(cache, "runs"))) == runs  # every run reused, none retrained
    assert all(os.path.getmtime(os.path.join(cache, "runs", r)) == stamp[r] for r in runs)


def test_verdicts_follow_the_interval_rule_in_a_real_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "EPOCHS", 2)
    monkeypatch.setattr(reproduce, "TEACHER_EPOCHS", 2)
    s = reproduce.reproduce("fkd-multiview", [0, 1, 2], str(tmp_path / "mv"), str(tmp_path / "cache"), jobs=1,
                            log=lambda m: None)
    assert s == _strict_json(str(tmp_path / "mv" / "summary.json"))
    values = {a: {m: v["per_seed"] for m, v in arm["metrics"].items()} for a, arm in s["arms"].items()}
    for c in s["comparisons"]:
        st = interval(c["per_seed"])
        assert (c["lo"], c["hi"]) == pytest.approx((st["lo"], st["hi"]))
        assert c["per_seed"] == pytest.approx(compare(values, c["comparison"])["per_seed"])
        expected = "agree" if c["lo"] > 0 else "disagree" if c["hi"] < 0 else "inconclusive"
        assert c["verdict"] == expected
    for arm in s["arms"].values():
        assert arm["subset"] == 1000 and len(arm["metrics"]["acc"]["per_seed"]) == 3


def test_val_split_evaluates_on_held_out_training_samples(tmp_path):
    out = str(tmp_path / "t")
    assert cli.main(["teacher", "--dataset", "multiview", "--model", "mlp-s", "--epochs", "1", "--val-split", "500",
                     "--train-subset", "200", "--out", out, "--no-progress", "--threads", "1"]) == 0
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["evaluated_on"] == "validation"
    assert cli.main(["teacher", "--dataset", "multiview", "--model", "mlp-s", "--epochs", "1", "--val-split", "3999",
                     "--out", str(tmp_path / "u"), "--no-progress"]) == 2


def test_reproduce_command_line(capsys):
    assert cli.main(["reproduce", "--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(claims.CLAIMS)
    assert cli.main(["reproduce", "no-such-claim"]) == 2
    assert cli.main(["reproduce", "kd-small-data", "--seeds", "1", "1"]) == 2
    assert cli.main(["reproduce", "kd-small-data", "--seeds", str(reproduce.TUNING_SEED)]) == 2
    assert cli.main(["reproduce", "--report", "runs", "--rerun", "no/such/dir"]) == 2


def _fake_summary(claim, seeds, diffs, accs):
    """A summary with one comparison per `diffs` entry (per-seed values) and one arm per `accs` entry."""
    comps = []
    for name, per_seed in diffs.items():
        st = interval(per_seed)
        comps.append({"comparison": name, "per_seed": per_seed, "diff_mean": st["mean"], "lo": st["lo"],
                      "hi": st["hi"], "n": st["n"], "verdict": verdict(st["lo"], st["hi"])})
    arms = {a: {"metrics": {"acc": dict(per_seed=v, **interval(v))}} for a, v in accs.items()}
    return {"claim": claim, "quick": False, "seeds": seeds, "comparisons": comps, "arms": arms}


def test_rerun_section_counts_means_inside_the_first_intervals():
    from kdops.train.reproduce_docs import rerun_section

    first = {"c": _fake_summary("c", [0, 1, 2], {"a > b": [0.01, 0.02, 0.03], "a > z": [-0.01, 0.0, 0.01]},
                                {"a": [0.90, 0.91, 0.92], "b": [0.80, 0.81, 0.82]})}
    # a > b: first 0.02 in [-0.0048, +0.0448]; the rerun's mean 0.05 lies outside it. a > z: 0.0 inside.
    second = {"c": _fake_summary("c", [5, 6, 7], {"a > b": [0.04, 0.05, 0.06], "a > z": [0.0, 0.0, 0.0]},
                                 {"a": [0.91, 0.91, 0.91], "b": [0.70, 0.70, 0.70]})}
    text = "\n".join(rerun_section(first, second))
    assert "Inside: 1 of 2 comparisons; 1 of 2 arms' mean test accuracies. Same verdict: 1 of 2" in text
    assert "| c | `a > b` | +0.0200 [-0.0048, +0.0448] | +0.0500 [+0.0252, +0.0748] | **no** | " \
           "inconclusive -> agree |" in text
    assert "| c | `a > z` |" in text and "| yes | inconclusive -> inconclusive |" in text
    assert "seeds 5 6 7" in text
    assert rerun_section(first, {}) == []  # no claim run twice: no section
