"""The main job for now: the loss on realistic AMDIM problems with every available backend.

    python -m benchmarks.demo            # sizes that fit this device
    python -m benchmarks.demo --dtype bfloat16

Prints each backend's loss and regulariser (they must agree), forward+backward time and
the peak memory the call allocates beyond its inputs.
"""
from __future__ import annotations

import argparse

import torch

from amdim_kernels import available_backends, nce_loss

from . import arguments, problems
from .measure import median_ms, peak_extra_bytes


def fwd_bwd(src, trg, pos_idx, backend):
    src = src.detach().requires_grad_()
    trg = trg.detach().requires_grad_()
    loss, reg = nce_loss(src, trg, pos_idx, backend=backend)
    (loss + reg).backward()
    return loss.detach(), reg.detach()


def main(argv=None):
    parser = arguments.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: bfloat16 on a GPU, float32 on the CPU")
    args = parser.parse_args(argv)
    device = args.device
    arguments.check_device(parser, device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    sizes = [problems.CIFAR] if device == "cpu" else [
        problems.CIFAR, problems.IMAGENET_4GPU, problems.ONE_GPU_SHARE, problems.SINGLE_GPU]
    backends = available_backends(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"nce_loss forward+backward on {name}, {dtype}, torch {torch.__version__}; backends: {backends}")
    header = f"| {'problem':<48} | {'backend':<9} | {'loss':>9} | {'reg':>9} | {'ms':>8} | {'peak extra MiB':>14} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for p in sizes:
        src, trg, pos_idx = p.inputs(dtype, device)
        for b in backends:
            loss, reg = fwd_bwd(src, trg, pos_idx, b)
            mib = peak_extra_bytes(lambda: fwd_bwd(src, trg, pos_idx, b), device) / 2**20
            ms = median_ms(lambda: fwd_bwd(src, trg, pos_idx, b), device, reps=5 if device == "cpu" else 20)
            print(f"| {p.name:<48} | {b:<9} | {loss.item():9.5f} | {reg.item():9.5f} | {ms:8.2f} | {mib:14.1f} |")


if __name__ == "__main__":
    main()
