"""benchmarks/report.py on a small synthetic pytest-benchmark run: ratios, floors, missing providers, plots."""

import json
import re

from benchmarks import report


def bench(family, provider, median_s, peak, iqr_s=0.0, device="cpu", **params):
    b = {"name": "test_x[%s]" % provider, "group": family,
         "params": {"provider": provider, "device": device, **params} if provider else {"device": device, **params},
         "stats": {"median": median_s, "iqr": iqr_s, "rounds": 7},
         "extra_info": {"family": family, "peak_mib": peak, "device": device,
                        "params": {k: str(v) for k, v in params.items()}}}
    return b


def run_json():
    shape = dict(shape="64x100", dtype="fp32")
    return {
        "machine_info": {"system": "Linux", "python_version": "3.11",
                         "kdops": {"cpu_model": "Test CPU", "logical_cpus": 2, "torch_threads": 2, "torch": "2.x",
                                   "torch_cuda": None, "gpu": None, "build": {"version": "0.1.0", "cuda_built": True},
                                   "date": "2026-01-01 00:00 UTC", "command": "pytest benchmarks"}},
        "benchmarks": [
            bench("kd", "kdops", 0.002, 1.0, 0.0001, mode="fwd+bwd", **shape),
            bench("kd", "eager", 0.010, 8.0, mode="fwd+bwd", **shape),
            bench("kd", "compiled", 0.004, 2.0, mode="fwd+bwd", **shape),
            bench("kd", None, 0.001, 0.5, mode="floor", **shape),  # old-style floor: no provider parameter
            # a second configuration without a compiled run, and a floor given as a provider
            bench("ot", "kdops-online", 0.003, 1.0, mode="fwd+bwd", shape="256x128", dtype="fp32"),
            bench("ot", "kdops", 0.002, 4.0, mode="fwd+bwd", shape="256x128", dtype="fp32"),
            bench("ot", "pot", 0.012, 10.0, mode="fwd+bwd", shape="256x128", dtype="fp32"),
            bench("ot", "eager", 0.008, 8.0, mode="fwd+bwd", shape="256x128", dtype="fp32"),
            bench("ot", "floor", 0.0005, 0.1, mode="fwd+bwd", shape="256x128", dtype="fp32"),
            bench("ot", "kdops", 0.020, 40.0, mode="fwd+bwd", shape="1024x128", dtype="fp32"),
            bench("ot", "pot", 0.100, 80.0, mode="fwd+bwd", shape="1024x128", dtype="fp32"),
        ],
    }


def table_rows(text, family):
    section = text.split("### %s" % family)[1].split("###")[0]
    lines = [l for l in section.splitlines() if l.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in l.strip("|").split("|")))) for l in lines[2:]]


def test_ratios_floor_and_memory(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run_json()))
    out = tmp_path / "RESULTS.md"
    report.main([str(path), "--out", str(out), "--plots", str(tmp_path / "plots")])
    text = out.read_text()
    (kd,) = table_rows(text, "kd")
    assert kd["vs eager"] == "5.00x" and kd["vs compiled"] == "2.00x"
    assert kd["kdops / floor"] == "2.00"
    assert kd["memory kdops / eager"] == "0.12"
    assert kd["kdops ms (IQR)"] == "2.000 (0.100)"
    assert "Test CPU, 2 logical CPUs" in text and "`pytest benchmarks`" in text


def test_variants_missing_providers_and_plots(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run_json()))
    plots = tmp_path / "plots"
    text = report.render([json.loads(path.read_text())], str(plots), "plots")
    small, large = table_rows(text, "ot")
    # two kdops variants, each compared with every baseline; no compiled column when nobody ran it
    assert small["vs eager kdops"] == "4.00x" and small["vs pot kdops"] == "6.00x"
    assert small["vs eager kdops-online"] == "2.67x" and small["vs pot kdops-online"] == "4.00x"
    assert not any("compiled" in k for k in small)
    assert small["kdops / floor"] == "4.00"  # the faster kdops variant over the floor
    # the larger size has no eager, no online and no floor run: dashes, not errors
    assert large["eager ms (IQR)"] == "-" and large["vs eager kdops"] == "-" and large["kdops / floor"] == "-"
    assert large["vs pot kdops"] == "5.00x"
    pngs = sorted(p.name for p in plots.iterdir())
    assert pngs == ["kd.png", "ot.png"] and all((plots / p).stat().st_size > 5000 for p in pngs)
    assert re.search(r"!\[ot\]\(plots/ot\.png\)", text)
