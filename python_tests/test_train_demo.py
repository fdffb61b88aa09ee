"""`make demo` in miniature: the table, the files, and kdops / reference agreement of the timed losses."""

import json
import os

import pytest

from kdops.train import demo


def test_demo_writes_table_plot_and_runs(tmp_path):
    out = str(tmp_path / "demo")
    rows = demo.main(["--out", out, "--seeds", "2", "--epochs", "4", "--teacher-epochs", "2", "--methods", "none",
                      "kd", "logsum", "--repeats", "2"])
    assert [r["method"] for r in rows] == ["none", "kd", "logsum"]
    assert all(r["seeds"] == 2 and r["test_acc_mean"] > 0.3 for r in rows)  # chance is 0.1
    assert rows[0]["loss_ms_kdops"] is None
    for r in rows[1:]:
        assert r["loss_ms_kdops"] > 0 and r["loss_ms_reference"] > 0 and r["loss_abs_diff"] < 1e-3
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["rows"] == rows and saved["teacher_test_acc"] > 0.5
    table = open(os.path.join(out, "results.md")).read()
    assert "| kd |" in table and "| student alone |" in table
    assert os.path.getsize(os.path.join(out, "accuracy.png")) > 1000
    assert sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))) == [
        "kd-seed0", "kd-seed1", "logsum-seed0", "logsum-seed1", "none-seed0", "none-seed1", "teacher"]


def test_demo_replaces_only_a_previous_demo(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit, match="does not hold a previous demo"):
        demo.main(["--out", str(tmp_path), "--seeds", "1", "--epochs", "1", "--methods", "none"])
    assert (tmp_path / "mine.txt").read_text() == "keep"
