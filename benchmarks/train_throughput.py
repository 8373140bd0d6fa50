"""AMDIM training throughput with each nce_loss backend: issue 6's end-to-end figure.

    python -m benchmarks.train_throughput                  # the trainer's default model for this device
    python -m benchmarks.train_throughput --preset official --amp --backends reference triton cuda cuda:mma

Times amdim.train.Run.train_step itself (both views through the encoder, the six NCE calls,
the online probes, Adam; it reads the losses back, as the trainer does) on one fixed batch
of generated 32 px images, so data loading is left out. Every backend starts from the same
weights. Per backend: the median step time and images/s (2 views x batch, as the trainer
counts them); the loss's own time, from multiscale_nce forward+backward alone on the
encoder's detached features; the first step's loss, which must agree across backends; and
the step's peak extra memory (CUDA allocator on a GPU, resident set on the CPU).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform

import torch

from amdim import train
from amdim.objective import multiscale_nce
from amdim_kernels import available_backends

from .measure import median_ms, peak_extra_bytes
from .run import impl_context


def make_run(backend: str, args: argparse.Namespace) -> train.Run:
    argv = ["--dataset", "synthetic", "--backend", backend, "--workers", "0", "--device", args.device,
            "--seed", "0", "--out", "/nonexistent"]  # nothing is written
    if args.preset:
        argv += ["--preset", args.preset]
    if args.batch_size:
        argv += ["--batch-size", str(args.batch_size)]
    if args.amp:
        argv.append("--amp")
    return train.Run(train.parse_args(argv))


def loss_only(run: train.Run, views) -> callable:
    """multiscale_nce forward+backward on the features of this batch, detached from the encoder."""
    x = torch.cat(views).to(run.device)
    with torch.no_grad(), torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.args.amp):
        feats = [f.detach() for f in run.net(x)]
    b = views[0].shape[0]

    def step():
        leaves = [f.clone().requires_grad_() for f in feats]
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.args.amp):
            view1, view2 = tuple(f[:b] for f in leaves), tuple(f[b:] for f in leaves)
            total = multiscale_nce(view1, view2, tclip=run.args.tclip or None, backend=run.args.backend).total
        total.backward()

    return step


def measure(impl: str, args: argparse.Namespace) -> dict:
    """One row; impl is a backend name, or cuda:cublas / cuda:mma (the CUDA backend's score kernels)."""
    with impl_context(impl):
        return dict(_measure(impl.split(":")[0], args), backend=impl)


def _measure(backend: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    run = make_run(backend, args)
    (v1, v2), labels = next(iter(run.train_loader(0)))
    first_loss = run.train_step((v1, v2), labels)["total"]  # also the warm-up of every kernel
    step = lambda: run.train_step((v1, v2), labels)  # noqa: E731
    step_ms = median_ms(step, args.device, reps=args.reps, warmup=2)
    loss_ms = median_ms(loss_only(run, (v1, v2)), args.device, reps=args.reps, warmup=2)
    peak = peak_extra_bytes(step, args.device)
    images = 2 * labels.shape[0]
    return dict(backend=backend, batch=labels.shape[0], step_ms=step_ms, images_per_s=1e3 * images / step_ms,
                loss_ms=loss_ms, loss_share=loss_ms / step_ms, first_loss=first_loss, peak_mib=peak / 2**20,
                model=f"ndf {run.args.ndf}, n_rkhs {run.args.n_rkhs}, depth {run.args.n_depth}",
                amp=args.amp, device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
                or "CPU", torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=sorted(train.PRESETS), default=None,
                    help="model size (default: the trainer's for the device)")
    ap.add_argument("--batch-size", type=int, default=None, help="images per step (default: the preset's)")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast, as the trainer's --amp")
    ap.add_argument("--backends", nargs="+", default=None, help="default: reference and every fused backend here")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per backend (default 20 GPU, 5 CPU)")
    ap.add_argument("--out", default=None, help="CSV file to write")
    args = ap.parse_args(argv)
    args.reps = args.reps or (20 if args.device == "cuda" else 5)
    # Triton on the CPU runs in its interpreter: correct, far too slow to time a model with
    backends = args.backends or [b for b in available_backends(args.device)
                                 if not (b == "triton" and args.device == "cpu")]
    rows = []
    print("| backend | batch | step ms | images/s | loss fwd+bwd ms | loss share | speed-up | first loss | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b in backends:
        r = measure(b, args)
        rows.append(r)
        base = rows[0]["step_ms"] if rows[0]["backend"] == "reference" else None
        speedup = f"{base / r['step_ms']:.2f}x" if base else "-"
        print(f"| {b} | {r['batch']} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} | {r['loss_ms']:.1f} | "
              f"{100 * r['loss_share']:.0f}% | {speedup} | {r['first_loss']:.4f} | {r['peak_mib']:.0f} |", flush=True)
    print(f"model: {rows[0]['model']}, amp {args.amp}, device {rows[0]['device']}, torch {torch.__version__}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
