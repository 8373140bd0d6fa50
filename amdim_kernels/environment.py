"""What this install has, found once at import: Triton, whether its interpreter is on, and
whether the compiled extension may be built on first use. The bottom of the package: it
imports nothing of it. nce_loss's path reads these names rather than looking up modules or
the environment on each call (torch.compile cannot trace importlib on every torch version)."""
from __future__ import annotations

import importlib.util
import os

TRITON_INSTALLED: bool = importlib.util.find_spec("triton") is not None
# TRITON_INTERPRET=1 set before amdim_kernels (and Triton) were imported: the Triton kernels
# run on the CPU through Triton's interpreter
TRITON_INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# AMDIM_KERNELS_BUILD_ON_USE=0: never compile the extension on first use (extension_loader.py)
BUILD_ON_USE: bool = os.environ.get("AMDIM_KERNELS_BUILD_ON_USE", "1") not in ("", "0")
