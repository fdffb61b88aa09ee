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


def lm_run_json():
    """lm: five providers at two token counts, two divergences, and a named floor without a divergence."""
    marks = []
    for tokens, scale in ((1024, 1.0), (4096, 4.0)):
        shape = "%dx256x512x32000" % tokens
        for div in ("jsd", "kl"):
            cfg = dict(shape=shape, dtype="fp32", divergence=div, mode="fwd+bwd")
            marks += [bench("lm", "kdops", 0.010 * scale, 130.0 + tokens / 1024, **cfg),
                      bench("lm", "eager", 0.050 * scale, 1000.0 * scale, **cfg),
                      bench("lm", "compiled", 0.030 * scale, 500.0 * scale, **cfg),
                      bench("lm", "liger", 0.020 * scale, 400.0, **cfg),
                      bench("lm", "liger_nocompile", 0.040 * scale, 800.0, **cfg)]
        floor = bench("lm", None, 0.005 * scale, 0.0, 0.0002, shape=shape, dtype="fp32", mode="floor")
        floor["extra_info"]["provider"] = "gemm_floor"
        marks.append(floor)
    return {"machine_info": run_json()["machine_info"], "benchmarks": marks}


def test_lm_liger_named_floor_and_memory_against_tokens():
    text = report.render([lm_run_json()])
    rows = table_rows(text, "lm")
    assert len(rows) == 4
    small = next(r for r in rows if r["shape"] == "1024x256x512x32000" and r["divergence"] == "jsd")
    assert small["vs liger"] == "2.00x" and small["vs liger_nocompile"] == "4.00x"
    assert small["vs eager"] == "5.00x" and small["vs compiled"] == "3.00x"
    # the floor has no divergence: it is the floor of both divergences' rows, under its own name
    assert small["gemm_floor ms (IQR)"] == "5.000 (0.200)"
    assert all(r["kdops / gemm_floor"] == "2.00" for r in rows) and not any(k == "kdops / floor" for k in small)
    peaks = small["peak MiB kdops / eager / compiled / liger / liger_nocompile"]
    assert peaks == "131.0 / 1000.0 / 500.0 / 400.0 / 800.0"
    section = text.split("#### lm: peak memory against tokens")[1].split("###")[0]
    lines = [l for l in section.splitlines() if l.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    scaling = [dict(zip(head, (c.strip() for c in l.strip("|").split("|")))) for l in lines[2:]]
    assert len(scaling) == 2
    jsd = next(r for r in scaling if r["divergence"] == "jsd")
    assert jsd["shape"] == "*x256x512x32000" and jsd["tokens"] == "1024 / 4096"
    assert jsd["peak MiB kdops"] == "131.0 / 134.0 (1.02x)" and jsd["peak MiB eager"] == "1000.0 / 4000.0 (4.00x)"
    # other families get no such table
    assert "peak memory against" not in report.render([run_json()])
