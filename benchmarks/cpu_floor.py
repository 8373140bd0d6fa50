"""The CPU backend against the floor of a fused forward+backward: three matrix products of the
problem's shapes (the scores, d src, d trg, into outputs allocated once; and again with the
gradients in fresh tensors, as a backward returns them, whose first touch is part of any
implementation's time where they pass the allocator's mmap threshold), timed side by side
in one process with the eager reference, quiet and with a second PyTorch process computing on
the same cores; and each one's workspace against eager's workspace and whole peak. cpp runs
with each schedule: "cpp" is its default (auto, which takes the three-product schedule for
these calls), "cpp 4-product" the other.

    python -m benchmarks.cpu_floor                 # the three sizes of the CPU floor target
    python -m benchmarks.cpu_floor --sizes 256,256,49,256 --rounds 15

Times are medians over rounds in which every implementation runs once, in turn, so that the
machine's drift falls on all of them alike. Everything is float32 with torch's default
thread count. Ratios: each time over the three products'; contended over quiet; cpp over eager.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from amdim_kernels import available_backends, nce_loss, settings

from . import arguments
from .measure import peak_extra_bytes
from .run import versions

SIZES = ((256, 256, 49, 256), (200, 200, 49, 1024), (512, 512, 49, 128))
FLOORS = ("3 products", "fresh gradients")
# A second PyTorch process that computes on every core until it is stopped.
LOAD = "import torch\na = torch.randn(768, 768)\nwhile True:\n    a = (a @ a).clamp_(-1, 1)\n"


def _size(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected N,M,L,D as four positive integers, got {text!r}")
    return tuple(int(p) for p in parts)


def implementations(n: int, m: int, l: int, d: int) -> dict:
    """name -> a callable running one forward+backward (or the three products)."""
    gen = torch.Generator().manual_seed(0)
    src = (3 * torch.randn(n, d, generator=gen)).requires_grad_()
    trg = torch.randn(m, l, d, generator=gen).requires_grad_()
    scores_t = torch.randn(m * l, d, generator=gen)
    g = torch.randn(n, m * l, generator=gen)
    src_plain = src.detach()
    pos_idx = None if n == m else torch.arange(n) % m  # source i's own image: i mod M

    # the products write into outputs allocated once: a fresh N x M*L output (51 MB at
    # (512, 512, 49, 128)) is new pages each call, whose first touch cost up to 20 ms here
    # and varied from call to call, which is no part of the products' work
    outs = torch.empty(n, m * l), torch.empty(n, d), torch.empty(m * l, d)

    # fresh: the gradients in fresh tensors, as every backward returns them: where one passes
    # the allocator's mmap threshold (32 MiB with glibc; d trg at (200, 200, 49, 1024) is
    # 38 MiB), its first touch is new pages on every call, in any implementation
    def three_products(fresh: bool):
        def run():
            torch.mm(src_plain, scores_t.t(), out=outs[0])  # the scores (N x M*L)
            torch.mm(g, scores_t, out=None if fresh else outs[1])  # d src (N x D)
            torch.mm(g.t(), src_plain, out=None if fresh else outs[2])  # d trg (M*L x D)
        return run

    def loss(backend, schedule="auto"):
        def run():
            with settings(schedule=schedule):
                lo, reg = nce_loss(src, trg, pos_idx, backend=backend)
            torch.autograd.grad(lo + reg, (src, trg))
        return run

    impls = {"3 products": three_products(False), "fresh gradients": three_products(True), "eager": loss("reference")}
    if "cpp" in available_backends("cpu"):
        impls["cpp"] = loss("cpp")
        impls["cpp 4-product"] = loss("cpp", "four-product")
    return impls


def interleaved_medians(impls: dict, rounds: int) -> dict:
    for fn in impls.values():  # warm-up
        fn()
    times = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    ap = arguments.Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=_size, nargs="+", default=list(SIZES), help="N,M,L,D problems")
    ap.add_argument("--rounds", type=arguments.integer(1), default=11,
                    help="rounds per measurement (each impl once a round)")
    ap.add_argument("--no-contention", action="store_true", help="skip the run beside a second process")
    args = ap.parse_args(argv)
    device, torch_version, _ = versions("cpu")
    print(f"CPU floor, float32, {torch.get_num_threads()} threads, {device}, torch {torch_version}")
    rows = []
    for n, m, l, d in args.sizes:
        impls = implementations(n, m, l, d)
        quiet = interleaved_medians(impls, args.rounds)
        memory = {name: peak_extra_bytes(fn, "cpu") for name, fn in impls.items() if name not in FLOORS}
        contended = None
        if not args.no_contention:
            load = subprocess.Popen([sys.executable, "-c", LOAD])
            try:
                time.sleep(2.0)  # the load's torch import and first products
                # the floors' times beside the load are not reported
                contended = interleaved_medians({k: fn for k, fn in impls.items() if k not in FLOORS}, args.rounds)
            finally:
                load.kill()
                load.wait()
        rows.append(((n, m, l, d), quiet, contended, memory))

    floor, fresh = FLOORS
    fused = [name for name in rows[0][1] if name.startswith("cpp")]
    print("\nx floor: over the 3 products; x fresh: over the 3 products with fresh gradient tensors")
    print("| N, M, L, D | 3 products ms | fresh gradients ms | eager ms (x floor) | "
          + " | ".join(f"{name} ms (x floor, x fresh) | {name} / eager" for name in fused) + " |")
    print("|---|---|---|---|" + "---|---|" * len(fused))
    for size, quiet, _, _ in rows:
        print(f"| {', '.join(map(str, size))} | {quiet[floor]:.1f} | {quiet[fresh]:.1f} | {quiet['eager']:.1f} "
              f"({quiet['eager'] / quiet[floor]:.2f}x) | "
              + " | ".join(f"{quiet[name]:.1f} ({quiet[name] / quiet[floor]:.2f}x, {quiet[name] / quiet[fresh]:.2f}x)"
                           f" | {quiet[name] / quiet['eager']:.2f}" for name in fused) + " |")
    if not args.no_contention:
        print("\nWith a second PyTorch process computing on the same cores (slowdown: busy / quiet):")
        print("| N, M, L, D | eager ms (slowdown) | "
              + " | ".join(f"{name} ms (slowdown) | {name} / eager | slowdown / eager's" for name in fused) + " |")
        print("|---|---|" + "---|---|---|" * len(fused))
        for size, quiet, busy, _ in rows:
            se = busy["eager"] / quiet["eager"]
            cells = []
            for name in fused:
                sc = busy[name] / quiet[name]
                cells.append(f"{busy[name]:.1f} ({sc:.2f}x) | {busy[name] / busy['eager']:.2f} | {sc / se:.2f}")
            print(f"| {', '.join(map(str, size))} | {busy['eager']:.1f} ({se:.2f}x) | " + " | ".join(cells) + " |")
    print("\nWorkspace: peak memory of the call's tensors less the gradients it returns; against eager's"
          " workspace and against eager's whole peak (its gradients included)")
    print("| N, M, L, D | eager workspace MiB | eager peak MiB | "
          + " | ".join(f"{name} MiB | / eager's workspace | / eager's peak" for name in fused) + " |")
    print("|---|---|---|" + "---|---|---|" * len(fused))
    for size, _, _, memory in rows:
        n, m, l, d = size
        grads = 4 * (n * d + m * l * d)  # the gradients the call returns are not workspace
        eager, eager_peak = (memory["eager"] - grads) / 2**20, memory["eager"] / 2**20
        cells = []
        for name in fused:
            mib = (memory[name] - grads) / 2**20
            cells.append(f"{mib:.1f} | {mib / eager:.1%} | {mib / eager_peak:.1%}")
        print(f"| {', '.join(map(str, size))} | {eager:.1f} | {eager_peak:.1f} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
