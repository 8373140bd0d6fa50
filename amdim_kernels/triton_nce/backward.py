"""The Triton backend's backward: the per-row stage (grad_rows.py), then per chunk of whole
images the G kernel (grad_tiles.py) and G's two products on cuBLAS with float32
accumulation, d src += G @ trg_chunk and d trg_chunk = G^T @ src (on the tensor cores for
16-bit inputs). Deterministic: no atomics, d src summed over the chunks in order."""
from __future__ import annotations

import torch

from .config import CallOptions
from .grad_rows import gradient_factors, gradient_scale
from .grad_tiles import gradient_chunks
from .operands import addmm_f32_


def src_sum_in_tail(dtrg: torch.Tensor, n: int, d: int) -> torch.Tensor | None:
    """A float32 (N, D) view of the last 4*N*D bytes of d trg's buffer, for d src's sum over
    the chunks, or None where d trg is smaller or that tail is not 16-byte aligned. The
    chunks write d trg image by image in order, so those bytes are free until the last chunk
    (or an earlier one that reaches them) writes its d trg: until then the sum costs no
    memory of its own (8 MiB, 40% of the backward's workspace at N = 1024, D = 2048)."""
    flat = dtrg.view(-1).view(torch.uint8)
    nbytes = 4 * n * d
    if flat.numel() < nbytes or flat[flat.numel() - nbytes:].data_ptr() % 16:
        return None
    return flat[flat.numel() - nbytes:].view(torch.float32).view(n, d)


def backward(src: torch.Tensor, trg: torch.Tensor, pos_idx: torch.Tensor, pos: torch.Tensor, neg_lse: torch.Tensor,
             sq: torch.Tensor, grad_loss: torch.Tensor, loss_weight: float, grad_sq: torch.Tensor, sq_weight: float,
             tclip: float | None, scale: float, options: CallOptions, need_src: bool,
             need_trg: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """d src and d trg of loss_weight * sum(grad_loss * loss) + sq_weight * sum(grad_sq * sq):
    the per-row factors, float16's scale, then per chunk of columns G and its two products.

    G has the inputs' dtype, so both products run on the tensor cores. bfloat16 has
    float32's range; float16 would flush G's small entries (about 1/(N * M*L) of the
    upstream gradient) and could overflow under a loss scaler's large one, so float16 G is
    stored times a power of two found on the device (grad_rows.gradient_scale), and d src's
    float32 sum and d trg are multiplied back, exactly, by its inverse."""
    n, l = pos.shape
    m, _, d = trg.shape
    g_pos, r, reg_coef = gradient_factors(pos, neg_lse, grad_loss, loss_weight, grad_sq, sq_weight, tclip, scale)
    g_scale = None
    if src.dtype == torch.float16:
        g_scale = gradient_scale(src, g_pos, r, reg_coef, sq, scale, need_trg)
    dtrg = torch.empty(m, l, d, device=trg.device, dtype=trg.dtype) if need_trg else trg.new_empty(0, l, d)
    # d src: a float32 sum over the chunks, kept in d trg's unwritten tail where it fits
    acc = src_sum_in_tail(dtrg, n, d) if need_src else None
    in_tail = acc is not None
    if need_src and acc is None:
        acc = torch.empty(n, d, device=src.device, dtype=torch.float32)
    tail_begin = dtrg.numel() * dtrg.element_size() - 4 * n * d  # the tail's first byte
    dsrc = None

    def src_grad(acc: torch.Tensor, copy: bool) -> torch.Tensor:
        """d src from its float32 sum: float16's times 2^-k, rounded once, in one launch."""
        if g_scale is None:
            return acc.to(src.dtype, copy=copy)
        return torch.mul(acc, g_scale[1], out=torch.empty(n, d, device=src.device, dtype=src.dtype))

    for m0, m1, g, features in gradient_chunks(
        src, trg, pos_idx, neg_lse, r, g_pos, reg_coef, tclip, scale, options, g_scale
    ):
        if need_src:
            addmm_f32_(acc, g, features, beta=0.0 if m0 == 0 else 1.0)
        if need_trg:
            if in_tail and m1 * l * d * dtrg.element_size() > tail_begin:
                # this chunk's d trg overwrites the sum: after the last chunk's product
                # the sum is d src; after an earlier one it moves to memory of its own
                if m1 == m:
                    dsrc = src_grad(acc, copy=True)
                else:
                    acc = acc.clone()
                in_tail = False
            torch.mm(g.t(), src, out=dtrg[m0:m1].view(-1, d))  # cuBLAS accumulates in float32
    if need_src and dsrc is None:  # the sum has memory of its own here
        dsrc = src_grad(acc, copy=False)
    if need_trg and g_scale is not None:
        dtrg.mul_(g_scale[1])  # by a power of two: exact, unless the result is subnormal
    return (dsrc if need_src else src.new_empty(0, d)), dtrg
