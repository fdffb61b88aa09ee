"""Markdown tables of a pytest-benchmark JSON run of the kdops benchmarks:

    pytest benchmarks --benchmark-only --benchmark-json=run.json
    python -m benchmarks.report run.json

Per op family and shape / dtype / mode: the median time of each provider, kdops' speed-up over
torch.compile(reference) and over the eager reference, kdops' time as a multiple of the family's floor
(measured in the same run: bench_kd.py one torch.exp over both inputs, bench_partial_l2.py one clone()),
and the peak memory of one call (see benchmarks/common.py).
"""

import json
import platform
import sys
from collections import defaultdict


def tables(run):
    results, floors = defaultdict(dict), {}
    for b in run["benchmarks"]:
        p, median = dict(b["params"]), b["stats"]["median"] * 1e3
        p["shape"] = p["shape"] if isinstance(p["shape"], str) else "x".join(map(str, p["shape"]))
        family, peak = b["extra_info"].get("family", "?"), b["extra_info"].get("peak_mib", float("nan"))
        if "provider" not in p:
            floors[(family, p["shape"], p["dtype"], p["device"])] = median
            continue
        results[(family, p["shape"], p["dtype"], p["mode"], p["device"])][p["provider"]] = (median, peak)
    out = []
    for family in sorted({k[0] for k in results}):
        lines = [
            "**%s**\n" % family,
            "| shape | dtype | mode | device | kdops ms | compiled ms | eager ms | vs compiled | vs eager "
            "| kdops / floor | peak MiB kdops / compiled / eager |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        keys = [k for k in results if k[0] == family]
        keys.sort(key=lambda k: (k[4], k[2] != "fp32", _numel(k[1]), k[3]))
        for key in keys:
            r = results[key]
            if not {"kdops", "compiled", "eager"} <= set(r):
                continue
            (k, kp), (c, cp), (e, ep) = r["kdops"], r["compiled"], r["eager"]
            floor = floors.get((family, key[1], key[2], key[4]))
            lines.append("| %s | %s | %s | %s | %.3f | %.3f | %.3f | %.2fx | %.2fx | %s | %.1f / %.1f / %.1f |" % (
                *key[1:], k, c, e, c / k, e / k, "%.2f" % (k / floor) if floor else "-", kp, cp, ep))
        out.append("\n".join(lines))
    return "\n\n".join(out)


def _numel(shape):
    n = 1
    for d in shape.split("x"):
        n *= int(d)
    return n


def machine(run):
    m = run.get("machine_info", {})
    cpu = m.get("cpu", {})
    return "%s, %s logical CPUs, Python %s, %s" % (cpu.get("brand_raw", platform.processor()), cpu.get("count", "?"),
                                                   m.get("python_version", "?"), m.get("system", "?"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m benchmarks.report RUN.json")
    with open(argv[0]) as f:
        run = json.load(f)
    print("Machine: " + machine(run) + "\n")
    print(tables(run))


if __name__ == "__main__":
    main()
