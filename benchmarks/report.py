"""Markdown table of a pytest-benchmark JSON run of bench_kd.py:

    pytest benchmarks/bench_kd.py --benchmark-only --benchmark-json=run.json
    python -m benchmarks.report run.json

Per shape / dtype / mode: the median time of each provider, kdops' speed-up over torch.compile(reference)
and over the eager reference, kdops' time as a multiple of the floor (one torch.exp pass over both inputs,
measured in the same run), and the peak memory of one call (see benchmarks/common.py).
"""

import json
import platform
import sys
from collections import defaultdict


def shape_id(shape):
    return shape if isinstance(shape, str) else "x".join(map(str, shape))


def table(run):
    results, floors = defaultdict(dict), {}
    for b in run["benchmarks"]:
        p, median = b["params"], b["stats"]["median"] * 1e3
        peak = b["extra_info"].get("peak_mib", float("nan"))
        if "provider" not in p:
            floors[(shape_id(p["shape"]), p["dtype"], p["device"])] = median
            continue
        results[(shape_id(p["shape"]), p["dtype"], p["mode"], p["device"])][p["provider"]] = (median, peak)
    lines = [
        "| shape | dtype | mode | device | kdops ms | compiled ms | eager ms | vs compiled | vs eager "
        "| kdops / floor | peak MiB kdops / compiled / eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(results, key=lambda k: (k[3], k[1] != "fp32", int(k[0].split("x")[0]) * int(k[0].split("x")[1]), k[2]))
    for key in order:
        r = results[key]
        if not {"kdops", "compiled", "eager"} <= set(r):
            continue
        (k, kp), (c, cp), (e, ep) = r["kdops"], r["compiled"], r["eager"]
        floor = floors.get((key[0], key[1], key[3]))
        lines.append("| %s | %s | %s | %s | %.3f | %.3f | %.3f | %.2fx | %.2fx | %s | %.1f / %.1f / %.1f |" % (
            *key, k, c, e, c / k, e / k, "%.2f" % (k / floor) if floor else "-", kp, cp, ep))
    return "\n".join(lines)


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
    print(table(run))


if __name__ == "__main__":
    main()
