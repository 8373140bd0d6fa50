"""Build script of amdim-kernels.

`pip install . --no-build-isolation` installs the Python package (reference and Triton
backends) and compiles the extension amdim_kernels._C from csrc/:
- with CPU and CUDA kernels when torch is a CUDA build and nvcc is found (CUDA_HOME);
- with CPU kernels only otherwise, or with AMDIM_KERNELS_SKIP_CUDA_BUILD=1.
AMDIM_KERNELS_FORCE_CUDA=1 builds the CUDA kernels even where no GPU or nvcc check passes
(and fails loudly if it cannot). AMDIM_KERNELS_SKIP_BUILD=1 installs without the extension.
Where torch cannot be imported at build time the package installs without the extension.
Arch list: TORCH_CUDA_ARCH_LIST, default "8.0;9.0+PTX" (cubins for A100 and H100/H200
and their families, and PTX that newer GPUs compile when first loaded). Parallel jobs: MAX_JOBS.
"""
import os
import shutil

from setuptools import find_packages, setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _say(msg: str) -> None:
    print(f"amdim-kernels: {msg}", flush=True)


def _extension():
    """(ext_modules, cmdclass) for the compiled extension, or ([], {}) without it."""
    if _flag("AMDIM_KERNELS_SKIP_BUILD"):
        _say("AMDIM_KERNELS_SKIP_BUILD=1: installing without the compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say("torch is not importable at build time: installing without the compiled extension "
             "(backends 'cpp' and 'cuda' unavailable; install torch first and use --no-build-isolation)")
        return [], {}

    nvcc = CUDA_HOME and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if _flag("AMDIM_KERNELS_SKIP_CUDA_BUILD"):
        with_cuda, why = False, "AMDIM_KERNELS_SKIP_CUDA_BUILD=1"
    elif _flag("AMDIM_KERNELS_FORCE_CUDA"):
        with_cuda, why = True, "AMDIM_KERNELS_FORCE_CUDA=1"
    elif torch.version.cuda is None:
        with_cuda, why = False, f"torch {torch.__version__} is not a CUDA build"
    elif not nvcc:
        with_cuda, why = False, "no nvcc found (set CUDA_HOME)"
    else:
        with_cuda, why = True, f"torch {torch.__version__} (CUDA {torch.version.cuda}) and {nvcc}"

    sources = ["csrc/nce_op.cpp", "csrc/nce_cpu.cpp"]
    cxx = ["-O3"]  # the C++ standard: torch's helper picks the one its headers need
    kwargs = dict(include_dirs=[os.path.abspath("csrc")])
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")  # without a visible GPU torch needs a list
        sources += ["csrc/nce_cuda.cpp", "csrc/nce_cuda_kernels.cu", "csrc/nce_cuda_mma.cu"]
        try:  # CUDAContext.h needs the cuBLAS/cuSPARSE headers of torch's own nvidia wheels
            import nvidia

            for root in nvidia.__path__:
                for sub in ("cu13", "cu12"):
                    inc = os.path.join(root, sub, "include")
                    if os.path.isdir(inc):
                        kwargs["include_dirs"].append(inc)
        except ImportError:
            pass
        ext = CUDAExtension(
            "amdim_kernels._C", sources,
            define_macros=[("AMDIM_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            **kwargs,
        )
        _say(f"building amdim_kernels._C with CPU and CUDA kernels ({why}; "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext = CppExtension("amdim_kernels._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
        _say(f"building amdim_kernels._C with CPU kernels only ({why})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension()

setup(
    name="amdim-kernels",
    version="0.1.0",
    description="Fused GPU kernels for the contrastive NCE loss of AMDIM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["amdim_kernels", "amdim_kernels.*", "amdim"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.2"], "train": ["torchvision", "tqdm", "tensorboard"]},
)
