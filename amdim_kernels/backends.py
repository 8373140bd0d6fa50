"""Which implementations of the loss exist on this machine, and which one `auto` picks."""
from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator

import torch

from .validation import Problem

BACKENDS = ("reference", "triton", "cuda", "cpp")

# Fastest first, per device type; measured in benchmarks/RESULTS.md (H100, bf16: cuda beat
# triton on 3 of the 4 AMDIM problem sizes; 2 CPU cores: cpp beat the reference).
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}


# What this install has, read once at import: nce_loss's path must not look up modules on
# each call (torch.compile cannot trace importlib on every torch version).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load_extension():
    """The module that registers the compiled ops, or None when amdim_kernels._C is not built."""
    if importlib.util.find_spec("amdim_kernels._C") is None:
        return None
    from . import compiled  # loads _C and registers its fake and autograd implementations

    return compiled


_EXTENSION = _load_extension()


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through its interpreter: TRITON_INTERPRET=1 set
    before amdim_kernels (and Triton) were imported."""
    return _TRITON_INTERPRET


def _extension_reason() -> str | None:
    if _EXTENSION is None:
        return "the compiled extension amdim_kernels._C is not built in this install"
    return None


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend `name` cannot run on tensors on `device`, or None if it can."""
    if name == "reference":
        return None
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is available (torch.cuda.is_available() is False)"
    if name == "triton":
        if not _TRITON_INSTALLED:
            return "Triton is not installed (pip install triton)"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return (
            f"the Triton kernels need CUDA tensors, got tensors on {device} "
            "(set TRITON_INTERPRET=1 before importing to run them on the CPU, slowly)"
        )
    if name == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend needs CUDA tensors, got tensors on {device} (use 'cpp' on the CPU)"
        return _extension_reason() or _extension_lacks("cuda") or _kernel_image_reason(device)
    if name == "cpp":
        if device.type != "cpu":
            return f"the 'cpp' backend needs CPU tensors, got tensors on {device} (use 'cuda' or 'triton')"
        return _extension_reason() or _extension_lacks("cpu")
    raise AssertionError(name)


def _extension_lacks(kind: str) -> str | None:
    if kind in _EXTENSION.BUILT_FOR:
        return None
    return f"the compiled extension was built without {kind} kernels"


# Per CUDA device index: why it cannot load the extension's CUDA kernels ("" when it can),
# asked once per device (compiled.kernel_image_error).
_KERNEL_IMAGE_ERRORS: dict[int, str] = {}


def _kernel_image_reason(device: torch.device) -> str | None:
    """Why the GPU cannot run the cuda backend's kernels: an extension built for other
    architectures (e.g. TORCH_CUDA_ARCH_LIST=9.0 on an A100) would fail at its first launch,
    so `auto` moves on to Triton instead. A compiled graph takes the answer of an eager call
    on the device, or assumes it can (it cannot call into the extension while tracing)."""
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _KERNEL_IMAGE_ERRORS:
        if torch.compiler.is_compiling():
            return None
        _KERNEL_IMAGE_ERRORS[index] = _EXTENSION.kernel_image_error(index)
    error = _KERNEL_IMAGE_ERRORS[index]
    if not error:
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return (f"the compiled extension has no CUDA kernels that this GPU (compute capability {major}.{minor}) can "
            f"load: {error}. Rebuild it for this GPU, e.g. TORCH_CUDA_ARCH_LIST={major}.{minor} pip install -e . "
            "--no-build-isolation")


def build_info() -> dict:
    """What this install has: the compiled extension and its kernels, versions, and the
    backends that can run on each device of this machine."""
    built_for = () if _EXTENSION is None else _EXTENSION.BUILT_FOR
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "extension_built_for": built_for,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "available_backends": {dev: available_backends(dev) for dev in devices},
        "auto": {dev: resolve("auto", torch.device(dev)) for dev in devices},
    }


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run here: for tensors on `device`, or on any device of this machine."""
    if device is None:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(device)]
    return [b for b in BACKENDS if any(unavailable_reason(b, dev) is None for dev in devices)]


def resolve(name: str, device: torch.device) -> str:
    """The backend that runs for `name` ('auto' or a backend) on `device`; an unavailable one
    is a ValueError, as every other bad argument of nce_loss, naming why it cannot run."""
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise ValueError(f"backend {name!r} is not available: {reason}")
    return name


def implementation(name: str) -> Callable[[Problem], tuple[torch.Tensor, torch.Tensor]]:
    """The function computing (loss, reg) for a validated problem with backend `name`."""
    if name == "reference":
        from .reference import nce_loss_reference

        return lambda p: nce_loss_reference(p.src, p.trg, p.pos_idx, p.tclip, p.reg_weight, p.scale, p.reduction)
    if name == "triton":
        from .triton_nce.function import nce_loss_triton

        return nce_loss_triton
    if name in ("cuda", "cpp") and _EXTENSION is not None:
        return _EXTENSION.nce_loss_compiled
    raise RuntimeError(f"backend {name!r} has no implementation in this build")


CUDA_SCORES_ENV = "AMDIM_KERNELS_CUDA_SCORES"
CUDA_SCORES = ("auto", "cublas", "mma")


@contextlib.contextmanager
def cuda_scores(strategy: str) -> Iterator[None]:
    """Pin how backend="cuda" makes the scores of float16/bfloat16 inputs while the block runs
    (forward and backward calls alike): "cublas" (cuBLAS score chunks and fused epilogue
    kernels), "mma" (the fused WMMA kernels, scores in shared memory only) or "auto" (the
    default: mma on sm_80+ when N*M*L*D <= 2^35, AMDIM's per-GPU problems, where it measured
    faster on an H100; cublas above). The C++ op reads the environment variable
    AMDIM_KERNELS_CUDA_SCORES, which this sets."""
    if strategy not in CUDA_SCORES:
        raise ValueError(f"strategy must be one of {CUDA_SCORES}, got {strategy!r}")
    before = os.environ.get(CUDA_SCORES_ENV)
    os.environ[CUDA_SCORES_ENV] = strategy
    try:
        yield
    finally:
        if before is None:
            del os.environ[CUDA_SCORES_ENV]
        else:
            os.environ[CUDA_SCORES_ENV] = before
