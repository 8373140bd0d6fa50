"""What the compiled extension amdim_kernels._C is built from, and how: one definition for
setup.py (a build at install) and extension_loader.py (a build on first use).

This module imports nothing of the package, so that setup.py can load it by its path before
the package is installed. Settings come from the environment, read when a build starts:
- AMDIM_KERNELS_SKIP_CUDA_BUILD=1: CPU kernels only;
- AMDIM_KERNELS_FORCE_CUDA=1: CUDA kernels even where no nvcc check passes (fails loudly);
- TORCH_CUDA_ARCH_LIST: the GPU architectures (default below);
- CUDA_HOME: the CUDA toolkit whose nvcc compiles the .cu files.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = ("nce_op.cpp", "nce_cpu.cpp", "nce_cpu_fused.cpp", "nce_cpu_epilogue.cpp")
CUDA_SOURCES = ("nce_cuda.cpp", "nce_cuda_fused.cpp", "nce_cuda_kernels.cu", "nce_cuda_mma.cu")
# cubins for A100 and H100/H200 and their families, and PTX that newer GPUs compile on load
DEFAULT_ARCHS = "8.0;9.0+PTX"
# -fno-trapping-math: no code here reads floating-point exception flags, and without it GCC
# keeps the branches of the CPU epilogue's selects (csrc/nce_cpu_epilogue.cpp) and does not
# vectorise its loops; NaN and infinity behave as before
CXX_FLAGS = ("-O3", "-fno-trapping-math")
NVCC_FLAGS = ("-O3", "-lineinfo")


def openmp_flags() -> list[str]:
    """-fopenmp where torch's CPU parallelism is OpenMP (its Linux builds): at::parallel_for is
    a header template whose `omp parallel` is compiled into the extension, and runs on one
    thread without the flag."""
    import torch

    return ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux") else []


def flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def cpp_extension():
    """torch.utils.cpp_extension, imported without the warning it logs on a machine without a
    CUDA runtime (its guess of CUDA_HOME, which nvcc_path reports in its own words)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as module
    finally:
        logger.setLevel(level)
    return module


def cuda_home() -> str | None:
    """CUDA_HOME, or torch's guess where it is unset."""
    return os.environ.get("CUDA_HOME") or cpp_extension().CUDA_HOME


def nvcc_path() -> str | None:
    """nvcc of the CUDA toolkit, or None."""
    home = cuda_home()
    return home and shutil.which(os.path.join(home, "bin", "nvcc"))


def cuda_choice(torch) -> tuple[bool, str]:
    """(build the CUDA kernels?, why) for the torch being built against."""
    if flag("AMDIM_KERNELS_SKIP_CUDA_BUILD"):
        return False, "AMDIM_KERNELS_SKIP_CUDA_BUILD=1"
    if flag("AMDIM_KERNELS_FORCE_CUDA"):
        return True, "AMDIM_KERNELS_FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    nvcc = nvcc_path()
    if not nvcc:
        return False, "no nvcc found (set CUDA_HOME to the CUDA toolkit)"
    if not os.path.exists(os.path.join(cuda_home(), "include", "cuda_runtime.h")):
        # e.g. torch's guess /usr/local from an nvcc wrapper in /usr/local/bin
        return False, f"no CUDA headers in {cuda_home()}/include (set CUDA_HOME to the CUDA toolkit)"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}) and {nvcc}"


def arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS


def gencode_flags(archs: str) -> list[str]:
    """nvcc's -gencode flags for an arch list such as "8.0;9.0+PTX"."""
    flags = []
    for arch in archs.replace(",", ";").replace(" ", ";").split(";"):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        num = arch.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def sources(with_cuda: bool) -> list[Path]:
    return [CSRC / name for name in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]


def include_dirs(with_cuda: bool) -> list[str]:
    """csrc/, and for CUDA the cuBLAS/cuSPARSE headers of torch's own nvidia wheels, which
    CUDAContext.h needs."""
    dirs = [str(CSRC)]
    if with_cuda:
        try:
            import nvidia

            for root in nvidia.__path__:
                for sub in ("cu13", "cu12"):
                    inc = os.path.join(root, sub, "include")
                    if os.path.isdir(inc):
                        dirs.append(inc)
        except ImportError:
            pass
    return dirs


def defines(with_cuda: bool) -> list[tuple[str, str | None]]:
    return [("AMDIM_WITH_CUDA", None)] if with_cuda else []


def sources_digest() -> str:
    """A hash of every source and header in csrc/: a build made from other sources is
    another build."""
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cpp", ".cu", ".h", ".cuh"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
