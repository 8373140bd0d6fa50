"""AMDIM training throughput with each nce_loss backend: the end-to-end figure of the loss.

    python -m benchmarks.train_throughput                  # the trainer's default model for this device
    python -m benchmarks.train_throughput --preset official --amp --backends reference triton cuda cuda:mma

Times amdim.train.Run.train_step itself (both views through the encoder, the four NCE calls,
the online probes, Adam; the losses stay on the device, as the trainer leaves them between
log steps) on one fixed batch of generated 32 px images, so data loading is left out. Every
backend starts from the same weights. Per backend: the median step time and images/s (2
views x batch, as the trainer counts them); the loss's own time, from multiscale_nce
forward+backward alone on the encoder's detached features; the first step's loss, which
must agree across backends; and the step's peak extra memory (its tensors at their peak:
the CUDA allocator's count on a GPU, the profiler's on the CPU). The backends' runs live
side by side and are timed in interleaved rounds, in alternating order, so that warm-up
and order effects (10% on a shared CPU) fall on all of them alike.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics

import torch

from amdim import train
from amdim_kernels import available_backends
from amdim_kernels.registry import unavailable_reason

from . import arguments
from .measure import median_ms, peak_extra_bytes
from .run import VARIANTS, impl_context, versions


def make_run(backend: str, args: argparse.Namespace) -> train.Run:
    argv = ["--dataset", "synthetic", "--backend", backend, "--workers", "0", "--device", args.device,
            "--seed", "0", "--out", "/nonexistent"]  # nothing is written
    if args.preset:
        argv += ["--preset", args.preset]
    if args.batch_size is not None:
        argv += ["--batch-size", str(args.batch_size)]
    if args.amp:
        argv += ["--amp", "--amp-dtype", args.amp_dtype]
    if args.compile:
        argv.append("--compile")
    if args.compile_mode:
        argv += ["--compile-mode", args.compile_mode]
    if args.channels_last:
        argv.append("--channels-last")
    return train.Run(train.parse_args(argv))


def loss_only(run: train.Run, views) -> callable:
    """multiscale_nce forward+backward on the features of this batch, detached from the encoder."""
    x = torch.cat(views).to(run.device).contiguous(memory_format=run.memory_format)
    with torch.no_grad(), torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.args.amp):
        feats = [f.detach() for f in run.net(x)]
    b = views[0].shape[0]

    def step():
        leaves = [f.clone().requires_grad_() for f in feats]
        with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.args.amp):
            total = run.nce_losses(leaves, b).total
        total.backward()

    return step


class Contender:
    """One backend's training run on its fixed batch, and its timings so far."""

    def __init__(self, impl: str, args: argparse.Namespace):
        self.impl, self.args = impl, args
        with impl_context(impl):
            torch.manual_seed(0)  # the same weights and batch for every backend
            self.run = make_run(impl.split(":")[0], args)
            (v1, v2), self.labels = next(iter(self.run.train_loader(0)))
            self.views = (v1, v2)
            # also warms every kernel
            self.first_loss = train.read_metrics(self.run.train_step(self.views, self.labels))["total"]
            self.loss_step = loss_only(self.run, self.views)
        self.step_ms: list[float] = []
        self.loss_ms: list[float] = []

    def step(self):
        return self.run.train_step(self.views, self.labels)

    def time_round(self) -> None:
        with impl_context(self.impl):
            self.step_ms.append(median_ms(self.step, self.args.device, reps=self.args.reps, warmup=1))
            self.loss_ms.append(median_ms(self.loss_step, self.args.device, reps=self.args.reps, warmup=1))

    def row(self) -> dict:
        with impl_context(self.impl):
            peak = peak_extra_bytes(self.step, self.args.device)
        step_ms, loss_ms = statistics.median(self.step_ms), statistics.median(self.loss_ms)
        a = self.run.args
        return dict(backend=self.impl, batch=self.labels.shape[0], step_ms=step_ms,
                    images_per_s=1e3 * 2 * self.labels.shape[0] / step_ms, loss_ms=loss_ms,
                    loss_share=loss_ms / step_ms, first_loss=self.first_loss, peak_mib=peak / 2**20,
                    rounds=len(self.step_ms), model=f"ndf {a.ndf}, n_rkhs {a.n_rkhs}, depth {a.n_depth}",
                    amp=self.args.amp, amp_dtype=self.args.amp_dtype if self.args.amp else "",
                    compile=self.args.compile, compile_mode=self.args.compile_mode or "",
                    channels_last=a.channels_last, device=versions(self.args.device)[0],
                    torch=torch.__version__,
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def backends_problem(backends: list[str], device: str) -> str | None:
    """Why --backends cannot all run on --device (a valid one), or None: each "auto", a backend
    that runs there, or backend:variant (benchmarks.run's variants)."""
    for impl in backends:
        backend, colon, variant = impl.partition(":")
        if impl == "auto":
            continue
        if backend not in VARIANTS or (colon and variant not in VARIANTS[backend]):
            known = ["auto", *VARIANTS] + [f"{b}:{v}" for b, vs in VARIANTS.items() for v in vs]
            return f"--backends: {impl!r} is not a backend, expected some of {', '.join(known)}"
        if backend not in available_backends(device):
            return f"--backends: {backend} cannot run on --device {device}: " \
                   f"{unavailable_reason(backend, torch.device(device))}"
    return None


def main(argv=None):
    ap = arguments.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=sorted(train.PRESETS), default=None,
                    help="model size (default: the trainer's for the device)")
    ap.add_argument("--batch-size", type=arguments.integer(1), default=None, help="images per step (default: the preset's)")
    ap.add_argument("--amp", action="store_true", help="autocast to --amp-dtype, as the trainer's --amp")
    ap.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16"],
                    help="as the trainer's: float16 also scales the loss (a GradScaler, one sync a step)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward, as the trainer's --compile")
    ap.add_argument("--compile-mode", default=None, help="the trainer's --compile-mode (e.g. reduce-overhead)")
    ap.add_argument("--channels-last", action="store_true", help="the trainer's --channels-last")
    ap.add_argument("--backends", nargs="+", default=None, help="default: reference and every fused backend here")
    ap.add_argument("--reps", type=arguments.integer(1), default=None,
                    help="timed steps per backend and round (default 20 GPU, 5 CPU)")
    ap.add_argument("--rounds", type=arguments.integer(1), default=3,
                    help="rounds of timing, the backends interleaved in each (order effects cancel); medians over rounds")
    ap.add_argument("--out", default=None, help="CSV file to write")
    args = ap.parse_args(argv)
    arguments.check_device(ap, args.device)
    if args.backends and (why := backends_problem(args.backends, args.device)) is not None:
        ap.error(why)
    if args.reps is None:
        args.reps = 20 if torch.device(args.device).type == "cuda" else 5
    # Triton on the CPU runs in its interpreter: correct, far too slow to time a model with
    backends = args.backends or [b for b in available_backends(args.device)
                                 if not (b == "triton" and args.device == "cpu")]
    contenders = [Contender(b, args) for b in backends]
    for k in range(args.rounds):  # alternate the order: each backend runs first in some round
        for c in contenders[::-1] if k % 2 else contenders:
            c.time_round()
    rows = []
    print("| backend | batch | step ms | images/s | loss fwd+bwd ms | loss share | speed-up | first loss | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in contenders:
        r = c.row()
        rows.append(r)
        base = rows[0]["step_ms"] if rows[0]["backend"] == "reference" else None
        speedup = f"{base / r['step_ms']:.2f}x" if base else "-"
        print(f"| {r['backend']} | {r['batch']} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} | {r['loss_ms']:.1f} | "
              f"{100 * r['loss_share']:.0f}% | {speedup} | {r['first_loss']:.4f} | {r['peak_mib']:.0f} |", flush=True)
    print(f"model: {rows[0]['model']}, amp {args.amp_dtype if args.amp else 'off'}, compile {args.compile}, device {rows[0]['device']}, torch {torch.__version__}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
