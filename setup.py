"""Build fastres and its compiled kernels, fastres._C.

The C++ CPU kernels are always built. The CUDA kernels are built whenever a CUDA
compiler and a CUDA build of torch are present (no GPU is needed to compile them):
  FASTRES_SKIP_CUDA_BUILD=1   never build the CUDA kernels
  FASTRES_FORCE_CUDA=1        build them or fail loudly (instead of warning and skipping)
  TORCH_CUDA_ARCH_LIST        target architectures (default "8.0;9.0+PTX")
  MAX_JOBS                    parallel compile jobs (ninja)
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_cuda_home(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def _find_cuda_home():
    """Where the CUDA toolkit is, or None.

    torch.utils.cpp_extension guesses CUDA_HOME as the parent of the `nvcc` found on PATH;
    that is wrong when `nvcc` is a wrapper script (/usr/local/bin/nvcc -> CUDA_HOME=/usr/local).
    So check each candidate for a real toolkit layout, and ask nvcc itself where it lives.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            # nvcc's dry run prints the toolkit root it resolved: "#$ TOP=/usr/local/cuda-13.0/bin/.."
            out = subprocess.run([nvcc, "--dryrun", "-v", "--version"], capture_output=True, text=True,
                                 timeout=60)
            m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
            if m:
                candidates.append(os.path.realpath(m.group(1)))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _is_cuda_home(c):
            return os.path.realpath(c)
    return None


def _extensions():
    skip_cuda = _env_flag("FASTRES_SKIP_CUDA_BUILD")
    force_cuda = _env_flag("FASTRES_FORCE_CUDA")
    cuda_home = None if skip_cuda else _find_cuda_home()
    if cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("torch is not importable at build time: fastres._C is not built; "
                      "the torch reference backend is used at run time")
        return [], {}

    with_cuda = False
    if not skip_cuda:
        reasons = []
        if torch.version.cuda is None:
            reasons.append(f"torch {torch.__version__} is not a CUDA build")
        if cuda_home is None:
            reasons.append("no CUDA toolkit (nvcc and include/cuda_runtime.h) was found")
        with_cuda = not reasons
        if reasons:
            msg = "fastres: not building the CUDA kernels: " + "; ".join(reasons)
            if force_cuda:
                raise RuntimeError(msg + " (FASTRES_FORCE_CUDA=1)")
            warnings.warn(msg)
    elif force_cuda:
        raise RuntimeError("FASTRES_FORCE_CUDA=1 and FASTRES_SKIP_CUDA_BUILD=1 contradict each other")

    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-fopenmp"]  # torch.utils.cpp_extension adds the -std its headers need
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    define_macros = []
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")  # PTX: newer GPUs JIT it
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("FASTRES_WITH_CUDA", None))
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                      f"--threads={os.environ.get('NVCC_THREADS', '2')}"]
        ext = cpp_extension.CUDAExtension(
            "fastres._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "fastres._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    name="fastres",
    version="0.1.0",
    description="Fused Triton and CUDA/C++ kernels for the ResNet family in PyTorch",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(
        os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # Triton kernels live in the top-level kernels/ folder and install as fastres.kernels
    # (never as a top-level module named `kernels`).
    packages=["fastres", "fastres.ops", "fastres.nn", "fastres.models", "fastres.kernels", "fastres._convert"],
    package_dir={"fastres": "fastres", "fastres.kernels": "kernels"},
    install_requires=["torch>=2.11", "torchvision", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib", "tqdm", "numpy",
                 # the ecosystems fastres.convert and the exporters meet (their tests skip where these are missing)
                 "timm", "transformers", "onnx", "onnxscript", "onnxruntime"],
        "bench": ["matplotlib", "tqdm"],
        # benchmarks/throughput.py's CPU peers: onnxruntime (torch.onnx.export(dynamo=True) needs onnx and
        # onnxscript) and OpenVINO, and timm and transformers for their ecosystem providers; never needed by the
        # library or its tests
        "peers": ["onnx", "onnxscript", "onnxruntime", "openvino", "timm", "transformers"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
