"""The kdops performance report, from one or more pytest-benchmark JSON runs of `benchmarks/`:

    pytest benchmarks --benchmark-only --benchmark-json=build/bench.json        # or: make bench
    python -m benchmarks.report build/bench.json [more.json ...] [--out benchmarks/RESULTS.md]
                                [--plots benchmarks/plots]                        # or: make report

Writes a markdown file (stdout without --out) with the machine that ran the benchmarks and, per op family,
one row per configuration (shape / dtype / mode / device ...): the median and IQR of every provider
(kdops and its variants, the eager reference, torch.compile(reference), POT, GeomLoss, ...), kdops' speed-up
over the eager reference and over the compiled one, kdops' time as a multiple of the family's floor (measured
in the same run: a clone() of the inputs for the memory-bound ops, one torch.exp over both inputs for KD, the
GEMM alone for the GEMM-bound ones), and peak memory with kdops' ratio to eager's. With --plots, one PNG per
family: time and peak memory against problem size, log-log. Providers are read generically: ``kdops*`` are
kdops variants, ``floor`` (or ``mode=floor``) the floor, anything else a baseline. A floor whose configuration
leaves out a parameter of the rows (e.g. lm's floor has no divergence) is every such row's floor; a floor
benchmark that names itself (extra_info["provider"], e.g. ``gemm_floor``) gets its own time column and names the
floor ratio's column. Families in SCALING get a second table: peak memory against one dimension of the shape.
"""

import argparse
import json
import math
import os
import sys
from collections import OrderedDict, defaultdict

HIDDEN = ("provider", "device")
# family -> (the shape's axis, its name): a "peak memory against <name>" table, e.g. lm's peak flat in the tokens
SCALING = {"lm": (0, "tokens")}


def _provider(b):
    params = b.get("params") or {}
    extra = b.get("extra_info", {})
    cfg = dict(extra.get("params") or {k: v for k, v in params.items() if k not in HIDDEN})
    provider = params.get("provider") or extra.get("provider")
    if provider == "floor" or cfg.get("mode") == "floor" or (provider is None and "floor" in b.get("name", "")):
        return "floor", cfg
    return provider or "?", cfg


def _shape_str(v):
    return v if isinstance(v, str) else "x".join(map(str, v))


def _floor_name(b):
    """The name a floor benchmark gives itself (a ``provider`` other than ``floor``), or None."""
    name = (b.get("params") or {}).get("provider") or b.get("extra_info", {}).get("provider")
    return name if name and name != "floor" else None


def collect(runs):
    """{family: {(config items, device): {provider: stats}}} and the floors
    {(family, config-sans-mode, device): stats} (stats["name"]: the floor's own name, or None)."""
    rows = defaultdict(lambda: defaultdict(dict))
    floors = {}
    latest = {}  # a test run again in a later JSON replaces its earlier result
    for run in runs:
        for b in run["benchmarks"]:
            latest[b.get("fullname") or id(b)] = b
    for run in runs:
        for b in run["benchmarks"]:
            if latest.get(b.get("fullname") or id(b)) is not b:
                continue
            extra = b.get("extra_info", {})
            family = extra.get("family", b.get("group") or "?")
            provider, cfg = _provider(b)
            device = extra.get("device") or (b.get("params") or {}).get("device", "cpu")
            if "shape" in cfg:
                cfg["shape"] = _shape_str(cfg["shape"])
            st = b["stats"]
            ms = extra.get("cuda_event_ms") or st["median"] * 1e3
            stats = {"median": ms, "iqr": st.get("iqr", 0.0) * 1e3, "rounds": st.get("rounds", 0),
                     "peak": extra.get("peak_mib", float("nan")), "value_diff": extra.get("value_diff")}
            sans_mode = tuple((k, v) for k, v in cfg.items() if k != "mode")
            if provider == "floor":
                floors[(family, sans_mode, device)] = dict(stats, name=_floor_name(b))
                if cfg.get("mode") in (None, "floor"):
                    continue
            rows[family][(tuple(cfg.items()), device)][provider] = stats
    return rows, floors


def _order(providers):
    kd = sorted(p for p in providers if p.startswith("kdops"))
    base = [p for p in ("eager", "compiled") if p in providers]
    other = sorted(p for p in providers if p not in kd and p not in base and p != "floor")
    return kd, base, other


def _numel(cfg):
    shape = dict(cfg).get("shape")
    if shape is None:
        return None
    try:
        return math.prod(int(x) for x in str(shape).split("x"))
    except ValueError:
        return None


def _fmt(ms):
    return "%.3f" % ms if ms < 100 else "%.1f" % ms


def _floor_for(floors, family, cfg, device):
    """The floor of a row: the one measured on its configuration (mode aside), else the most specific floor whose
    configuration is a subset of the row's (a floor that does not depend on a row parameter), else None."""
    sans_mode = tuple((k, v) for k, v in cfg if k != "mode")
    if (family, sans_mode, device) in floors:
        return floors[(family, sans_mode, device)]
    items, best = set(sans_mode), None
    for (fam, fcfg, dev), st in floors.items():
        if fam == family and dev == device and set(fcfg) <= items and (best is None or len(fcfg) > best[0]):
            best = (len(fcfg), st)
    return best[1] if best else None


def _floor_label(family, floors):
    """The floor's name for the headers: its own name when the family's floors agree on one, else "floor"."""
    names = {st.get("name") for (fam, _c, _d), st in floors.items() if fam == family}
    return names.pop() if len(names) == 1 and None not in names else "floor"


def family_table(family, entries, floors):
    providers = set()
    for r in entries.values():
        providers |= set(r)
    kd, base, other = _order(providers)
    cfg_keys = list(OrderedDict.fromkeys(k for (cfg, _), _r in entries.items() for k, _v in cfg))
    label = _floor_label(family, floors)
    named_floor = label != "floor"
    head = cfg_keys + ["device"] + ["%s ms (IQR)" % p for p in kd + base + other]
    if named_floor:
        head.append("%s ms (IQR)" % label)
    for p in kd:
        tag = "" if len(kd) == 1 else " " + p
        head += ["vs eager%s" % tag if "eager" in base else None, "vs compiled%s" % tag if "compiled" in base else None]
        for o in other:
            head.append("vs %s%s" % (o, tag))
    head = [h for h in head if h]
    head += ["kdops / %s" % label, "peak MiB " + " / ".join(kd + base + other), "memory kdops / eager"]
    diffs = [p for p in base + other if any(r.get(p, {}).get("value_diff") for r in entries.values())]
    head += ["|value diff| %s" % p for p in diffs]
    lines = ["### %s" % family, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def sort_key(item):
        (cfg, device), _ = item
        d = dict(cfg)
        return (device, str(d.get("dtype", "")) != "fp32", _numel(cfg) or 0, [str(v) for _k, v in cfg])

    for (cfg, device), r in sorted(entries.items(), key=sort_key):
        d = dict(cfg)
        cells = [str(d.get(k, "")) for k in cfg_keys] + [device]
        for p in kd + base + other:
            cells.append("%s (%s)" % (_fmt(r[p]["median"]), _fmt(r[p]["iqr"])) if p in r else "-")
        floor_st = _floor_for(floors, family, cfg, device)
        if named_floor:
            cells.append("%s (%s)" % (_fmt(floor_st["median"]), _fmt(floor_st["iqr"])) if floor_st else "-")
        for p in kd:
            for b in base + other:
                cells.append("%.2fx" % (r[b]["median"] / r[p]["median"]) if p in r and b in r else "-")
        floor = floor_st["median"] if floor_st else None
        best = min((r[p]["median"] for p in kd if p in r), default=None)
        cells.append("%.2f" % (best / floor) if floor and best else "-")
        cells.append(" / ".join("%.1f" % r[p]["peak"] if p in r else "-" for p in kd + base + other))
        k0 = next((p for p in kd if p in r), None)
        ratio = "-"
        if k0 and "eager" in r and r["eager"]["peak"] > 0:
            ratio = "%.2f" % (r[k0]["peak"] / r["eager"]["peak"])
        cells.append(ratio)
        for p in diffs:
            v = r.get(p, {}).get("value_diff")
            cells.append("%.1e" % v if v is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling_table(family, entries, axis, name):
    """Peak memory of one call against the shape's `axis` (called `name`): one row per configuration that ran at
    two or more sizes along it (all else equal), per provider the peaks from the smallest size to the largest and
    their growth (largest / smallest). None when no configuration ran at two sizes."""
    groups = defaultdict(dict)
    for (cfg, device), r in entries.items():
        dims = str(dict(cfg).get("shape", "")).split("x")
        try:
            size = int(dims[axis])
        except (IndexError, ValueError):
            continue
        rest = "x".join(dims[:axis] + ["*"] + dims[axis + 1:])
        groups[(tuple((k, rest if k == "shape" else v) for k, v in cfg), device)][size] = r
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return None
    providers = set()
    for by_size in groups.values():
        for r in by_size.values():
            providers |= set(r)
    kd, base, other = _order(providers)
    cfg_keys = list(OrderedDict.fromkeys(k for (cfg, _), _r in groups.items() for k, _v in cfg))
    head = cfg_keys + ["device", name] + ["peak MiB %s" % p for p in kd + base + other]
    lines = ["#### %s: peak memory against %s" % (family, name), "",
             "Peak MiB of one call at each value of %s (the shape's *), smallest first, and its growth (largest / "
             "smallest)." % name, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def sort_key(item):
        (cfg, device), _ = item
        return (device, str(dict(cfg).get("dtype", "")) != "fp32", [str(v) for _k, v in cfg])

    for (cfg, device), by_size in sorted(groups.items(), key=sort_key):
        d = dict(cfg)
        sizes = sorted(by_size)
        cells = [str(d.get(k, "")) for k in cfg_keys] + [device, " / ".join(map(str, sizes))]
        for p in kd + base + other:
            peaks = [by_size[n].get(p, {}).get("peak") for n in sizes]
            if all(v is None or v != v for v in peaks):
                cells.append("-")
                continue
            text = " / ".join("%.1f" % v if v is not None and v == v else "-" for v in peaks)
            lo, hi = peaks[0], peaks[-1]
            if lo is not None and hi is not None and lo > 0 and hi == hi:
                text += " (%.2fx)" % (hi / lo)
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_text(runs):
    out = []
    for run in runs:
        m = run.get("machine_info", {})
        k = m.get("kdops", {})
        cpu = k.get("cpu_model") or m.get("cpu", {}).get("brand_raw", "?")
        gpu = k.get("gpu") or "none"
        build = k.get("build", {})
        line = ("- %s: %s, %s logical CPUs (torch threads %s), %s; torch %s (CUDA %s), GPU: %s; kdops %s, CUDA "
                "kernels %s; Python %s" % (k.get("date", run.get("datetime", "?")), cpu, k.get("logical_cpus", "?"),
                                           k.get("torch_threads", "?"), m.get("system", "?"), k.get("torch", "?"),
                                           k.get("torch_cuda") or "off", gpu, build.get("version", "?"),
                                           "built" if build.get("cuda_built") else "not built",
                                           m.get("python_version", "?")))
        if k.get("command"):
            line += "; `%s`" % k["command"]
        out.append(line)
    return "\n".join(sorted(set(out)))


def plot(family, entries, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)
    for (cfg, device), r in entries.items():
        n = _numel(cfg)
        if n is None:
            continue
        d = dict(cfg)
        label_cfg = " ".join(str(v) for k, v in cfg if k not in ("shape",)) + " " + device
        for p, st in r.items():
            series[(p, label_cfg.strip())].append((n, st["median"], st["peak"]))
    if not series:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (p, lab), pts in sorted(series.items()):
        pts.sort()
        xs = [x for x, _, _ in pts]
        style = "-" if p.startswith("kdops") else "--"
        ax_t.plot(xs, [t for _, t, _ in pts], style, marker="o", label="%s %s" % (p, lab))
        mem = [(x, m) for x, _, m in pts if m == m and m > 0]
        if mem:
            ax_m.plot([x for x, _ in mem], [m for _, m in mem], style, marker="o", label="%s %s" % (p, lab))
    for ax, what in ((ax_t, "median time (ms)"), (ax_m, "peak memory of one call (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("elements in one input (shape product)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=6, ncol=2)
    fig.suptitle("kdops benchmark: %s" % family)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def render(runs, plots_dir=None, plots_rel=None):
    rows, floors = collect(runs)
    parts = ["# kdops benchmark results", "",
             "Generated by `python -m benchmarks.report` from pytest-benchmark JSON. Times are medians in ms "
             "(IQR in brackets); speed-ups are provider time / kdops time from the same run; the floor is the "
             "family's floor op measured in the same run (clone of the inputs for memory-bound ops, one torch.exp "
             "over both inputs for KD, the GEMM alone for GEMM-bound ops, the four chunked GEMMs for lm). Peak "
             "memory is what one call adds: on CPU the process' peak resident set (VmHWM) minus the resident set "
             "before the call, after malloc_trim; on CUDA torch.cuda.max_memory_allocated. On CUDA times are "
             "medians between CUDA events.", "", "## Machine", "", machine_text(runs), ""]
    for family in sorted(rows):
        parts.append(family_table(family, rows[family], floors))
        parts.append("")
        if family in SCALING:
            table = scaling_table(family, rows[family], *SCALING[family])
            if table:
                parts.append(table)
                parts.append("")
        if plots_dir:
            os.makedirs(plots_dir, exist_ok=True)
            name = "%s.png" % family.replace("/", "_").replace(" ", "_")
            if plot(family, rows[family], os.path.join(plots_dir, name)):
                parts.append("![%s](%s)" % (family, os.path.join(plots_rel or plots_dir, name)))
                parts.append("")
    return "\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="pytest-benchmark JSON files")
    ap.add_argument("--out", help="write the markdown here (default: stdout)")
    ap.add_argument("--plots", help="write one PNG per family into this directory")
    args = ap.parse_args(argv)
    runs = []
    for path in args.runs:
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as e:
            sys.exit("benchmarks.report: cannot read %s: %s" % (path, e))
    rel = None
    if args.plots and args.out:
        rel = os.path.relpath(args.plots, os.path.dirname(os.path.abspath(args.out)))
    text = render(runs, args.plots, rel)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        print("wrote %s" % args.out)
    else:
        print(text)


if __name__ == "__main__":
    main()
