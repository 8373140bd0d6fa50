"""The loss problems AMDIM actually poses (docs/loss.md#problem-sizes), and their inputs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Problem:
    name: str
    n: int  # sources on this device
    m: int  # target images (the whole batch)
    l: int  # locations per image  # noqa: E741
    d: int  # feature size (n_rkhs)
    tclip: float | None = 20.0  # AMDIM's options; InfoNCE: tclip None, reg_weight 0, L = 1
    reg_weight: float = 0.05
    # "contiguous" (M, L, D), or "feature-map": what the trainer passes on one GPU, (M, D, H, W)
    # maps seen as (M, L, D) with stride L along D
    trg_layout: str = "contiguous"

    @property
    def options(self) -> dict:
        """nce_loss's keyword options for this problem (scale: the default 1/sqrt(D))."""
        return dict(tclip=self.tclip, reg_weight=self.reg_weight)

    @property
    def columns(self) -> int:
        return self.m * self.l

    def flops(self, backward: bool) -> float:
        """2*N*M*L*D for the forward; the backward recomputes the scores and makes two
        gradient products: 3x the forward."""
        return 2.0 * self.n * self.columns * self.d * (3 if backward else 1)

    def score_bytes(self) -> int:
        """Size of one float32 score matrix, the unit the eager reference keeps ~12 of."""
        return 4 * self.n * self.columns

    def inputs(self, dtype: torch.dtype, device: str, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        src = torch.randn(self.n, self.d, device=device, generator=gen).mul_(3.0).to(dtype)
        if self.trg_layout == "contiguous":
            trg = torch.randn(self.m, self.l, self.d, device=device, generator=gen).to(dtype)
        else:
            trg = torch.randn(self.m, self.d, self.l, device=device, generator=gen).to(dtype).transpose(1, 2)
        pos_idx = torch.arange(self.n, device=device) % self.m
        return src, trg, pos_idx


CIFAR = Problem("CIFAR default, 1->7 (B=200, D=1024)", 200, 200, 49, 1024)
IMAGENET_4GPU = Problem("ImageNet 4 GPUs, 1->7 (120 of B=480, D=1536)", 120, 480, 49, 1536)
SINGLE_GPU = Problem("single GPU, 1->7 (B=1024, D=2048)", 1024, 1024, 49, 2048)
ONE_GPU_SHARE = Problem("one GPU's share, 1->7 (128 of B=1024, D=2048)", 128, 1024, 49, 2048)
SINGLE_GPU_FEATURE_MAP = dataclasses.replace(SINGLE_GPU, name="single GPU, feature-map targets", trg_layout="feature-map")
CIFAR_FEATURE_MAP = dataclasses.replace(CIFAR, name="CIFAR default, feature-map targets", trg_layout="feature-map")
LARGE = Problem("large negatives (B=4096, D=2048)", 4096, 4096, 49, 2048)


def infonce(n: int, m: int, d: int) -> Problem:
    """The InfoNCE special case (one location, no clipping, no regulariser) that the peer
    libraries of benchmarks/peers.py also compute."""
    return Problem(f"InfoNCE N={n}, M={m}, D={d}", n, m, 1, d, tclip=None, reg_weight=0.0)
