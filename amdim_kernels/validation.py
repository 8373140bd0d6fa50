"""Checks on the arguments of ``nce_loss``, run before any kernel.

Each failure raises ``ValueError`` (bad value, shape or device) or ``TypeError`` (bad type,
dtype or layout) with a message naming the argument and what was expected.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .indices import capturing, range_indices

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "group_means", "none")
FLOAT32_NORMAL = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class Problem:
    """Validated arguments of one loss call."""

    src: torch.Tensor  # (N, D)
    trg: torch.Tensor  # (M, L, D)
    pos_idx: torch.Tensor  # (N,) int64 in [0, M), contiguous
    tclip: float | None
    reg_weight: float
    scale: float
    reduction: str
    groups: tuple[int, ...]  # rows per group: one per range of a tuple of ranges, else (N,)

    @property
    def n(self) -> int:
        return self.src.shape[0]

    @property
    def m(self) -> int:
        return self.trg.shape[0]

    @property
    def l(self) -> int:  # noqa: E743 (the loss's name for it, docs/loss.md)
        return self.trg.shape[1]

    @property
    def d(self) -> int:
        return self.src.shape[1]


def _check_float_tensor(name: str, x: object, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    _check_dense(name, x)
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16, got {x.dtype}"
        )
    for dim_name, size in zip(layout.strip("()").split(", "), x.shape):
        if size == 0:
            raise ValueError(f"{name} has {dim_name} = 0 (shape {tuple(x.shape)}); every dimension must be positive")
    return x


def _check_dense(name: str, x: torch.Tensor) -> None:
    """The kernels read strided memory: a sparse or nested tensor is refused by name (it
    would otherwise fail inside a backend, each with its own message)."""
    if x.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor; pass one padded or "
                        "concatenated tensor")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}; call .to_dense() first")


def _check_number(name: str, x: object, none_means: str | None = None) -> None:
    """The float options are Python numbers (None too, where `none_means` says what it
    means): a tensor would be read back to the host on every call and a gradient to it
    silently dropped; a string or a bool would be silently reinterpreted as a number."""
    if x is None and none_means is not None:
        return
    expected = f"a Python number{f' or None ({none_means})' if none_means else ''}"
    if isinstance(x, torch.Tensor):
        hint = (" (a learnable scale multiplies the sources: nce_loss(src * scale, trg, ..., scale=1.0)"
                " carries its gradient)" if name == "scale" else "")
        raise TypeError(f"{name} must be {expected}, got a tensor{hint}")
    # SymFloat and SymInt: the symbolic numbers of a torch.compile'd caller
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be {expected}, got {type(x).__name__} {x!r}")


def _finite(x: float) -> bool:
    # not math.isfinite: under torch.compile a float argument can be symbolic, and a
    # comparison is what the compiler can guard on (NaN fails it too)
    return abs(x) < math.inf


def _range_indices(pos_idx: range | tuple | list, n: int, m: int, like: torch.Tensor) -> torch.Tensor:
    """The N image indices of a range, or of a tuple or list of ranges one after another, as
    an int64 tensor on like's device (indices.py), their bounds checked on the host: unlike a
    tensor's, no read back from the device (e.g. a rank's range(rank * N, rank * N + N), or
    two groups of sources against the same targets, (range(B), range(B)))."""
    ranges = (pos_idx,) if isinstance(pos_idx, range) else tuple(pos_idx)
    if not ranges or not all(isinstance(r, range) for r in ranges):
        kinds = ", ".join(type(r).__name__ for r in ranges) or "nothing"
        ints = ranges and all(isinstance(r, int) for r in ranges)
        hint = "; indices go in a tensor, torch.tensor(pos_idx)" if ints else ""
        raise TypeError(f"pos_idx as a {type(pos_idx).__name__} must hold Python ranges, got {kinds}{hint}")
    length = sum(len(r) for r in ranges)
    if length != n:
        raise ValueError(f"pos_idx must hold N = {n} indices, got {pos_idx} of length {length}")
    for r in ranges:
        # a range's extremes are its ends (min() and max() would walk it: 30 us at N = 1024)
        if len(r) and (min(r[0], r[-1]) < 0 or max(r[0], r[-1]) >= m):
            raise ValueError(f"pos_idx values must lie in [0, M) = [0, {m}), got {pos_idx}")
    return range_indices(ranges, like)


def validate(
    src: torch.Tensor,
    trg: torch.Tensor,
    pos_idx: torch.Tensor | range | tuple[range, ...] | list[range] | None,
    tclip: float | None,
    reg_weight: float,
    scale: float | None,
    reduction: str,
) -> Problem:
    """Check every argument; return them normalised (pos_idx int64, scale a float)."""
    src = _check_float_tensor("src", src, 2, "(N, D)")
    trg = _check_float_tensor("trg", trg, 3, "(M, L, D)")
    n, d = src.shape
    m, _, d_trg = trg.shape
    if d_trg != d:
        raise ValueError(f"trg's last dimension must equal src's D = {d}, got trg of shape {tuple(trg.shape)}")
    if trg.dtype != src.dtype:
        raise TypeError(f"src and trg must have the same dtype, got src {src.dtype} and trg {trg.dtype}")
    if trg.device != src.device:
        raise ValueError(f"src and trg must be on the same device, got src on {src.device} and trg on {trg.device}")

    groups = (n,)
    if pos_idx is None:
        if n != m:
            raise ValueError(
                f"pos_idx is required when N != M (src has N = {n} rows, trg has M = {m} images)"
            )
        pos_idx = range_indices(range(n), src)
    elif isinstance(pos_idx, (range, tuple, list)):
        if isinstance(pos_idx, (tuple, list)):
            groups = tuple(len(r) if isinstance(r, range) else 0 for r in pos_idx)
        pos_idx = _range_indices(pos_idx, n, m, src)
    else:
        if not isinstance(pos_idx, torch.Tensor):
            raise TypeError(
                f"pos_idx must be a torch.Tensor of shape (N,), a range or a tuple of ranges, got {type(pos_idx).__name__}"
            )
        _check_dense("pos_idx", pos_idx)
        if pos_idx.dim() != 1 or pos_idx.shape[0] != n:
            raise ValueError(f"pos_idx must have shape (N,) = ({n},), got {tuple(pos_idx.shape)}")
        if pos_idx.dtype.is_floating_point or pos_idx.dtype.is_complex or pos_idx.dtype == torch.bool:
            raise TypeError(f"pos_idx must have an integer dtype, got {pos_idx.dtype}")
        if pos_idx.device != src.device:
            raise ValueError(f"pos_idx must be on src's device {src.device}, got {pos_idx.device}")
        if torch.compiler.is_compiling() or capturing(pos_idx):
            # neither a compiled graph nor a CUDA graph being captured can read values back to
            # the host: the check runs on the device instead, and fails when the graph runs
            # (RuntimeError, same message)
            torch._assert_async(((pos_idx >= 0) & (pos_idx < m)).all(), f"pos_idx values must lie in [0, M) = [0, {m})")
        else:
            lo, hi = torch.stack(torch.aminmax(pos_idx)).tolist()  # one device sync for both bounds
            if lo < 0 or hi >= m:
                raise ValueError(f"pos_idx values must lie in [0, M) = [0, {m}), got values in [{lo}, {hi}]")
        pos_idx = pos_idx.to(torch.int64).contiguous()  # the kernels read it as a packed array

    tclip, reg_weight, scale = check_options(tclip, reg_weight, scale, reduction)
    if reduction == "group_means" and 0 in groups:
        raise ValueError(f"reduction='group_means' takes one mean per range of pos_idx, so each range must hold at "
                         f"least one index, got ranges of lengths {list(groups)}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    return Problem(src, trg, pos_idx, tclip, reg_weight, scale, reduction, groups)


def check_options(tclip: float | None, reg_weight: float, scale: float | None,
                  reduction: str) -> tuple[float | None, float, float | None]:
    """Check nce_loss's options, which do not depend on the tensors; return the numbers as
    Python floats (None kept)."""
    _check_number("tclip", tclip, none_means="no clipping")
    _check_number("reg_weight", reg_weight)
    _check_number("scale", scale, none_means="1/sqrt(D)")
    if tclip is not None:
        tclip = float(tclip)
        if not (tclip > 0 and _finite(tclip)):
            raise ValueError(f"tclip must be a positive finite number or None, got {tclip}")
        if not FLOAT32_NORMAL[0] <= tclip <= FLOAT32_NORMAL[1]:
            # the kernels clip in float32: a tclip outside its normal range rounds to 0 or
            # inf there, or its reciprocal overflows
            raise ValueError(f"tclip must lie in float32's normal range [{FLOAT32_NORMAL[0]:.6g}, "
                             f"{FLOAT32_NORMAL[1]:.6g}] (or be None), got {tclip}")
    reg_weight = float(reg_weight)
    if not (reg_weight >= 0 and _finite(reg_weight)):
        raise ValueError(f"reg_weight must be a finite number >= 0, got {reg_weight}")
    if scale is not None:
        scale = float(scale)
        if not _finite(scale):
            raise ValueError(f"scale must be a finite number or None, got {scale}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return tclip, reg_weight, scale
