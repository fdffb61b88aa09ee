#!/usr/bin/env bash
# Builds kdops CPU-only against the oldest supported torch (default torch 2.11.0 on Python 3.12, the stack of the
# GPU machines) in a venv of its own, and runs the parity subset there. `make compat` calls it; CI runs it.
#
# Cost on the 2-core development machine: one download of the torch wheel (531 MB for cp312), no CUDA libraries
# (torch's CUDA wheel only has to import: its nvidia-* libraries are taken from the main venv through a path
# entry, since both use CUDA 13), a few small cp312 wheels, and a CPU-only build of kdops.
#   COMPAT_TORCH   torch requirement (default torch==2.11.0)
#   COMPAT_PYTHON  interpreter (default: python3.12 on PATH, else pyenv's 3.12)
#   COMPAT_VENV    venv directory (default build/compat-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
torch_spec=${COMPAT_TORCH:-torch==2.11.0}
venv=${COMPAT_VENV:-build/compat-venv}
main_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

py=${COMPAT_PYTHON:-}
if [ -z "$py" ]; then
    for cand in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            py=$cand; break
        fi
    done
fi
if [ -z "$py" ]; then
    echo "compat: no Python 3.12 interpreter found; set COMPAT_PYTHON" >&2
    exit 1
fi
echo "compat: $("$py" --version) ($py), $torch_spec, venv $venv"

stamp="$venv/.kdops-compat-v2-$(echo "$torch_spec" | tr -c 'A-Za-z0-9.=' _)"
if [ ! -f "$stamp" ]; then
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel
    # torch without its nvidia-* requirements (3 GB): the main venv's CUDA 13 libraries serve its import.
    "$venv/bin/python" -m pip install -q --no-deps "$torch_spec"
    "$venv/bin/python" -m pip install -q --no-warn-conflicts filelock typing-extensions sympy networkx jinja2 fsspec \
        numpy scipy scikit-learn pot ninja pytest expecttest hypothesis
    shim="$venv/cuda-libs"
    mkdir -p "$shim"
    ln -sfn "$main_site/nvidia" "$shim/nvidia"
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$PWD/$shim" > "$site/kdops-compat-cuda-libs.pth"
    touch "$stamp"
fi
"$venv/bin/python" -c 'import torch, sys; print("compat: torch", torch.__version__, "python", sys.version.split()[0])'

build="build/compat-cpu"
rm -rf "$build/install"
KDOPS_FORCE_CPU=1 KDOPS_BUILD_DIR="$build" "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps \
    --target "$build/install" .
repo=$PWD
# The parity subset: the loss library's own tests (values and gradients against the references, opcheck,
# torch.compile, bad inputs) on the CPU; the trainer's tests need the trainer's dependencies and say nothing
# about the torch version.
COMPAT_TESTS=()
for t in build layout dtypes kd kd_emulate mutual_kd partial_l2 logsum feature_overhaul relational relational_emulate \
         distribution sinkhorn sinkhorn_emulate crd_nce fuzz_contrastive empty_inputs; do
    COMPAT_TESTS+=("$repo/python_tests/test_$t.py")
done
# Run from inside the install so that `import kdops` is the CPU-only build, never the checkout's in-place one.
cd "$build/install"
PYTHONPATH="$PWD" "$repo/$venv/bin/python" - <<'PY'
import os, kdops, torch
assert not kdops.cuda_built(), "KDOPS_FORCE_CPU=1 build has CUDA kernels"
assert kdops.__file__.startswith(os.getcwd()), kdops.__file__
print("compat: CPU-only build OK:", kdops.build_info())
PY
# -o pythonpath=: the repo's pytest config would put the checkout (and its own build) first on sys.path.
KDOPS_EXPECT_INSTALL="$PWD" PYTHONPATH="$PWD" "$repo/$venv/bin/python" -m pytest -q -p no:cacheprovider \
    -o pythonpath= -k "not cuda" "${COMPAT_TESTS[@]}"
