"""Check that the host emulations of the CUDA kernels' block algorithms can fail: for each mutation below (a
deliberate break of a block algorithm, in the per-thread or per-block code that the .cu files and their
emulations share, or in the emulated CUB reduction), build kdops CPU-only from a copy of the tree with the
mutation applied, run the emulation tests, and expect them to fail. Prints one line per mutation and exits 1
if any mutation survives (its tests still pass).

    python tools/emulation_mutations.py [--only NAME ...] [--keep]

Slow (one CPU-only build per mutation; ccache makes the unchanged files free): about 1-2 min per mutation on
a 2-core machine. Not part of CI; run it after changing an emulation or the code it shares with a kernel.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (file, original text, mutated text, the emulation test file that must fail)
MUTATIONS = {
    "cub-order-drops-last-warp": (
        "csrc/cpu/block_emulate.h",
        "    total = w0 == 0 ? v[0] : op(total, v[w0]);",
        "    total = w0 == 0 ? v[0] : (w0 + kWarp < v.size() ? op(total, v[w0]) : total);",
        "test_relational_emulate.py test_sinkhorn_emulate.py test_kd_emulate.py"),
    "gram-row-share-skips-first-column": (
        "csrc/kdops/gram_math.h",
        "  for (int64_t j = tid; j < n; j += threads) {\n    const int64_t e = r * n + j;",
        "  for (int64_t j = tid + (tid == 0 ? 1 : 0); j < n; j += threads) {\n    const int64_t e = r * n + j;",
        "test_relational_emulate.py"),
    "gram-diag-drops-column-sum": (
        "csrc/kdops/gram_math.h",
        "  dg[r * n + j] += diag_factor(kind, gjj) * (rho[r] + kappa);",
        "  dg[r * n + j] += diag_factor(kind, gjj) * (rho[r] + kappa * T(0));",
        "test_relational_emulate.py"),
    "fkd-diag-drops-norm-term": (
        "csrc/kdops/fkd_math.h",
        "  if (cosine) extra += norm_grad(rho[i], g[i * b + i]);",
        "  if (cosine) extra += T(0) * norm_grad(rho[i], g[i * b + i]);",
        "test_relational_emulate.py"),
    "pkt-second-pass-uses-student-sum": (
        "csrc/kdops/pkt_math.h",
        "    const T pt = affinity(t[j], cit, scale_at(gt, b, j, eps)) * irt;\n    if (Mode == 0) {",
        "    const T pt = affinity(t[j], cit, scale_at(gt, b, j, eps)) * irs;\n    if (Mode == 0) {",
        "test_relational_emulate.py"),
    "rkd-pair-outputs-unscaled": (
        "csrc/kdops/rkd_math.h",
        "    sums[2] *= ut[a * b + j];",
        "    sums[2] *= T(1);",
        "test_relational_emulate.py"),
    "sinkhorn-finish-drops-max": (
        "csrc/kdops/ot_math.h",
        "  return lse_needs_sum(mx) ? -eps * (mx + log_(sum)) : -eps * mx;",
        "  return lse_needs_sum(mx) ? -eps * log_(sum) : -eps * mx;",
        "test_sinkhorn_emulate.py"),
    "sinkhorn-thread-max-strides-twice": (  # caught where the skipped share held the row's only finite terms
        "csrc/kdops/ot_math.h",
        "  T mx = neg_inf<T>();\n  for (int64_t j = tid; j < k; j += threads) {",
        "  T mx = neg_inf<T>();\n  for (int64_t j = tid; j < k; j += 2 * threads) {",
        "test_sinkhorn_emulate.py"),
    "sinkhorn-thread-sum-strides-twice": (
        "csrc/kdops/ot_math.h",
        "  T sum = 0;\n  for (int64_t j = tid; j < k; j += threads) sum +=",
        "  T sum = 0;\n  for (int64_t j = tid; j < k; j += 2 * threads) sum +=",
        "test_sinkhorn_emulate.py"),
}


def run(cmd, cwd, env=None, log=None):
    with open(log, "w") if log else open(os.devnull, "w") as out:
        return subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="run these mutations only")
    ap.add_argument("--keep", action="store_true", help="keep the mutated trees and logs")
    args = ap.parse_args()
    python = os.path.join(ROOT, ".venv", "bin", "python")
    work = tempfile.mkdtemp(prefix="kdops-mutations-", dir=os.path.join(ROOT, "build"))
    survived = []
    for name, (path, old, new, tests) in MUTATIONS.items():
        if args.only and name not in args.only:
            continue
        tree = os.path.join(work, name)
        shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.so", "__pycache__"))
        target = os.path.join(tree, path)
        with open(target) as f:
            text = f.read()
        if text.count(old) != 1:
            print("%-36s  cannot apply: the original text is not in %s once" % (name, path))
            survived.append(name)
            continue
        with open(target, "w") as f:
            f.write(text.replace(old, new))
        env = dict(os.environ, KDOPS_FORCE_CPU="1", KDOPS_BUILD_DIR=os.path.join(tree, "build"))
        install = os.path.join(tree, "install")
        if run([python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--target", install, "."],
               tree, env, os.path.join(work, name + ".build.log")) != 0:
            print("%-36s  build failed (see %s)" % (name, os.path.join(work, name + ".build.log")))
            survived.append(name)
            continue
        test_files = [os.path.join(ROOT, "python_tests", t) for t in tests.split()]
        # as tools/compat.sh: the checkout's tests against the mutated install, never the checkout's own build
        env = dict(os.environ, PYTHONPATH=install, KDOPS_EXPECT_INSTALL=install)
        rc = run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "pythonpath="] + test_files,
                 install, env, os.path.join(work, name + ".tests.log"))
        with open(os.path.join(work, name + ".tests.log")) as f:
            log = f.read()
        # caught only by a failed comparison, not by an import or collection error
        caught = rc != 0 and ("AssertionError" in log or "Mismatched elements" in log)
        verdict = "caught (a comparison fails)" if caught else ("SURVIVED (tests pass)" if rc == 0 else
                                                              "tests did not run (see %s.tests.log)" % name)
        print("%-36s  %s" % (name, verdict), flush=True)
        if not caught:
            survived.append(name)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
