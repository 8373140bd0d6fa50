"""The Triton kernels' operands and products: which device a call runs on, the tiles' pointer
or TMA operands for the sources and a chunk's images, the keyword arguments all chunks of
a call share, and float32-accumulating matrix products (cuBLAS) around the kernels."""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import environment
from .config import TileConfig, dot_precision, operand_loads, tile_clip_args


def on_device_of(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """x's CUDA device made current for the calls inside, where it is not already: Triton
    launches on the current device (torch ops and cuBLAS follow their tensors), so inputs
    on cuda:1 with cuda:0 current would hand it pointers of the wrong device."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in float32 (cuBLAS's float32 output for 16-bit inputs)."""
    if a.dtype == b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


_ADDMM_TO_F32 = "dtype_out" in torch.ops.aten.addmm.overloads()


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1.0) -> None:
    """acc = beta * acc + a @ b for a float32 acc, accumulated in float32, with no temporary
    where cuBLAS can write float32 from 16-bit inputs (aten::addmm.dtype_out). beta = 0
    ignores what acc held (NaN included), as BLAS does."""
    if a.dtype == b.dtype == torch.float32:
        acc.addmm_(a, b, beta=beta)
    elif a.is_cuda and a.dtype == b.dtype and _ADDMM_TO_F32:
        torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
    elif beta == 0:
        acc.copy_(mm_f32(a, b))
    else:
        acc += mm_f32(a, b)


def source_args(src: torch.Tensor) -> dict:
    """The kernels' size and stride arguments of the sources (N, D): N, D, stride_s*."""
    (n, d), (stride_sn, stride_sd) = src.shape, src.stride()
    return dict(N=n, D=d, stride_sn=stride_sn, stride_sd=stride_sd)


def target_args(trg: torch.Tensor) -> dict:
    """The kernels' size and stride arguments of targets (M, L, D) (all of them, or a
    chunk's images): L, stride_t*."""
    stride_tm, stride_tl, stride_td = trg.stride()
    return dict(L=trg.shape[1], stride_tm=stride_tm, stride_tl=stride_tl, stride_td=stride_td)


def tma_ready(x: torch.Tensor) -> bool:
    """Whether a (rows, features) operand meets the copy engine's rules: features
    contiguous, base address and row stride multiples of 16 bytes (D a multiple of 8 in
    16-bit, of 4 in float32). Rows of stride 0 (an expanded tensor: every row the same
    memory) take pointers, which read them as they are, rather than a tensor map whose
    driver rules do not promise to accept them."""
    return (x.stride(1) == 1 and x.stride(0) > 0 and x.data_ptr() % 16 == 0
            and x.stride(0) * x.element_size() % 16 == 0)


def src_descriptor(src: torch.Tensor, cfg: TileConfig, from_scores: bool,
                   loads: str | None) -> Callable[[], TensorDescriptor] | None:
    """src (N, D) as a TMA descriptor in (BLOCK_N, BLOCK_K) boxes, shared by the chunks of
    one call and built when the first of them takes it: a cached maker, where the fused
    K-loop takes TMA operands (config.operand_loads, `loads` pinned or None) and src is tma_ready; else None: pointers."""
    if from_scores or operand_loads(src.device, loads) != "tma" or not tma_ready(src):
        return None
    box = [cfg.block_n, cfg.block_k]
    return functools.cache(lambda: TensorDescriptor(src, list(src.shape), list(src.stride()), box))


def tile_constants(src: torch.Tensor, cfg: TileConfig, from_scores: bool, tclip: float | None,
                    scale: float) -> dict:
    """The tile kernels' keyword arguments that all chunks of a call share (the sources'
    shape and strides, tiles, precision, scale, clip and shift), made once per call: on
    small problems the chunk loop's host time is what the GPU waits on."""
    d = src.shape[1]
    return dict(
        source_args(src),
        BLOCK_N=cfg.block_n, BLOCK_J=cfg.block_j, BLOCK_K=cfg.block_k,
        DOT_PRECISION=dot_precision(src.dtype),
        UPCAST=environment.TRITON_INTERPRET,  # 16-bit dots in float32 (a no-op for float32 tiles)
        FROM_SCORES=from_scores, EVEN_K=d % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, scale=scale, **tile_clip_args(tclip),
    )


def chunk_operands(src: torch.Tensor, src_desc: Callable[[], TensorDescriptor] | None, images: torch.Tensor,
                    cfg: TileConfig) -> tuple[tuple, dict]:
    """The tile kernels' (src, trg) operands for the sources (N, D) and a chunk's images
    (C / L, L, D), features contiguous in both, and the chunk's own keyword arguments (L,
    its strides, TMA).

    The operands are the tensors themselves, or with TMA two tensor descriptors: src_desc
    (src_descriptor) and the chunk as (C, D) in (BLOCK_J, BLOCK_K) boxes. TMA needs
    src_desc, the chunk's locations evenly spaced (a (C, D) view) and tma_ready;
    otherwise the kernels take pointers."""
    d = src.shape[1]
    m, l, _ = images.shape
    flat = images.view(m * l, d) if m == 1 or images.stride(0) == l * images.stride(1) else None
    tma = src_desc is not None and flat is not None and tma_ready(flat)
    if tma:
        box = [cfg.block_j, cfg.block_k]
        operands = (src_desc(), TensorDescriptor(flat, list(flat.shape), list(flat.stride()), box))
    else:
        operands = (src, images)
    return operands, dict(target_args(images), TMA=tma)


def features_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride along its last (feature) dimension: itself, or a copy.

    The score loops read rows of features: with unit stride a tile's loads are 16-byte
    asynchronous copies. The trainer's feature-map targets ((M, D, H, W) seen as
    (M, H*W, D)) have stride L along D instead; read in place, every element would be its
    own 2-byte load through registers (32 per thread and K step at the default tiles,
    compiled for sm_90), outside the copy pipeline. csrc/nce_cuda.cpp copies the same way.
    """
    return x if x.stride(-1) == 1 else x.contiguous()


def chunk_images(trg: torch.Tensor, c0: int, c: int) -> torch.Tensor:
    """The images of the chunk of columns [c0, c0 + c), (c / L, L, D), features contiguous:
    a view of trg, or a copy of just those images."""
    l = trg.shape[1]
    return features_contiguous(trg[c0 // l:(c0 + c) // l])


def chunk_scores(src, images: torch.Tensor) -> torch.Tensor:
    """Unscaled float32 dot products of every source with the chunk's columns, (N, c)."""
    return mm_f32(src, images.reshape(-1, images.shape[2]).t())  # images: chunk_images()
