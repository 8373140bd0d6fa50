"""Build script of amdim-kernels.

`pip install . --no-build-isolation` (torch installed first) installs the package and
compiles the extension amdim_kernels._C from amdim_kernels/csrc/ against that torch:
- with CPU and CUDA kernels when torch is a CUDA build and nvcc is found (CUDA_HOME);
- with CPU kernels only otherwise, or with AMDIM_KERNELS_SKIP_CUDA_BUILD=1.
AMDIM_KERNELS_FORCE_CUDA=1 builds the CUDA kernels even where no GPU or nvcc check passes
(and fails loudly if it cannot). AMDIM_KERNELS_SKIP_BUILD=1 installs without the extension.
Arch list: TORCH_CUDA_ARCH_LIST, default "8.0;9.0+PTX". Parallel jobs: MAX_JOBS.

Where torch cannot be imported at build time (plain `pip install .`, whose isolated build
environment has no torch), the package installs with its C++/CUDA sources and compiles the
extension on first use against the torch it runs with (amdim_kernels/extension_loader.py).
The sources ship in every wheel and sdist either way.
"""
import importlib.util
import json
import os

from setuptools import find_packages, setup

_spec = importlib.util.spec_from_file_location(
    "amdim_kernels_extension_build", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "amdim_kernels", "extension_build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def _say(msg: str) -> None:
    print(f"amdim-kernels: {msg}", flush=True)


def _extension():
    """(ext_modules, cmdclass) for the compiled extension, or ([], {}) without it."""
    if build.flag("AMDIM_KERNELS_SKIP_BUILD"):
        _say("AMDIM_KERNELS_SKIP_BUILD=1: installing without the compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say("torch is not importable at build time: installing the C++/CUDA sources without "
             "compiling them; amdim_kernels compiles them on first use against the torch it runs with "
             "(to compile now instead: install torch first, then pip install --no-build-isolation)")
        return [], {}

    with_cuda, why = build.cuda_choice(torch)
    openmp = build.openmp_flags()
    cxx = list(build.CXX_FLAGS) + openmp
    kwargs = dict(include_dirs=build.include_dirs(with_cuda), define_macros=build.defines(with_cuda),
                  extra_link_args=openmp)
    sources = [os.path.relpath(p) for p in build.sources(with_cuda)]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.DEFAULT_ARCHS)  # torch needs a list without a GPU
        ext = CUDAExtension("amdim_kernels._C", sources,
                            extra_compile_args={"cxx": cxx, "nvcc": list(build.NVCC_FLAGS)},
                            **kwargs)
        _say(f"building amdim_kernels._C with CPU and CUDA kernels ({why}; "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext = CppExtension("amdim_kernels._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
        _say(f"building amdim_kernels._C with CPU kernels only ({why})")

    class BuildWithRecord(BuildExtension):
        """Also writes _C.json beside the extension: the torch it was built against, so that
        amdim_kernels can refuse it under another torch before loading it."""

        def run(self):
            super().run()
            record = {"torch": torch.__version__, "cuda": torch.version.cuda,
                      "built_for": ["cpu", "cuda"] if with_cuda else ["cpu"],
                      "archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
                      "sources": build.sources_digest()}
            for ext in self.extensions:
                path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), "_C.json")
                with open(path, "w") as f:
                    json.dump(record, f)

    return [ext], {"build_ext": BuildWithRecord.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension()

setup(
    name="amdim-kernels",
    version="0.1.0",
    description="Fused GPU kernels for the contrastive NCE loss of AMDIM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["amdim_kernels", "amdim_kernels.*", "amdim"]),
    package_data={"amdim_kernels": ["csrc/*.cpp", "csrc/*.cu", "csrc/*.h", "csrc/*.cuh"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "ninja"],
    extras_require={"triton": ["triton>=3.2"], "train": ["torchvision", "tqdm", "tensorboard", "matplotlib"]},
)
