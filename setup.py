"""Build of kdops: one extension, kdops._C, with CPU kernels and (when a toolkit is found) CUDA kernels.

Configuration comes from the environment and is printed before the build:
  KDOPS_FORCE_CUDA=1     compile CUDA kernels (fails if no toolkit or torch is CPU-only)
  KDOPS_FORCE_CPU=1      compile CPU kernels only
  CUDA_HOME              toolkit root (found from nvcc on PATH when unset, wrapper scripts included)
  TORCH_CUDA_ARCH_LIST   default "8.0;9.0"
  MAX_JOBS               parallel compile jobs (default: number of CPUs)
  DEBUG=1                -O0 -g
  KDOPS_BUILD_DIR        build directory (default build/cuda or build/cpu, so the two never share objects)
The CUDA/CPU choice never depends on a GPU being present.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

TORCH_MISSING = """
kdops: PyTorch is not importable, and kdops compiles against it.
Install torch first, then build kdops without build isolation (so the build sees that torch):

    pip install torch==2.14.1            # CUDA build (or a CPU-only build of torch)
    pip install --no-build-isolation .
"""


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def read_version():
    with open(os.path.join(ROOT, "kdops", "version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def has_cudart(root):
    return any(glob.glob(os.path.join(root, sub, "libcudart.so*")) for sub in ("lib64", "lib", "targets/x86_64-linux/lib"))


def is_toolkit(root):
    return os.path.isfile(os.path.join(root, "bin", "nvcc")) and has_cudart(root)


def find_cuda_home():
    """Returns (root, how it was found) or (None, what was tried)."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append((os.environ[var], "$" + var))
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append((os.path.dirname(os.path.dirname(real)), "nvcc on PATH (%s)" % nvcc))
        try:
            with open(real, "rb") as f:
                head = f.read(8192)
        except OSError:
            head = b""
        if head.startswith(b"#!"):  # a wrapper script: the toolkit is wherever the real nvcc it runs lives
            for path in re.findall(rb"(/[^\s\"'$;]+)/bin/nvcc\b", head):
                candidates.append((path.decode(), "the nvcc that the wrapper %s runs" % nvcc))
    candidates.append(("/usr/local/cuda", "default location"))
    candidates += [(p, "default location") for p in sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    tried = []
    for root, how in candidates:
        if is_toolkit(root):
            return root, how
        tried.append("%s (%s)" % (root, how))
    return None, "; ".join(tried) or "nothing: no CUDA_HOME and no nvcc on PATH"


def nvcc_version(root):
    try:
        out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def configure():
    try:
        import torch
    except ImportError:
        sys.exit(TORCH_MISSING)

    force_cpu, force_cuda = env_flag("KDOPS_FORCE_CPU"), env_flag("KDOPS_FORCE_CUDA")
    if force_cpu and force_cuda:
        sys.exit("kdops: KDOPS_FORCE_CPU and KDOPS_FORCE_CUDA are both set; set one of them.")
    torch_cuda = torch.version.cuda
    cuda_home, how = (None, "not searched") if force_cpu else find_cuda_home()

    if force_cpu:
        use_cuda, why = False, "KDOPS_FORCE_CPU=1"
    elif torch_cuda is None:
        if force_cuda:
            sys.exit("kdops: KDOPS_FORCE_CUDA=1 but torch %s is a CPU-only build; install a CUDA build of torch." % torch.__version__)
        use_cuda, why = False, "torch %s is a CPU-only build" % torch.__version__
    elif cuda_home is None:
        if force_cuda:
            sys.exit("kdops: KDOPS_FORCE_CUDA=1 but no CUDA toolkit with lib64/libcudart* was found. Tried: %s. "
                     "Set CUDA_HOME to the toolkit root." % how)
        use_cuda, why = False, "no CUDA toolkit found (tried: %s)" % how
    else:
        use_cuda = True
        why = "KDOPS_FORCE_CUDA=1" if force_cuda else "CUDA toolkit and a CUDA build of torch found"

    cfg = {"torch": torch.__version__, "torch_cuda": torch_cuda, "use_cuda": use_cuda, "why": why,
           "cuda_home": cuda_home, "cuda_how": how, "nvcc": None}
    if use_cuda:
        # cpp_extension reads CUDA_HOME when imported, so it has to be settled before that import.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        cfg["nvcc"] = nvcc_version(cuda_home)
        if cfg["nvcc"] and cfg["nvcc"].split(".")[0] != torch_cuda.split(".")[0]:
            print("kdops: warning: nvcc %s and torch's CUDA %s differ in major version; the build will fail. "
                  "Install a toolkit matching torch, or a torch matching the toolkit." % (cfg["nvcc"], torch_cuda))
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    cfg["debug"] = env_flag("DEBUG")
    cfg["build_dir"] = os.environ.get("KDOPS_BUILD_DIR") or os.path.join("build", "cuda" if use_cuda else "cpu")
    cfg["ccache"] = None if env_flag("KDOPS_NO_CCACHE") else shutil.which("ccache")
    if cfg["ccache"]:
        use_ccache(cfg, cuda_home if use_cuda else None)
    return cfg


def use_ccache(cfg, cuda_home):
    """Compiles through ccache in its masquerade form: a directory of links named after the compilers, first on
    PATH. CXX itself is left alone, because cpp_extension checks the compiler's name and version from CXX
    ("ccache c++" fails that check, which stops CUDA builds against binary torch wheels)."""
    links = os.path.join(ROOT, cfg["build_dir"], "ccache-bin")
    os.makedirs(links, exist_ok=True)
    for name in ("c++", "cc", "g++", "gcc"):
        link = os.path.join(links, name)
        if os.path.realpath(link) != os.path.realpath(cfg["ccache"]):
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(cfg["ccache"], link)
    os.environ["PATH"] = links + os.pathsep + os.environ.get("PATH", "")
    if cuda_home and "PYTORCH_NVCC" not in os.environ:
        os.environ["PYTORCH_NVCC"] = "ccache " + os.path.join(cuda_home, "bin", "nvcc")


def print_config(cfg):
    lines = [
        "kdops %s build configuration" % read_version(),
        "  torch           %s (CUDA %s)" % (cfg["torch"], cfg["torch_cuda"] or "none: CPU-only build"),
        "  CUDA kernels    %s: %s" % ("ON" if cfg["use_cuda"] else "OFF", cfg["why"]),
    ]
    if cfg["use_cuda"]:
        lines += [
            "  CUDA_HOME       %s (from %s), nvcc %s" % (cfg["cuda_home"], cfg["cuda_how"], cfg["nvcc"] or "?"),
            "  arch list       %s" % os.environ["TORCH_CUDA_ARCH_LIST"],
        ]
    lines += [
        "  MAX_JOBS        %s" % os.environ["MAX_JOBS"],
        "  DEBUG           %s" % ("on (-O0 -g)" if cfg["debug"] else "off"),
        "  build dir       %s" % cfg["build_dir"],
        "  ccache          %s" % (cfg["ccache"] or "not found"),
    ]
    print("\n".join(lines), flush=True)


def extensions(cfg):
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # csrc/ops*.cpp: the schemas, one TORCH_LIBRARY plus a TORCH_LIBRARY_FRAGMENT per op family
    sources = ["csrc/module.cpp"] + sorted(glob.glob("csrc/ops*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    opt = ["-O0", "-g"] if cfg["debug"] else ["-O3"]
    # -fopenmp: at::parallel_for is an inline OpenMP loop, serial unless the extension itself is built with it
    # (libgomp then resolves to the one torch already loaded). -fno-trapping-math lets GCC if-convert the
    # guarded terms (p > 0 ? p * x : 0) and vectorise those loops. -fno-math-errno: sqrt becomes the bare
    # instruction instead of a branch to libm for negative inputs (nothing here reads errno), without which
    # the loops that call it (MMD's distance sums among them) stay scalar.
    cxx = opt + ["-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    macros = [("KDOPS_WITH_CUDA", "1" if cfg["use_cuda"] else "0")]
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], define_macros=macros, extra_link_args=["-fopenmp"])
    if cfg["use_cuda"]:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"] + (["-G"] if cfg["debug"] else [])
        ext = CUDAExtension("kdops._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    else:
        ext = CppExtension("kdops._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)

    class Build(BuildExtension):
        """Writes the build facts into a header of the build dir before compiling."""

        def build_extensions(self):
            gen = os.path.join(os.path.abspath(self.build_temp), "kdops_generated")
            os.makedirs(gen, exist_ok=True)
            text = ('#pragma once\n#define KDOPS_TORCH_VERSION "%s"\n#define KDOPS_CUDA_VERSION "%s"\n'
                    % (cfg["torch"], cfg["torch_cuda"] or "" if cfg["use_cuda"] else ""))
            path = os.path.join(gen, "kdops_build_info.h")
            if not os.path.exists(path) or open(path).read() != text:
                with open(path, "w") as f:
                    f.write(text)
            for e in self.extensions:
                e.include_dirs.append(gen)
            super().build_extensions()

    return [ext], {"build_ext": Build}


cfg = configure()
print_config(cfg)
ext_modules, cmdclass = extensions(cfg)

setup(
    name="kdops",
    version=read_version(),
    description="Knowledge-distillation losses as fused C++/CUDA PyTorch ops",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["kdops", "kdops.*"]),
    python_requires=">=3.9",
    install_requires=["numpy"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"build": {"build_base": cfg["build_dir"]}},
    zip_safe=False,
)
