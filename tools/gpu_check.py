"""The GPU check: proves kdops' whole CUDA path on a machine with a CUDA GPU, in one command of at most 8 minutes.

    make gpu-check OUT=DIR [WHEELS=DIR]            # or: python tools/gpu_check.py DIR [--wheels DIR]
    make gpu-check-dry-run OUT=DIR                 # the same script on a machine without a GPU (CI runs it)

Steps, each under its share of the time budget (a step that does not fit is skipped, and the report says so):
 1. environment: Python, torch and its CUDA, the GPU and its compute capability, nvcc, compute-sanitizer;
 2. missing Python packages the tests or benchmarks use, installed from the wheel folder (--wheels) into
    DIR/site with pip --no-index (nothing is downloaded);
 3. the build: CUDA kernels for this GPU's architecture only, all cores (KDOPS_FORCE_CUDA=1);
 4. every CUDA test (`pytest -m cuda`: the device-parametrized tests' CUDA cases and the CUDA-only ones);
 5. compute-sanitizer memcheck, racecheck and synccheck over tools/gpu_sanitize_cases.py, a small call of every
    kdops kernel forward and backward (only kdops' kernels are checked);
 6. the CUDA benchmarks at the README's headline shapes (kdops vs eager vs torch.compile, and Liger-Kernel's
    KL divergence in bench_kd.py where its wheel is installed), timed with CUDA events, with peak memory;
 7. DIR/report.md (and DIR/summary.json) with what ran, what it measured, what was skipped and why.
Files written: report.md, summary.json, build.log, tests.log, sanitizer.log, bench.log, bench.json (seven
files in DIR itself, so that they fit what a short remote run can bring back).

--dry-run runs on a machine without a GPU: the build (in place, as `make build`), the CPU cases of the
CUDA-related tests (emulations of the kernels' block algorithms, build and layout checks), the sanitizer case
list on the CPU, the headline benchmark selection (collected, and run once on tiny sizes), and the report.
Exit status: 0 when every step that ran passed, 1 otherwise.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 8 * 60
# The steps' shares of the budget, in seconds, as caps; each also gets no more than what is left.
CAPS = {"build": 240, "tests": 150, "sanitizer": 75, "bench": 150}
OPTIONAL = {  # import name -> package (wheel) name: used by tests or benchmarks, not by `import kdops`
    "ot": "pot", "expecttest": "expecttest", "hypothesis": "hypothesis", "sklearn": "scikit-learn",
    "mnist1d": "mnist1d", "geomloss": "geomloss", "liger_kernel": "liger-kernel", "pytest_benchmark":
    "pytest-benchmark",
}
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")


class Check:
    def __init__(self, out, dry_run, budget_s):
        self.out, self.dry_run, self.budget = out, dry_run, budget_s
        self.start = time.monotonic()
        self.steps = []  # dicts: name, status (passed / failed / skipped), seconds, detail
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, self.env.get("PYTHONPATH")) if p)

    def left(self):
        return self.budget - (time.monotonic() - self.start)

    def record(self, name, status, seconds, detail):
        self.steps.append({"name": name, "status": status, "seconds": round(seconds, 1), "detail": detail})
        print("[gpu-check] %-10s %-7s %6.1f s  %s" % (name, status, seconds, detail.splitlines()[0] if detail else ""),
              flush=True)

    def run(self, name, cmd, log, cap, env=None, append=False):
        """Runs cmd with its output in log, within min(cap, time left). Returns (rc or None if not run, seconds)."""
        limit = min(cap, self.left() - 5)
        if limit < 10:
            return None, 0.0
        t0 = time.monotonic()
        with open(os.path.join(self.out, log), "a" if append else "w") as f:
            f.write("$ %s\n" % " ".join(cmd))
            f.flush()
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=limit).returncode
            except subprocess.TimeoutExpired:
                f.write("\n[gpu-check] stopped at its time limit of %.0f s\n" % limit)
                rc = "timeout"
        return rc, time.monotonic() - t0


def probe_environment(check):
    info = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "dry_run": check.dry_run}
    try:
        import torch
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            info.update(gpu=torch.cuda.get_device_name(0), capability="%d.%d" % (major, minor),
                        gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    except ImportError as e:
        info["torch"] = "not importable: %s" % e
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    if nvcc and os.path.exists(nvcc):
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release (\d+\.\d+)", out)
        info["nvcc"] = m.group(1) if m else out.strip()[-80:]
    info["compute_sanitizer"] = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",
                     os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "compute-sanitizer"))
         if os.path.exists(p)), None)
    if shutil.which("nvidia-smi"):
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
    check.info = info
    check.record("env", "passed", 0.0, json.dumps(info))
    return info


def install_wheels(check, wheels):
    import importlib.util
    missing = {mod: pkg for mod, pkg in OPTIONAL.items() if importlib.util.find_spec(mod) is None}
    check.info["missing_packages"] = sorted(missing.values())
    if not missing:
        check.record("wheels", "passed", 0.0, "nothing missing")
        return
    if not wheels:
        check.record("wheels", "skipped", 0.0, "missing %s and no --wheels folder: the tests and benchmarks that "
                     "need them skip or fail on import" % ", ".join(sorted(missing.values())))
        return
    site = os.path.join(check.out, "site")
    present = {pkg for pkg in missing.values()
               if any(f.lower().replace("_", "-").startswith(pkg + "-") for f in os.listdir(wheels))}
    if present:
        rc, secs = check.run("wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                        "--find-links", wheels, "--target", site] + sorted(present),
                             "build.log", 120)
        if rc == 0:
            check.env["PYTHONPATH"] = os.pathsep.join([site, check.env["PYTHONPATH"]])
            sys.path.insert(0, site)
        check.record("wheels", "passed" if rc == 0 else "failed", secs,
                     "installed %s; not in %s: %s" % (", ".join(sorted(present)), wheels,
                                                      ", ".join(sorted(set(missing.values()) - present)) or "none"))
    else:
        check.record("wheels", "skipped", 0.0, "none of %s in %s" % (", ".join(sorted(missing.values())), wheels))


def build(check):
    env = dict(check.env)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    if not check.dry_run:
        env["KDOPS_FORCE_CUDA"] = "1"
        env["TORCH_CUDA_ARCH_LIST"] = check.info.get("capability", "9.0")
    rc, secs = check.run("build", [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], "build.log",
                         CAPS["build"], env=env, append=True)
    if rc is None:
        check.record("build", "skipped", 0.0, "no time left")
        return False
    detail = "KDOPS_FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=%s, MAX_JOBS=%s" % (
        env.get("TORCH_CUDA_ARCH_LIST"), env["MAX_JOBS"]) if not check.dry_run else "in place, as make build"
    check.record("build", "passed" if rc == 0 else "failed", secs, detail + ("" if rc == 0 else " (rc %s)" % rc))
    if rc == 0:
        out = subprocess.run([sys.executable, "-c", "import kdops, json; print(json.dumps(kdops.build_info()))"],
                             cwd=ROOT, env=check.env, capture_output=True, text=True)
        check.info["build_info"] = out.stdout.strip() or out.stderr.strip()[-300:]
        if not check.dry_run and '"cuda_built": true' not in out.stdout:
            check.record("build", "failed", 0.0, "the build has no CUDA kernels: %s" % check.info["build_info"])
            return False
    return rc == 0


def pytest_counts(log_path):
    text = open(log_path).read() if os.path.exists(log_path) else ""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    counts = {}
    if lines:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", lines[-1]):
            counts[what] = int(n)
    return counts, text


def tests(check):
    if check.dry_run:
        files = sorted(f for f in os.listdir(os.path.join(ROOT, "python_tests")) if f.endswith("_emulate.py"))
        files = [os.path.join("python_tests", f) for f in files + ["test_build.py", "test_layout.py"]]
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not cuda", "-rs"] + files
        what = "CPU cases of %s" % ", ".join(os.path.basename(f) for f in files)
    else:
        cmd = [sys.executable, "-m", "pytest", "python_tests", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rs"]
        what = "every CUDA test (pytest -m cuda)"
    rc, secs = check.run("tests", cmd, "tests.log", CAPS["tests"])
    if rc is None:
        check.record("tests", "skipped", 0.0, "no time left")
        return
    counts, text = pytest_counts(os.path.join(check.out, "tests.log"))
    check.info["tests"] = counts
    failed = [ln[len("FAILED "):] for ln in text.splitlines() if ln.startswith("FAILED ")]
    check.info["tests_failed"] = failed
    check.record("tests", "passed" if rc == 0 else "failed", secs, "%s: %s%s" % (
        what, ", ".join("%d %s" % (v, k) for k, v in counts.items()) or "no summary", " (rc %s)" % rc if rc else ""))


def sanitizer(check):
    cases = [sys.executable, os.path.join("tools", "gpu_sanitize_cases.py")]
    if check.dry_run or not check.info.get("cuda_available"):
        rc, secs = check.run("sanitizer", cases + ["--device", "cpu"], "sanitizer.log", CAPS["sanitizer"])
        check.record("sanitizer", "passed" if rc == 0 else "failed", secs,
                     "no GPU: compute-sanitizer not run; its case list ran on the CPU (rc %s)" % rc)
        return
    tool_path = check.info.get("compute_sanitizer")
    if not tool_path:
        check.record("sanitizer", "skipped", 0.0, "compute-sanitizer not found")
        return
    results, total, ok = {}, 0.0, True
    for i, tool in enumerate(SANITIZER_TOOLS):
        cap = (CAPS["sanitizer"] - total) / (len(SANITIZER_TOOLS) - i)
        cmd = [tool_path, "--tool", tool, "--kernel-name", "kns=kdops", "--error-exitcode", "9"] + cases
        rc, secs = check.run("sanitizer", cmd, "sanitizer.log", cap, append=i > 0)
        total += secs
        text = open(os.path.join(check.out, "sanitizer.log")).read()
        summaries = re.findall(r"ERROR SUMMARY: (\d+) error", text)
        results[tool] = {"rc": rc, "errors": int(summaries[-1]) if summaries else None}
        ok = ok and rc == 0
    check.info["sanitizer"] = results
    check.record("sanitizer", "passed" if ok else "failed", total, json.dumps(results))


def bench(check):
    files = sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.startswith("bench_") and f.endswith(".py"))
    env = dict(check.env, KDOPS_BENCH_HEADLINE="1")
    if check.dry_run:
        rc, secs = check.run("bench", [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
                                       "--collect-only", "-m", "cuda"], "bench.log", 30, env=env)
        collected = re.findall(r"(\d+)/\d+ tests collected", open(os.path.join(check.out, "bench.log")).read())
        env_quick = dict(check.env, KDOPS_BENCH_QUICK="1")
        rc2, secs2 = check.run("bench", [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
                                         "--benchmark-disable", "-k", "kdops"], "bench.log", CAPS["bench"],
                               env=env_quick, append=True)
        check.record("bench", "passed" if rc == 0 and rc2 == 0 else "failed", secs + secs2,
                     "no GPU: the headline CUDA selection collects %s benchmarks; the kdops providers ran once on "
                     "tiny CPU sizes" % (collected[-1] if collected else "?"))
        return
    json_parts, total, done, statuses = [], 0.0, [], []
    for i, f in enumerate(files):
        cap = (CAPS["bench"] - total) / (len(files) - i)
        part = os.path.join(check.out, "bench-%s.json" % f[:-3])
        cmd = [sys.executable, "-m", "pytest", os.path.join("benchmarks", f), "-q", "-p", "no:cacheprovider", "-m",
               "cuda", "--benchmark-only", "--benchmark-max-time=0.1", "--benchmark-min-rounds=5",
               "--benchmark-json=%s" % part]
        rc, secs = check.run("bench", cmd, "bench.log", cap, env=env, append=i > 0)
        total += secs
        if rc is None:
            statuses.append("%s: no time left" % f)
            continue
        statuses.append("%s: %s" % (f, "ok" if rc == 0 else "rc %s" % rc))
        if os.path.exists(part):
            json_parts.append(part)
            done.append(f)
    merged = {"machine_info": None, "benchmarks": []}
    for part in json_parts:
        with open(part) as fh:
            data = json.load(fh)
        merged["machine_info"] = merged["machine_info"] or data.get("machine_info")
        merged["commit_info"] = data.get("commit_info")
        merged["benchmarks"] += data.get("benchmarks", [])
        os.remove(part)
    with open(os.path.join(check.out, "bench.json"), "w") as fh:
        json.dump(merged, fh)
    check.info["bench_files"] = statuses
    check.record("bench", "passed" if len(done) == len(files) else "failed", total, "; ".join(statuses))


def bench_tables(check):
    path = os.path.join(check.out, "bench.json")
    if check.dry_run or not os.path.exists(path):
        return ""
    tmp = os.path.join(check.out, ".bench-report.md")
    subprocess.run([sys.executable, "-m", "benchmarks.report", path, "--out", tmp], cwd=ROOT, env=check.env,
                   capture_output=True, text=True)
    text = open(tmp).read() if os.path.exists(tmp) else "(benchmarks.report gave no tables)"
    if os.path.exists(tmp):
        os.remove(tmp)
    return text


def write_report(check):
    failed = [s for s in check.steps if s["status"] == "failed"]
    skipped = [s for s in check.steps if s["status"] == "skipped"]
    lines = ["# kdops GPU check%s" % (" (dry run, no GPU)" if check.dry_run else ""), "",
             "Result: **%s** in %.0f s of a %.0f s budget." % ("FAILED" if failed else "passed",
                                                                time.monotonic() - check.start, check.budget), "",
             "## Environment", ""]
    lines += ["- %s: %s" % (k, v) for k, v in check.info.items() if k not in ("tests_failed", "bench_files")]
    lines += ["", "## Steps", "", "| step | status | seconds | detail |", "|---|---|---|---|"]
    lines += ["| %s | %s | %s | %s |" % (s["name"], s["status"], s["seconds"], s["detail"].replace("|", "/"))
              for s in check.steps]
    if check.info.get("tests_failed"):
        lines += ["", "## Failed tests", ""] + ["- %s" % t for t in check.info["tests_failed"]]
    lines += ["", "## Skipped and why", ""]
    lines += ["- %s: %s" % (s["name"], s["detail"]) for s in skipped] or ["- nothing"]
    if check.dry_run:
        lines += ["- CUDA kernels were not run (no GPU): the CUDA tests, compute-sanitizer and the CUDA benchmarks "
                  "need one."]
    tables = bench_tables(check)
    if tables:
        lines += ["", "## Benchmarks (headline shapes, CUDA events)", "", tables]
    with open(os.path.join(check.out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(check.out, "summary.json"), "w") as f:
        json.dump({"info": check.info, "steps": check.steps, "passed": not failed}, f, indent=1)
    return not failed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="directory for the logs, summary.json and report.md (created)")
    p.add_argument("--wheels", help="folder of wheels for packages the image lacks (installed with --no-index)")
    p.add_argument("--dry-run", action="store_true", help="no GPU: build, CPU subset, sanitizer case list, report")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="wall-time budget in seconds (default 480)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name in ("build.log", "tests.log", "sanitizer.log", "bench.log", "bench.json", "report.md", "summary.json"):
        if os.path.exists(os.path.join(args.out, name)):
            os.remove(os.path.join(args.out, name))  # this run's files only; the folder may hold other things
    check = Check(os.path.abspath(args.out), args.dry_run, args.budget)
    info = probe_environment(check)
    if not args.dry_run and not info.get("cuda_available"):
        check.record("env", "failed", 0.0, "no CUDA device visible to torch; use --dry-run on a machine without one")
        write_report(check)
        return 1
    install_wheels(check, args.wheels)
    if build(check):
        tests(check)
        sanitizer(check)
        bench(check)
    ok = write_report(check)
    print("[gpu-check] report: %s" % os.path.join(check.out, "report.md"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
