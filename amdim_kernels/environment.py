"""What this install has, found once at import: Triton, whether its interpreter is on, and
the compiled extension amdim_kernels._C. The bottom of the package: it imports nothing of
it but the extension itself. nce_loss's path reads these names rather than looking up
modules on each call (torch.compile cannot trace importlib on every torch version)."""
from __future__ import annotations

import importlib.util
import os
from types import ModuleType

TRITON_INSTALLED: bool = importlib.util.find_spec("triton") is not None
# TRITON_INTERPRET=1 set before amdim_kernels (and Triton) were imported: the Triton kernels
# run on the CPU through Triton's interpreter
TRITON_INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load_extension() -> ModuleType | None:
    """amdim_kernels._C (loading it registers the C++ ops), or None where it is not built."""
    if importlib.util.find_spec("amdim_kernels._C") is None:
        return None
    from . import _C

    return _C


EXTENSION: ModuleType | None = _load_extension()
# the devices the extension has kernels for: ("cpu",), ("cpu", "cuda"), or () without it
EXTENSION_BUILT_FOR: tuple[str, ...] = () if EXTENSION is None else tuple(EXTENSION.BUILT_FOR)
