"""Benchmark sweep: every backend of nce_loss, torch.compile of the reference, and the
cuBLAS matmul of the same shape (the physical floor; its forward+backward column is three
products of the problem's shapes, the scores, d src and d trg), over AMDIM's problem sizes;
on the InfoNCE presets also the peer libraries of benchmarks/peers.py that are installed.
Variants: 'triton:fused', 'triton:gemm', 'triton:3p', 'cpp:3p', 'cuda:cublas', 'cuda:mma', 'cuda:3p'
(impl_context).

    python -m benchmarks.run                          # preset for this device
    python -m benchmarks.run --preset targets --dtypes bfloat16 --compile
    python -m benchmarks.run --preset sweep --out benchmarks/results
    python -m benchmarks.run --preset infonce --compile   # + cce, liger, torch_lce, infcl

Each row: median times (triton.testing.do_bench on a GPU, warm-up excluded; wall clock on
the CPU) of the forward and of forward+backward, achieved TFLOP/s with the FLOP model
2*N*M*L*D forward and 3x that for the backward (recompute + two gradient products), the
ratio to one matmul of the forward's shape, forward+backward's ratio to the three products
(the matmul row's forward+backward), and the peak memory beyond the inputs
(workspace = peak - the gradients the call returns). Out of memory is a row saying OOM.
Writes a markdown table to stdout and CSV/JSON (device, versions, date per row) to --out,
then each implementation's forward+backward against the eager reference's, against
torch.compile of it (with --compile) and against the three products.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import platform
from dataclasses import asdict, dataclass

import torch

from amdim_kernels import available_backends, nce_loss, nce_loss_reference, settings

from . import arguments, peers, problems
from .measure import median_ms, peak_extra_bytes

PRESETS = {
    "cpu": [problems.Problem("CIFAR-like, D=256", 256, 256, 49, 256), problems.CIFAR],
    # the single-GPU size first: the GPU targets are stated at it
    "targets": [problems.SINGLE_GPU, problems.CIFAR, problems.IMAGENET_4GPU, problems.ONE_GPU_SHARE],
    "sweep": [problems.Problem(f"N=M={b}, L=49, D=2048", b, b, 49, 2048) for b in (32, 128, 512, 1024, 2048, 4096)]
    + [problems.Problem(f"N=128, M={b}, L=49, D=2048", 128, b, 49, 2048) for b in (1024, 4096, 8192, 16384)],
    # 10^3 to 10^6 negatives, 4096 sources (a large contrastive batch), D = 256
    "infonce": [problems.infonce(4096, m, 256) for m in (1024, 4096, 16384, 65536, 262144, 1048576)],
    "infonce-cpu": [problems.infonce(256, m, 256) for m in (1024, 4096, 16384)],
    # the trainer's own target layout on one GPU (stride L along D), against the contiguous one
    "feature-map": [problems.CIFAR, problems.CIFAR_FEATURE_MAP, problems.SINGLE_GPU, problems.SINGLE_GPU_FEATURE_MAP],
}


@dataclass
class Row:
    problem: str
    n: int
    m: int
    l: int  # noqa: E741
    d: int
    dtype: str
    impl: str
    fwd_ms: float | None
    fwd_bwd_ms: float | None
    fwd_tflops: float | None
    fwd_bwd_tflops: float | None
    fwd_over_matmul: float | None
    fwd_bwd_over_3mm: float | None  # forward+backward over the three products of its shapes
    peak_extra_mib: float | None
    workspace_mib: float | None
    status: str
    device: str
    torch: str
    triton: str
    date: str


def versions(device: str) -> tuple[str, str, str]:
    """(name of the device the rows ran on, torch version, triton version), for every result row."""
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "-"
    dev = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
    return dev, torch.__version__, tv


def _timer(device):
    if device == "cuda":
        try:
            from triton.testing import do_bench

            return lambda fn: do_bench(fn, warmup=50, rep=200, return_mode="median")
        except ImportError:
            pass
    return lambda fn: median_ms(fn, device, reps=5 if device == "cpu" else 50)


def loss_fn(impl: str, options: dict):
    """(src, trg, pos_idx) -> (loss, reg) for a backend name (or backend:variant, see
    impl_context), 'compiled', or a peer library."""
    if impl == "compiled":
        compiled = torch.compile(nce_loss_reference, dynamic=False)
        return lambda s, t, p: compiled(s, t, p, options["tclip"], options["reg_weight"], s.shape[1] ** -0.5, "mean")
    if impl in peers.PEERS:
        return lambda s, t, p, f=peers.peer_loss(impl): f(s, t, p, **options)
    return lambda s, t, p: nce_loss(s, t, p, backend=impl.split(":")[0], **options)


# The variants impl_context pins, per backend
VARIANTS = {"triton": ("fused", "gemm", "3p"), "cpp": ("3p",), "cuda": ("cublas", "mma", "3p"), "reference": ()}


def impl_error(impl: str) -> str | None:
    """Why --impls cannot take impl (None where it can)."""
    if impl == "compiled" or impl in peers.PEERS:
        return None
    backend, colon, variant = impl.partition(":")
    if backend not in VARIANTS:
        return (f"--impls: unknown implementation {impl!r}; expected a backend ({', '.join(VARIANTS)}), "
                f"backend:variant, compiled or a peer ({', '.join(peers.PEERS)})")
    if colon and variant not in VARIANTS[backend]:
        return f"--impls: backend {backend!r} has no variant {variant!r}; expected one of {VARIANTS[backend]}"
    return None


def impl_context(impl: str):
    """Where impl names a backend's variant, pin it while the block runs: 'triton:fused' /
    'triton:gemm' (the Triton score strategy), 'triton:3p' / 'cpp:3p' / 'cuda:3p' (the
    three-product schedule), 'cuda:cublas' / 'cuda:mma' (the CUDA backend's score kernels); each call's
    backward follows its forward."""
    backend, _, variant = impl.partition(":")
    if variant == "3p":
        return settings(schedule="three-product")
    if backend == "triton" and variant:
        return settings(triton_scores=variant)
    if backend == "cuda" and variant:
        return settings(cuda_scores=variant)
    return contextlib.nullcontext()


def bench_one(p: problems.Problem, dtype: torch.dtype, impl: str, device: str, timer) -> dict:
    src0, trg0, pos_idx = p.inputs(dtype, device)
    grads_bytes = (src0.numel() + trg0.numel()) * src0.element_size()
    if impl == "matmul":
        trg_flat = trg0.reshape(-1, p.d)  # the floor: one matmul of contiguous operands
        g = torch.randn(p.n, trg_flat.shape[0], device=device).to(dtype)

        def three_products():  # fwd+bwd's floor: the scores, d src and d trg
            src0 @ trg_flat.t()
            g @ trg_flat
            g.t() @ src0

        fwd_ms = timer(lambda: src0 @ trg_flat.t())
        return dict(fwd_ms=fwd_ms, fwd_bwd_ms=timer(three_products), peak=None, workspace=None)
    f = loss_fn(impl, p.options)
    src = src0.detach().requires_grad_()
    trg = trg0.detach().requires_grad_()

    def forward():
        with torch.no_grad():
            return f(src0, trg0, pos_idx)

    def forward_backward():
        loss, reg = f(src, trg, pos_idx)
        return torch.autograd.grad(loss + reg, (src, trg))

    forward_backward()  # compile / warm up before measuring memory
    peak = peak_extra_bytes(forward_backward, device)
    return dict(fwd_ms=timer(forward), fwd_bwd_ms=timer(forward_backward), peak=peak, workspace=peak - grads_bytes)


def run(problem_list, dtypes, impls, device, out_dir=None, suffix="") -> list[Row]:
    dev_name, torch_v, triton_v = versions(device)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    timer = _timer(device)
    rows: list[Row] = []
    for p in problem_list:
        for dtype in dtypes:
            matmul_ms = three_mm_ms = None
            for impl in ["matmul"] + impls:
                if impl in peers.PEERS and not peers.covers(p.l, p.tclip, p.reg_weight):
                    continue  # the peers compute InfoNCE only
                status, res = "ok", dict(fwd_ms=None, fwd_bwd_ms=None, peak=None, workspace=None)
                try:
                    with impl_context(impl):
                        res = bench_one(p, dtype, impl, device, timer)
                except torch.OutOfMemoryError:
                    status = "OOM"
                except Exception as e:  # a failing impl is a row, not a crash of the sweep
                    status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                finally:
                    if device == "cuda":
                        torch.cuda.empty_cache()
                if impl == "matmul":
                    matmul_ms, three_mm_ms = res["fwd_ms"], res["fwd_bwd_ms"]

                def tflops(ms, backward):
                    return None if ms is None else p.flops(backward) / ms / 1e9

                fwd, fb = res["fwd_ms"], res["fwd_bwd_ms"]
                rows.append(Row(
                    p.name, p.n, p.m, p.l, p.d, str(dtype).replace("torch.", ""), impl, fwd, fb,
                    tflops(fwd, False), None if fb is None else (p.flops(False) + p.flops(True)) / fb / 1e9,
                    None if fwd is None or not matmul_ms else fwd / matmul_ms,
                    None if fb is None or not three_mm_ms else fb / three_mm_ms,
                    None if res["peak"] is None else res["peak"] / 2**20,
                    None if res["workspace"] is None else res["workspace"] / 2**20,
                    status, dev_name, torch_v, triton_v, date,
                ))
                print(format_row(rows[-1]), flush=True)
                if out_dir:  # after every row, so that a run cut short keeps what it measured
                    write(rows, out_dir, suffix)
    return rows


COLUMNS = [("problem", 46), ("dtype", 8), ("impl", 12), ("fwd_ms", 8), ("fwd_bwd_ms", 10), ("fwd_tflops", 10),
           ("fwd_bwd_tflops", 14), ("fwd_over_matmul", 15),
           ("fwd_bwd_over_3mm", 16), ("peak_extra_mib", 14), ("workspace_mib", 13), ("status", 6)]


def _fmt(v, width):
    if v is None:
        return "-".rjust(width)
    if isinstance(v, float):
        return (f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}").rjust(width)
    return str(v).ljust(width)


def format_header() -> str:
    head = "| " + " | ".join(name.ljust(w) for name, w in COLUMNS) + " |"
    return head + "\n|" + "|".join("-" * (w + 2) for _, w in COLUMNS) + "|"


def format_row(r: Row) -> str:
    return "| " + " | ".join(_fmt(getattr(r, name), w) for name, w in COLUMNS) + " |"


def format_speedups(rows: list[Row]) -> str:
    """Each measured implementation's forward+backward against the eager reference's, against
    torch.compile of it and against the three products, per problem and dtype: the ratios
    the targets are stated in, side by side from one run ('-' where a row is missing)."""
    lines = ["| problem | dtype | impl | fwd+bwd ms | x eager | x compile | / 3 products |", "|---|---|---|---|---|---|---|"]
    by_key = {(r.problem, r.dtype, r.impl): r for r in rows}
    for r in rows:
        if r.fwd_bwd_ms is None or r.impl in ("matmul", "reference", "compiled"):
            continue

        def speedup(base):
            b = by_key.get((r.problem, r.dtype, base))
            return "-" if b is None or b.fwd_bwd_ms is None else f"{b.fwd_bwd_ms / r.fwd_bwd_ms:.2f}x"

        over = "-" if r.fwd_bwd_over_3mm is None else f"{r.fwd_bwd_over_3mm:.2f}x"
        lines.append(f"| {r.problem} | {r.dtype} | {r.impl} | {r.fwd_bwd_ms:.3f} | {speedup('reference')} | "
                     f"{speedup('compiled')} | {over} |")
    return "\n".join(lines)


def write(rows: list[Row], out_dir: str, suffix: str = "") -> None:
    os.makedirs(out_dir, exist_ok=True)
    tag = (rows[0].device.replace(" ", "_") if rows else "none") + (f"_{suffix}" if suffix else "")
    path = os.path.join(out_dir, f"results_{tag}")
    # each file written beside its place, then moved there: a run stopped mid-write leaves
    # the previous rows' file whole
    with open(path + ".csv.part", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    os.replace(path + ".csv.part", path + ".csv")
    with open(path + ".json.part", "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)
    os.replace(path + ".json.part", path + ".json")


def main(argv=None):
    ap = arguments.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--impls", nargs="+", default=None,
                    help="backends to time (default: all available); also compiled, backend:variant ("
                         + ", ".join(f"{b}:{v}" for b, vs in VARIANTS.items() for v in vs)
                         + ") and the peers " + ", ".join(peers.PEERS))
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the reference")
    ap.add_argument("--out", default=None, help="folder for the CSV and JSON files")
    ap.add_argument("--suffix", default="", help="added to the output files' names")
    args = ap.parse_args(argv)
    for impl in args.impls or ():
        if (why := impl_error(impl)) is not None:
            ap.error(why)
    device = args.device
    arguments.check_device(ap, device)
    if args.out is not None:
        arguments.check_folder(ap, "--out", args.out)
    preset = args.preset or ("targets" if device == "cuda" else "cpu")
    dtypes = [getattr(torch, d) for d in (args.dtypes or (["bfloat16"] if device == "cuda" else ["float32"]))]
    impls = args.impls or available_backends(device)
    if args.impls is None and preset.startswith("infonce"):
        impls = impls + peers.available_peers(device)
    if args.compile:
        impls = impls + ["compiled"]
    print(format_header())
    rows = run(PRESETS[preset], dtypes, impls, device, args.out, args.suffix)
    print("\nForward+backward against the eager reference, torch.compile of it and three products:")
    print(format_speedups(rows))


if __name__ == "__main__":
    main()
