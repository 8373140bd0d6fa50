"""The libraries a user would otherwise pick, on the case they cover: InfoNCE.

With L = 1, no clipping and no regulariser, nce_loss is a cross entropy over the M target
images of the scaled scores: loss_i = logsumexp_j(scale * src_i . trg_j) - scale * src_i .
trg_pos(i), the "linear cross entropy" of src against trg used as a classifier's weight.
Fused linear-cross-entropy kernels for large vocabularies compute exactly that without the
N x M logits, so they are the alternatives to time against:

    cce          Cut Cross-Entropy (pip install cut-cross-entropy), Apple, Triton
    liger        Liger-Kernel's fused linear cross entropy (pip install liger-kernel), Triton
    torch_lce    torch.nn.functional.linear_cross_entropy with chunking (torch >= 2.13)
    infcl        Inf-CL's flash loss (pip install inf-cl), Triton, CUDA only

Each adapter takes nce_loss's arguments (trg is (M, 1, D)) and returns (loss, reg) with
reg = 0, so the benchmarks and tests call it as they call a backend. The scale is folded
into src (an N x D multiply), as a user of these libraries would.
"""
from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from amdim_kernels import environment


def covers(n_locations: int, tclip: float | None, reg_weight: float) -> bool:
    """True when nce_loss with these options is the plain InfoNCE the peers compute."""
    return n_locations == 1 and tclip is None and reg_weight == 0.0


def _cce(src, trg, pos_idx, reduction):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(src, trg, pos_idx, reduction=reduction)


def _liger(src, trg, pos_idx, reduction):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(src, trg, pos_idx, reduction=reduction)


def _torch_lce(src, trg, pos_idx, reduction):
    # options selects the chunked path that never holds the N x M logits (options=None is
    # plain linear + cross_entropy, i.e. the eager reference)
    return F.linear_cross_entropy(src, trg, pos_idx, reduction=reduction, options=torch.nn.LinearCrossEntropyOptions())


def _infcl(src, trg, pos_idx, reduction):
    from inf_cl import cal_flash_loss

    # Inf-CL splits D into heads of head_dim features (256 by default) and sums their dot
    # products; one head of D features when D is not a multiple of 256.
    d = src.shape[1]
    per_row = cal_flash_loss(src, trg, pos_idx, head_dim=256 if d % 256 == 0 else d)
    return per_row.mean() if reduction == "mean" else per_row


def _module(name: str) -> Callable[[], bool]:
    return lambda: importlib.util.find_spec(name) is not None


@dataclass(frozen=True)
class Peer:
    name: str
    installed: Callable[[], bool]
    cpu: Callable[[], bool]  # whether it runs on CPU tensors in this process
    loss: Callable  # (scaled src (N, D), trg (M, D), pos_idx (N,), reduction) -> loss

    def runs_on(self, device: str) -> bool:
        if not self.installed():
            return False
        if device == "cuda":
            return torch.cuda.is_available()
        return self.cpu()


PEERS = {p.name: p for p in (
    # under TRITON_INTERPRET=1 Liger's kernels run on CPU tensors; Cut Cross-Entropy's do not
    # (the interpreter rejects one of its kernels) and Inf-CL asserts CUDA tensors.
    Peer("cce", _module("cut_cross_entropy"), lambda: False, _cce),
    Peer("liger", _module("liger_kernel"), lambda: environment.TRITON_INTERPRET, _liger),
    Peer("torch_lce", lambda: hasattr(torch.nn, "LinearCrossEntropyOptions"), lambda: True, _torch_lce),
    Peer("infcl", _module("inf_cl"), lambda: False, _infcl),
)}


def available_peers(device: str) -> list[str]:
    """The peers that are installed and run on `device` ("cuda" or "cpu") here."""
    return [name for name, p in PEERS.items() if p.runs_on(device)]


def peer_loss(name: str):
    """nce_loss's signature for peer `name`; only the InfoNCE case (see `covers`)."""
    peer = PEERS[name]

    def loss(src, trg, pos_idx=None, *, tclip=None, reg_weight=0.0, scale=None, reduction="mean"):
        n, d = src.shape
        if not covers(trg.shape[1], tclip, reg_weight):
            raise ValueError(f"{name} computes InfoNCE only: needs L == 1, tclip None, reg_weight 0; got "
                             f"L={trg.shape[1]}, tclip={tclip}, reg_weight={reg_weight}")
        if pos_idx is None:
            pos_idx = torch.arange(n, device=src.device)
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        out = peer.loss(src * scale, trg[:, 0], pos_idx, reduction)
        # the peers return their loss in the input dtype; nce_loss returns float32, (N, L) per positive
        out = out.float() if reduction == "mean" else out.float().reshape(n, 1)
        return out, src.new_zeros((), dtype=torch.float32)

    return loss
