"""Block sizes, grids and chunking for the Triton kernels, and the calls that launch them."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..backends import triton_interpreting
from .kernels import nce_fwd_kernel, nce_grad_tile_kernel, nce_merge_kernel


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_j: int
    block_k: int
    num_warps: int
    num_stages: int


def tile_config(dtype: torch.dtype, d: int) -> TileConfig:
    if triton_interpreting():
        # the interpreter pays per program and per loop step: few, large tiles
        return TileConfig(32, 64, min(64, max(16, triton.next_power_of_2(d))), 4, 1)
    if dtype == torch.float32:
        return TileConfig(64, 128, 32, 8, 3)
    return TileConfig(128, 128, 64, 8, 3)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: a few splits and chunks exercise the merge without slowing CI


def dot_precision(dtype: torch.dtype) -> str:
    """Triton's dot precision for float32 follows torch's TF32 switch, as cuBLAS does."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not triton_interpreting():
        return "tf32"
    return "ieee"


def _common(src: torch.Tensor, trg: torch.Tensor, cfg: TileConfig) -> dict:
    n, d = src.shape
    m, l, _ = trg.shape
    return dict(
        N=n, J=m * l, L=l, D=d,
        stride_sn=src.stride(0), stride_sd=src.stride(1),
        stride_tm=trg.stride(0), stride_tl=trg.stride(1), stride_td=trg.stride(2),
        BLOCK_N=cfg.block_n, BLOCK_J=cfg.block_j, BLOCK_K=cfg.block_k,
        DOT_PRECISION=dot_precision(src.dtype),
        UPCAST=triton_interpreting() and src.dtype != torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


@dataclass
class ForwardStats:
    loss: torch.Tensor  # (N, L) per-positive loss
    pos: torch.Tensor  # (N, L) clipped positive scores
    neg_lse: torch.Tensor  # (N,) log-sum-exp of each row's negatives
    sq: torch.Tensor  # (N,) sum over the row of a^2


def forward(src, trg, pos_idx, tclip: float | None, scale: float) -> ForwardStats:
    n, _ = src.shape
    m, l, _ = trg.shape
    j = m * l
    cfg = tile_config(src.dtype, src.shape[1])
    f32 = dict(device=src.device, dtype=torch.float32)

    # Split the columns so that about 4 programs per SM run even when N is one row block.
    row_blocks = triton.cdiv(n, cfg.block_n)
    col_tiles = triton.cdiv(j, cfg.block_j)
    splits = min(col_tiles, max(1, triton.cdiv(4 * _num_sms(src.device), row_blocks)))
    cols_per_split = triton.cdiv(col_tiles, splits) * cfg.block_j
    splits = triton.cdiv(j, cols_per_split)  # no empty split after rounding

    pos = torch.empty(n, l, **f32)
    part_sum = torch.empty(splits, n, **f32)
    part_max = torch.empty(splits, n, **f32)
    part_sq = torch.empty(splits, n, **f32)
    nce_fwd_kernel[(row_blocks, splits)](
        src, trg, pos_idx, pos, part_sum, part_max, part_sq,
        cols_per_split=cols_per_split, scale=scale,
        tclip=0.0 if tclip is None else tclip, CLIP=tclip is not None,
        **_common(src, trg, cfg),
    )

    loss = torch.empty(n, l, **f32)
    neg_lse = torch.empty(n, **f32)
    sq = torch.empty(n, **f32)
    merge_rows = max(1, min(64, 4096 // triton.next_power_of_2(l)))
    nce_merge_kernel[(triton.cdiv(n, merge_rows),)](
        pos, part_sum, part_max, part_sq, loss, neg_lse, sq, n, l, splits,
        BLOCK_N=merge_rows, BLOCK_L=triton.next_power_of_2(l),
    )
    return ForwardStats(loss, pos, neg_lse, sq)


def chunk_columns(n: int, m: int, l: int, cfg: TileConfig, sms: int) -> int:
    """Columns per backward chunk: whole images, about an eighth of all columns, but enough
    that one chunk's gradient-tile grid keeps every SM busy when N is small."""
    fill = triton.cdiv(2 * sms, triton.cdiv(n, cfg.block_n)) * cfg.block_j
    images = max(triton.cdiv(m, 8), triton.cdiv(fill, l))
    return min(m, images) * l


def gradient_chunks(src, trg, pos_idx, neg_lse, r, gpos, reg_coef, tclip, scale, g_dtype):
    """Yield (first image, last image + 1, G) for consecutive chunks of whole images, where
    G (N, C) = scale * d(loss + reg)/da on the chunk's C columns. G's buffer is reused."""
    n, _ = src.shape
    m, l, _ = trg.shape
    cfg = tile_config(src.dtype, src.shape[1])
    c_max = chunk_columns(n, m, l, cfg, _num_sms(src.device))
    g_buf = torch.empty(n, c_max, device=src.device, dtype=g_dtype)
    common = _common(src, trg, cfg)
    for c0 in range(0, m * l, c_max):
        c = min(c_max, m * l - c0)
        g = g_buf[:, :c]
        nce_grad_tile_kernel[(triton.cdiv(n, cfg.block_n), triton.cdiv(c, cfg.block_j))](
            src, trg, pos_idx, neg_lse, r, gpos, reg_coef, g, g.stride(0),
            col_begin=c0, C=c, scale=scale,
            tclip=0.0 if tclip is None else tclip, CLIP=tclip is not None,
            **common,
        )
        yield c0 // l, (c0 + c) // l, g
