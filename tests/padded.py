"""Problems as large as wanted whose float64 truth costs only a small part of them.

The first `zero_images` target images are all zeros and the last ones are random, and every
positive lies among the random ones. A zero image's columns then all score a = 0: each is a
negative of every row, clips to 0, adds nothing to the regulariser, and has the same
gradient. spec_loss_f64_zero_padded states docs/loss.md#definition on such a problem with the k
zero columns folded into one column whose logit counts k times (+ log k), so its truth
takes O(N * tail * L * D) work and memory however many zero images there are. The backends
get the whole problem, which can be made larger than 2^31 elements to test their int64
offsets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from truth import Case, rel_err, upstream_weight


@dataclass
class PaddedCase:
    case: Case  # the whole problem: trg (zero_images + tail, L, D)
    zero_images: int

    @property
    def tail(self) -> torch.Tensor:
        return self.case.trg[self.zero_images:]


def make_zero_padded_case(n: int, zero_images: int, tail_images: int, l: int, d: int, *, dtype=torch.float32,
                          device="cpu", spread=3.0, trg_layout="contiguous", **options) -> PaddedCase:
    """Fresh random sources and tail images; positives drawn among the tail (repeats allowed)."""
    m = zero_images + tail_images
    src = (spread * torch.randn(n, d, device=device)).to(dtype)
    if trg_layout == "contiguous":
        trg = torch.zeros(m, l, d, device=device, dtype=dtype)
    else:  # the trainer's feature maps (M, D, H*W) seen as (M, L, D)
        trg = torch.zeros(m, d, l, device=device, dtype=dtype).transpose(1, 2)
    trg[zero_images:] = torch.randn(tail_images, l, d, device=device).to(dtype)
    pos_idx = torch.randint(zero_images, m, (n,), device=device)
    return PaddedCase(Case(src, trg, pos_idx, **options), zero_images)


def spec_loss_f64_zero_padded(src, tail, zero, pos_idx, zero_images, tclip, reg_weight, scale, reduction):
    """spec_loss_f64 on trg = (zero_images zero images, then tail), pos_idx counted from the
    tail's first image; `zero` (D,) stands for every zero column, so the gradient it gets is
    the sum of theirs."""
    n, d = src.shape
    m_tail, l, _ = tail.shape
    k = zero_images * l  # zero columns, all negatives of every row
    if scale is None:
        scale = 1.0 / math.sqrt(d)

    def clip(a):
        return a if tclip is None else tclip * torch.tanh(a / tclip)

    rows, sq_total = [], 0.0
    for i in range(n):
        a = scale * (tail @ src[i])  # (M_tail, L)
        a_zero = scale * (zero @ src[i])  # 0, the score of each zero column
        sq_total = sq_total + (a * a).sum() + k * a_zero * a_zero
        s, p = clip(a), int(pos_idx[i])
        negatives = torch.cat([s[:p].reshape(-1), s[p + 1:].reshape(-1), (clip(a_zero) + math.log(k)).reshape(1)])
        row = []
        for loc in range(l):
            logits = torch.cat([s[p, loc].reshape(1), negatives])
            row.append(torch.logsumexp(logits, 0) - logits[0])
        rows.append(torch.stack(row))
    per_positive = torch.stack(rows)
    reg = reg_weight * sq_total / (n * (zero_images + m_tail) * l)
    return (per_positive.mean() if reduction == "mean" else per_positive), reg


def zero_padded_truth(pc: PaddedCase):
    """float64 (loss, reg, d src, d tail, d of one zero column (D,)) of loss * weight + 3 reg."""
    c = pc.case
    src = c.src.double().cpu().requires_grad_()
    tail = pc.tail.double().cpu().requires_grad_()
    zero = torch.zeros(src.shape[1], dtype=torch.float64, requires_grad=True)
    pos_idx = (c.pos_idx - pc.zero_images).cpu()
    loss, reg = spec_loss_f64_zero_padded(src, tail, zero, pos_idx, pc.zero_images, c.tclip, c.reg_weight, c.scale,
                                          c.reduction)
    d_src, d_tail, d_zero = torch.autograd.grad((loss * upstream_weight(loss.shape).double()).sum() + 3.0 * reg,
                                                (src, tail, zero))
    return loss.detach(), reg.detach(), d_src, d_tail, d_zero / (pc.zero_images * tail.shape[1])


def max_deviation(x: torch.Tensor, value: torch.Tensor, block_elements: int = 1 << 24) -> float:
    """max |x[m, l] - value| over the images of x (M, L, D), about block_elements at a time so
    that no temporary of x's size is made, read back once."""
    value = value.to(x.device, torch.float32)
    step = max(1, block_elements // (x.shape[1] * x.shape[2]))
    maxima = [(x[m:m + step].float() - value).abs().amax() for m in range(0, x.shape[0], step)]
    return torch.stack(maxima).max().item() if maxima else 0.0


def assert_zero_padded_matches_truth(pc: PaddedCase, backend: str, tol: float, loss_tol: float = 1e-5,
                                     loss_fn=None):
    """nce_loss with `backend` on the whole problem against zero_padded_truth: loss and reg to
    loss_tol, d src and the tail's d trg to `tol` (relative, as rel_err), and every zero
    column's d trg to `tol` of that column's largest entry. A misplaced read or write
    anywhere in trg or d trg fails the last two. `loss_fn` (called as nce_loss is) stands in
    for nce_loss where given."""
    from amdim_kernels import nce_loss

    c = pc.case
    src, trg = c.src.detach().requires_grad_(), c.trg.detach().requires_grad_()
    loss, reg = (loss_fn or nce_loss)(src, trg, c.pos_idx, backend=backend, **c.kwargs())
    weight = upstream_weight(loss.shape).to(loss.device, loss.dtype)
    d_src, d_trg = torch.autograd.grad((loss * weight).sum() + 3.0 * reg, (src, trg))
    want = zero_padded_truth(pc)
    for name, got, t, limit in (("loss", loss, want[0], loss_tol), ("reg", reg, want[1], loss_tol),
                                ("d src", d_src, want[2], tol), ("d trg of the tail", d_trg[pc.zero_images:], want[3],
                                                                 tol)):
        assert torch.isfinite(got).all(), f"{backend}: {name} not finite"
        err = rel_err(got, t)
        assert err <= limit, f"{backend}: {name} error {err:.3g} > {limit:.3g}"
    zero_col = want[4]
    dev = max_deviation(d_trg[:pc.zero_images], zero_col)
    assert dev <= tol * zero_col.abs().max().item(), \
        f"{backend}: d trg of the zero images deviates by {dev:.3g}, their entries reach {zero_col.abs().max():.3g}"
