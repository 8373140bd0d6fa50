"""How the fused backends compute, as one explicit settings object.

Every call of ``nce_loss`` reads the current ``Settings`` once and passes what its backend
needs down as arguments (to the Triton launchers and, as op arguments, to the C++ op), so
the backward of a call uses the settings of its forward. ``settings(...)`` changes them for
the calls made inside a ``with`` block (a context variable: threads and asyncio tasks each
see their own). The defaults are the measured fastest choices; benchmarks and tests pin
the others to compare them.

One environment variable is read, once, when this module is imported:
``AMDIM_KERNELS_CUDA_SCORES`` gives the default of ``cuda_scores``.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .shared_constants import CHUNK_PARTS

TRITON_SCORES = ("fused", "gemm")
TRITON_LOADS = ("tma", "pointers")
TRITON_TILE_KERNELS = ("fwd", "grad")
CUDA_SCORES = ("auto", "cublas", "mma")
CUDA_SCORES_ENV = "AMDIM_KERNELS_CUDA_SCORES"
SCHEDULES = ("auto", "three-product", "four-product")


@dataclass(frozen=True)
class TileConfig:
    """Tiles of a Triton kernel: (BLOCK_N rows, BLOCK_J columns, BLOCK_K features) a program,
    its warps and software-pipeline stages, for Settings.triton_tiles."""

    block_n: int
    block_j: int
    block_k: int
    num_warps: int
    num_stages: int
    # ptxas register cap of the forward's unmasked launch, or of the G kernel (None: ptxas
    # decides); 128 with 256 threads lets two programs share an SM
    plain_max_registers: int | None = None
    # the forward's masked launch scores its tiles this many columns at a time (a divisor of
    # block_j; None: block_j): narrower tiles leave the registers that copying the positives
    # out of them takes (forward._store_positives)
    masked_block_j: int | None = None

    def __post_init__(self):
        if self.masked_block_j is not None and self.block_j % self.masked_block_j:
            raise ValueError(f"masked_block_j must divide block_j = {self.block_j}, got {self.masked_block_j}")

    @property
    def masked(self) -> TileConfig:
        """The tiles of the forward's masked launch."""
        return dataclasses.replace(self, block_j=self.masked_block_j or self.block_j)

    def as_list(self) -> list[int]:
        """The config as an op argument: seven ints, 0 for a field that is None."""
        return [self.block_n, self.block_j, self.block_k, self.num_warps, self.num_stages,
                self.plain_max_registers or 0, self.masked_block_j or 0]

    @staticmethod
    def from_list(values: Sequence[int]) -> TileConfig:
        """The inverse of as_list."""
        *head, cap, masked = values
        return TileConfig(*head, plain_max_registers=cap or None, masked_block_j=masked or None)


@dataclass(frozen=True)
class Settings:
    """The fused backends' choices; every field's default is the measured fastest.

    triton_scores: how the Triton kernels get their raw scores: "fused" (tl.dot inside the
        kernels), "gemm" (cuBLAS score chunks read by the same kernels), or None: "fused"
        for 16-bit inputs, "gemm" for float32.
    triton_loads: how the fused K-loop loads its operands: "tma" (tensor descriptors,
        sm_90 and newer), "pointers", or None: "tma" where the GPU and the operands allow it.
    triton_chunks: the Triton backward (and "gemm" forward) works on about 1/triton_chunks
        of the columns at a time, or on fewer, larger chunks where those would be small.
    triton_tiles: tile configurations (TileConfig) by kernel, "fwd" and/or "grad"; absent:
        the defaults.
    cuda_scores: how backend="cuda" makes the scores of float16/bfloat16 inputs: "cublas"
        (cuBLAS score chunks, fused epilogue kernels), "mma" (fused WMMA kernels, score
        tiles in shared memory only, compute capability 8.0+), or "auto": "mma" on 8.0+ up
        to N*M*L*D = 2^35, AMDIM's per-GPU sizes, "cublas" above. float32 always takes cuBLAS.
    schedule: how backend="cpp" splits the work between forward and backward (schedule.py;
        backends "triton" and "cuda" take "three-product" only where it is set, float32 and
        bfloat16):
        "four-product" (the backward makes the scores again), "three-product" (the forward
        keeps blocks of rows' scores whole and makes the gradients of the mean loss over all
        N*L positives plus reg too; eager mode, reduction "mean" or "group_means"; a call
        that needs no gradient runs four-product), or "auto": "three-product" wherever the
        call needs gradients and takes it and a useful row block fits workspace_bytes.
    workspace_bytes: the three-product schedule's budget for one row block's float32 scores
        (on a GPU, and its G);
        None: schedule.default_workspace_bytes (for cpp half the whole score matrix, within
        [4 MiB, 256 MiB]; for the GPU backends all N rows at once, within [4 MiB, 1 GiB]).
    """

    triton_scores: str | None = None
    triton_loads: str | None = None
    triton_chunks: int = CHUNK_PARTS
    triton_tiles: Mapping[str, Any] = field(default_factory=dict)
    cuda_scores: str = "auto"
    schedule: str = "auto"
    workspace_bytes: int | None = None

    def __post_init__(self):
        if self.triton_scores not in (None,) + TRITON_SCORES:
            raise ValueError(f"triton_scores must be one of {(None,) + TRITON_SCORES}, got {self.triton_scores!r}")
        if self.triton_loads not in (None,) + TRITON_LOADS:
            raise ValueError(f"triton_loads must be one of {(None,) + TRITON_LOADS}, got {self.triton_loads!r}")
        if isinstance(self.triton_chunks, bool) or not isinstance(self.triton_chunks, int) or self.triton_chunks < 1:
            raise ValueError(f"triton_chunks must be a positive int, got {self.triton_chunks!r}")
        unknown = set(self.triton_tiles) - set(TRITON_TILE_KERNELS)
        if unknown:
            raise ValueError(f"triton_tiles takes the kernels {TRITON_TILE_KERNELS}, got {sorted(unknown)}")
        for kernel, tiles in self.triton_tiles.items():
            if not isinstance(tiles, TileConfig):
                raise ValueError(f"triton_tiles[{kernel!r}] must be a TileConfig, got {tiles!r}")
        if self.cuda_scores not in CUDA_SCORES:
            raise ValueError(f"cuda_scores must be one of {CUDA_SCORES}, got {self.cuda_scores!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.workspace_bytes is not None and (isinstance(self.workspace_bytes, bool) or not isinstance(
                self.workspace_bytes, int) or self.workspace_bytes < 1):
            raise ValueError(f"workspace_bytes must be a positive int or None, got {self.workspace_bytes!r}")
        object.__setattr__(self, "triton_tiles", MappingProxyType(dict(self.triton_tiles)))


def _from_environment() -> Settings:
    value = os.environ.get(CUDA_SCORES_ENV, "") or "auto"
    if value not in CUDA_SCORES:
        raise ValueError(f"environment variable {CUDA_SCORES_ENV} must be one of {CUDA_SCORES}, got {value!r}")
    return Settings(cuda_scores=value)


_current: contextvars.ContextVar[Settings] = contextvars.ContextVar("amdim_kernels_settings",
                                                                     default=_from_environment())


def current_settings() -> Settings:
    """The settings that a call of nce_loss made here and now uses."""
    return _current.get()


@contextlib.contextmanager
def settings(**changes: Any) -> Iterator[Settings]:
    """The current settings with `changes` (fields of Settings) for the calls made inside;
    the previous ones come back on exit. Yields the settings in force. A backward runs with
    the settings of its forward, wherever it is called::

        with amdim_kernels.settings(cuda_scores="cublas"):
            loss, reg = nce_loss(src, trg)
    """
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise TypeError(f"settings() got unknown fields {unknown}; the fields are {sorted(fields)}")
    now = _current.get()
    if "triton_tiles" in changes:
        changes["triton_tiles"] = {**now.triton_tiles, **changes["triton_tiles"]}
    new = dataclasses.replace(now, **changes)
    token = _current.set(new)
    try:
        yield new
    finally:
        _current.reset(token)
