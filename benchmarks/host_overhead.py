"""Where the host time of one Triton fwd+bwd goes, what the backward's chunk count and
the pos_idx range check (one device sync) cost on the GPU, and how much CUDA graphs
(torch.compile(mode="reduce-overhead") around the cuda backend's fwd+bwd) take back.

    python -m benchmarks.host_overhead
"""
from __future__ import annotations

import cProfile
import pstats

import torch
from triton.testing import do_bench

from amdim_kernels import available_backends, nce_loss
from amdim_kernels.triton_nce import launch

from . import problems
from .run import impl_context


def fwd_bwd(src, trg, pos_idx):
    loss, reg = nce_loss(src, trg, pos_idx, backend="triton")
    return torch.autograd.grad(loss + reg, (src, trg))


def cuda_graphs() -> None:
    """fwd+bwd of backends "triton" and "cuda" (both score paths), eager vs replayed as CUDA
    graphs (torch.compile(mode="reduce-overhead")), on the small problems where launches
    dominate."""
    impls = ["triton"] + (["cuda:cublas", "cuda:mma"] if "cuda" in available_backends("cuda") else [])
    print("| problem | backend | eager fwd+bwd ms | reduce-overhead fwd+bwd ms |")
    print("|---|---|---|---|")
    for p in (problems.CIFAR, problems.ONE_GPU_SHARE):
        src, trg, pos_idx = p.inputs(torch.bfloat16, "cuda")
        pos_idx = pos_idx if p.n != p.m else None  # eager checks a given pos_idx with one sync
        src.requires_grad_()
        trg.requires_grad_()
        for impl in impls:

            def step(src, trg, pos_idx, backend=impl.split(":")[0]):
                loss, reg = nce_loss(src, trg, pos_idx, backend=backend)
                return torch.autograd.grad(loss + reg, (src, trg))

            with impl_context(impl):
                eager = do_bench(lambda: step(src, trg, pos_idx), warmup=50, rep=300, return_mode="median")
                graphed = torch.compile(step, mode="reduce-overhead")
                for _ in range(3):  # compile, capture: before timing
                    graphed(src, trg, pos_idx)
                replay = do_bench(lambda: graphed(src, trg, pos_idx), warmup=50, rep=300, return_mode="median")
            print(f"| {p.name} | {impl} | {eager:.3f} | {replay:.3f} |", flush=True)


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
    cuda_graphs()
