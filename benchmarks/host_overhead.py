"""Where the host time of one Triton fwd+bwd goes, and what the backward's chunk count and
the pos_idx range check (one device sync) cost on the GPU.

    python -m benchmarks.host_overhead
"""
from __future__ import annotations

import cProfile
import pstats

import torch
from triton.testing import do_bench

from amdim_kernels import nce_loss
from amdim_kernels.triton_nce import launch

from . import problems


def fwd_bwd(src, trg, pos_idx):
    loss, reg = nce_loss(src, trg, pos_idx, backend="triton")
    return torch.autograd.grad(loss + reg, (src, trg))


def main():
    p = problems.CIFAR
    src, trg, _ = p.inputs(torch.bfloat16, "cuda")
    src.requires_grad_()
    trg.requires_grad_()
    for _ in range(3):
        fwd_bwd(src, trg, None)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        fwd_bwd(src, trg, None)
    torch.cuda.synchronize()
    prof.disable()
    print(f"host profile, 50 x fwd+bwd, {p.name}, bf16, pos_idx=None")
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)

    print("| problem | chunk parts | pos_idx | fwd+bwd ms |")
    print("|---|---|---|---|")
    for p in (problems.SINGLE_GPU, problems.ONE_GPU_SHARE, problems.CIFAR):
        src, trg, pos_idx = p.inputs(torch.bfloat16, "cuda")
        src.requires_grad_()
        trg.requires_grad_()
        for parts in (8, 12, 16):
            for given in (False, True):
                if not given and p.n != p.m:
                    continue
                idx = pos_idx if given else None
                with launch.pinned(chunks=parts):
                    ms = do_bench(lambda: fwd_bwd(src, trg, idx), warmup=50, rep=300, return_mode="median")
                print(f"| {p.name} | {parts} | {'given (1 sync)' if given else 'None'} | {ms:.3f} |", flush=True)


if __name__ == "__main__":
    main()
