"""The backend registry: which implementations of the loss exist on this machine, which one
`auto` picks, and the function each runs."""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import environment, extension_loader
from .backend_settings import Settings
from .validation import Problem

BACKENDS = ("reference", "triton", "cuda", "cpp")

# Fastest first, per device type; measured in benchmarks/RESULTS.md (H100, bf16: cuda beat
# triton on 3 of the 4 AMDIM problem sizes; 2 CPU cores: cpp beat the reference).
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}


@torch.compiler.disable
def _load_extension() -> extension_loader.ExtensionState:
    """The extension, found (or compiled) when a backend lookup first needs it, and its ops'
    fake and autograd implementations registered. Run eagerly under torch.compile: the first
    lookup may compile C++ and import modules."""
    state = extension_loader.load()
    if state.module is not None:
        from . import extension_ops  # noqa: F401 (registers the ops' implementations)
    return state


def extension_state() -> extension_loader.ExtensionState:
    """The compiled extension this process uses, or why there is none (loaded once)."""
    state = extension_loader.STATE
    return state if state is not None else _load_extension()


def _extension_reason() -> str | None:
    state = extension_state()
    if state.module is None:
        return f"the compiled extension amdim_kernels._C is not available: {state.reason}"
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
        if not environment.TRITON_INSTALLED:
            return "Triton is not installed (pip install triton)"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and environment.TRITON_INTERPRET:
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
    state = extension_state()
    if kind in state.built_for:
        return None
    why = f" ({state.reason})" if state.reason else ""
    return f"the compiled extension was built without {kind} kernels{why}"


# Per CUDA device index: why it cannot load the extension's CUDA kernels ("" when it can),
# asked once per device (extension_ops.kernel_image_error).
KERNEL_IMAGE_ERRORS: dict[int, str] = {}


def kernel_image_error(index: int) -> str:
    """Why CUDA device `index` cannot load the extension's CUDA kernels ("" when it can)."""
    from . import extension_ops

    return extension_ops.kernel_image_error(index)


def _kernel_image_reason(device: torch.device) -> str | None:
    """Why the GPU cannot run the cuda backend's kernels: an extension built for other
    architectures (e.g. TORCH_CUDA_ARCH_LIST=9.0 on an A100) would fail at its first launch,
    so `auto` moves on to Triton instead. A compiled graph takes the answer of an eager call
    on the device, or assumes it can (it cannot call into the extension while tracing)."""
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in KERNEL_IMAGE_ERRORS:
        if torch.compiler.is_compiling():
            return None
        KERNEL_IMAGE_ERRORS[index] = kernel_image_error(index)
    error = KERNEL_IMAGE_ERRORS[index]
    if not error:
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return (f"the compiled extension has no CUDA kernels that this GPU (compute capability {major}.{minor}) can "
            f"load: {error}. Rebuild it for this GPU: TORCH_CUDA_ARCH_LIST={major}.{minor} pip install "
            "--no-build-isolation . (a build on first use reads the same variable)")


def build_info() -> dict:
    """What this install has: the compiled extension and its kernels, versions, and the
    backends that can run on each device of this machine."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    extension = extension_state()
    return {
        "extension_built_for": extension.built_for,
        "extension": {"origin": extension.origin, "path": extension.path, "note": extension.reason},
        # the CPU epilogue's compiled versions this CPU runs, best (the one used) first
        "cpu_epilogue": extension.module.epilogue_versions() if extension.module is not None else (),
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


def implementation(name: str) -> Callable[[Problem, Settings], tuple[torch.Tensor, torch.Tensor]]:
    """The function computing (loss, reg) of a validated problem under the given settings
    with backend `name`."""
    if name == "reference":
        from .reference import nce_loss_reference

        return lambda p, s: nce_loss_reference(p.src, p.trg, p.pos_idx, p.tclip, p.reg_weight, p.scale, p.reduction,
                                               p.groups)
    if name == "triton":
        from .triton_nce.backend import nce_loss_triton

        return nce_loss_triton
    if name in ("cuda", "cpp") and extension_state().module is not None:
        from . import extension_ops

        return extension_ops.nce_loss_extension
    raise RuntimeError(f"backend {name!r} has no implementation in this build")
