"""Train AMDIM with the multiscale NCE objective of amdim_kernels.

    python -m amdim.train                              # Fashion-MNIST, sized for this machine
    python -m amdim.train --dataset cifar10 --data-root ~/data --preset official
    torchrun --nproc-per-node 4 -m amdim.train --dataset imagenet --data-root /data/in128 ...

Online linear and MLP classifiers on the detached r1 are trained alongside and tested after
every epoch. Metrics go to tqdm, TensorBoard (OUT/tb) and OUT/metrics.csv.

OUT/last.pt is written atomically at every epoch end and every --save-every steps, so a killed
run loses at most those steps. Ctrl-C (SIGINT) or SIGTERM lets the step in progress finish,
writes OUT/last.pt and exits with 128 + the signal's number (130 for Ctrl-C); a second Ctrl-C
stops at once (not under torchrun, which passes Ctrl-C on), leaving the checkpoint written last.

--resume OUT/last.pt continues the run exactly, from an epoch end or mid-epoch, with any
--workers: weights, optimiser, schedule, every RNG, epoch and step. Each image's augmentation
is drawn from its own seed (--seed, epoch, image index), so it does not depend on where a run
was resumed nor on which worker loads the image. A resumed run keeps the checkpoint's dataset,
model size, batch size, training subset, learning rate and process count. On the CPU the
resumed run is bitwise the run that was not interrupted.
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import signal
import sys
import threading
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from amdim_kernels import available_backends
from amdim_kernels.registry import BACKENDS
from amdim_kernels.multiscale import draw_locations, multiscale_nce

from . import checkpoint, cli, curves
from .data import SPECS, MissingDataset, SeededAugmentation, build_datasets
from .evaluator import Evaluator
from .evaluator import classifier_loss as probe_loss
from .model import AMDIM
from .warmup import WARMUP_BATCHES, accuracy_after_warm_up, batchnorm_statistics_kept

# A preset's milestones that decay the rate for the run's last epoch, whatever --epochs is.
LAST_EPOCH = "last epoch"
PRESETS = {
    # the official defaults (train.py of amdim-public)
    "official": dict(ndf=128, n_rkhs=1024, n_depth=3, batch_size=200, epochs=None, train_subset=0, warmup_steps=500,
                     lr=2e-4, milestones=None, channels_last=False, eval_batches=0),
    # minutes on a 2-core CPU (README, "The demo's recipe"): a small encoder on all the
    # training images for a few epochs, a shorter warm-up and a higher learning rate, x0.2
    # for the last epoch, NHWC convolutions (1.5x faster on the CPU), the online test on 10
    # batches
    "cpu-demo": dict(ndf=32, n_rkhs=256, n_depth=1, batch_size=100, epochs=2, train_subset=0, warmup_steps=50,
                     lr=2e-3, milestones=LAST_EPOCH, channels_last=True, eval_batches=10),
}
DEFAULT_DATA_ROOT = os.path.expanduser("~/.cache/amdim-data")
# What a resumed run must share with the checkpoint's: the weights' shapes, the step count of
# an epoch (dataset, batch, subset, processes) and the schedule's base rate (the scheduler's
# saved state carries it, so another --lr would be ignored).
KEPT_ON_RESUME = ("dataset", "ndf", "n_rkhs", "n_depth", "use_bn", "batch_size", "train_subset", "lr")


def build_parser() -> cli.Parser:
    count, positive = cli.integer(0), cli.integer(1)
    p = cli.Parser(prog="amdim.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(SPECS))
    p.add_argument("--data-root", default=None,
                   help=f"an existing folder holding the dataset (default: {DEFAULT_DATA_ROOT}, created if missing); "
                        "Fashion-MNIST is copied into it from the system's dataset-fashion-mnist package when absent")
    p.add_argument("--download", action="store_true",
                   help="let torchvision download the dataset (into --data-root, created if missing)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model/run size; default: official with a GPU, cpu-demo without")
    p.add_argument("--ndf", type=positive)
    p.add_argument("--n-rkhs", type=positive)
    p.add_argument("--n-depth", type=positive)
    p.add_argument("--use-bn", action="store_true", help="batch norm inside the encoder (off in the official runs)")
    p.add_argument("--batch-size", type=positive,
                   help="images per step in all processes together, as the official run's DataParallel batch "
                        "(official: 200); torchrun's processes take equal shares, so it must be a multiple of "
                        "their number")
    p.add_argument("--epochs", type=positive, help="default: the dataset's official schedule")
    p.add_argument("--train-subset", type=count,
                   help="use only the first N training images, all of them where the set is smaller (0: all)")
    p.add_argument("--max-steps", type=count, default=0, help="stop after this many updates (0: no limit)")
    p.add_argument("--lr", type=cli.real(0, above=True), help="Adam's learning rate (official: 2e-4)")
    p.add_argument("--warmup-steps", type=count, help="linear warm-up updates (official: 500; 0: none)")
    p.add_argument("--milestones", type=count, nargs="*",
                   help="MultiStepLR epochs, gamma 0.2 (default: the dataset's with the official preset, the last "
                        "epoch with cpu-demo)")
    p.add_argument("--tclip", type=cli.real(0, above=False), default=20.0, help="score clipping; 0 disables it")
    p.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS,
                   help=f"nce_loss backend; those that run on this machine: {available_backends()}")
    p.add_argument("--amp", action="store_true", help="autocast to --amp-dtype")
    p.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16"],
                   help="--amp's dtype; float16 (GPUs without bf16, as the official apex O2 runs) scales the loss "
                        "with a GradScaler, whose inf check waits for the device once a step")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the forward pass: encoder, the four NCE calls (one opaque op each) and probes")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    p.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode for --compile; reduce-overhead replays CUDA graphs (no launch overhead)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last images and weights: NHWC convolutions, and feature maps whose targets have "
                        "contiguous features (the fused backends then copy nothing); default: the preset's")
    p.add_argument("--log-every", type=positive, default=10,
                   help="read the losses back (a wait for the device) and log them every this many steps")
    p.add_argument("--save-every", type=count, default=500,
                   help="also write OUT/last.pt every this many steps, so that a killed run loses at most that many "
                        "(0: at epoch ends only); each write waits for the device and copies the weights")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA)")
    p.add_argument("--workers", type=count, default=2, help="DataLoader worker processes (0: load in this one)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=count, default=1)
    p.add_argument("--out", default="runs/amdim", help="folder for last.pt, metrics.csv and tb/ (created if missing)")
    p.add_argument("--resume", default=None, help="checkpoint to continue from")
    p.add_argument("--eval-batches", type=count,
                   help="test batches of 256 per online evaluation (0: the whole test set; default: the preset's, "
                        "0 official, 10 cpu-demo)")
    return p


def world_size() -> int:
    """The number of processes torchrun started (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_args(p: cli.Parser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill the preset's and the dataset's defaults, and refuse (p.error) what cannot run:
    a device or backend this machine lacks, a training subset smaller than a batch, a missing
    --data-root, an --out that cannot be written."""
    problem = cli.device_problem(args.device) or cli.backend_problem(args.backend, args.device)
    if problem:
        p.error(problem)
    preset = PRESETS[args.preset or ("official" if args.device.startswith("cuda") else "cpu-demo")]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    spec = SPECS[args.dataset]
    args.epochs = args.epochs or spec.epochs
    if args.milestones is None:
        args.milestones = spec.milestones
    elif args.milestones == LAST_EPOCH:
        args.milestones = (args.epochs - 1,) if args.epochs > 1 else ()
    else:
        args.milestones = tuple(args.milestones)
    if args.batch_size % world_size():
        p.error(f"--batch-size {args.batch_size} is not a multiple of the {world_size()} processes torchrun "
                "started: each process takes an equal share of the batch")
    if 0 < args.train_subset < args.batch_size:
        p.error(f"--train-subset {args.train_subset} is below a batch (--batch-size {args.batch_size}): "
                "an epoch needs at least one whole batch")
    if args.data_root is None:
        args.data_root = DEFAULT_DATA_ROOT
    elif not (os.path.isdir(args.data_root) or args.download):
        p.error(f"--data-root {args.data_root}: no such folder (pass --download to create it and fetch the dataset)")
    problem = cli.folder_problem("--out", args.out)
    if problem:
        p.error(problem)
    return args


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    return check_args(p, p.parse_args(argv))


def resume_state(args: argparse.Namespace) -> dict:
    """The checkpoint --resume names, checked against this run; raises UsageError."""
    try:
        state = checkpoint.load(args.resume)
    except checkpoint.Unreadable as e:
        raise cli.UsageError(f"--resume {args.resume}: {e}") from None
    saved = state["args"]
    differ = [f"--{k.replace('_', '-')} {saved.get(k)} (this run: {getattr(args, k)})"
              for k in KEPT_ON_RESUME if saved.get(k) != getattr(args, k)]
    if state["world"] != world_size():
        differ.append(f"{state['world']} process(es) (this run: {world_size()})")
    if differ:
        raise cli.UsageError(f"--resume {args.resume}: the checkpoint's run has {', '.join(differ)}; "
                             "a resumed run keeps them")
    return state


def lr_factor(step: int, steps_per_epoch: int, warmup: int, milestones, gamma: float = 0.2) -> float:
    """Linear warm-up over the first `warmup` updates, then x0.2 at each milestone epoch."""
    epoch = step // max(1, steps_per_epoch)
    return min(1.0, (step + 1) / max(1, warmup)) * gamma ** sum(epoch >= m for m in milestones)


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C and SIGTERM: the main process stops at a step boundary
    and then shuts them down (a worker that died of the signal would fail its batch)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Run:
    """Everything a training run holds, and one step of it."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.distributed = world_size() > 1
        if self.distributed:
            dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            # host-side collectives (the stop request, RNG states) that must not touch the device
            self.host_group = dist.new_group(backend="gloo")
            if args.device.startswith("cuda"):
                args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                torch.cuda.set_device(args.device)
        else:
            self.rank, self.world = 0, 1
        self.device = torch.device(args.device)
        # every RNG a run may draw from starts from --seed, so that the run is the same in any process
        torch.manual_seed(args.seed + self.rank)
        random.seed(args.seed + self.rank)
        np.random.seed(args.seed + self.rank)

        train, test, self.spec = build_datasets(args.dataset, args.data_root, args.download)
        if args.train_subset:
            train = Subset(train, range(min(args.train_subset, len(train))))
        self.train_set, self.test_set = train, test
        self.rank_batch = args.batch_size // self.world  # this process's share of each batch
        self.steps_per_epoch = len(train) // args.batch_size
        if self.steps_per_epoch == 0:
            raise cli.UsageError(f"--batch-size {args.batch_size} exceeds the "
                                 f"{len(train)} training images of {args.dataset}")

        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = AMDIM(self.spec.image_size, args.ndf, args.n_rkhs, args.n_depth, args.use_bn).to(
            self.device, memory_format=self.memory_format)
        self.evaluator = Evaluator(args.n_rkhs, self.spec.n_classes).to(self.device)
        if self.distributed and args.sync_bn:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        # every process's classifiers take the same steps: DDP averages their gradients too
        self.net, self.probes = ((DistributedDataParallel(self.model), DistributedDataParallel(self.evaluator))
                                 if self.distributed else (self.model, self.evaluator))
        params = list(self.model.parameters()) + list(self.evaluator.parameters())
        self.optimizer = torch.optim.Adam(params, lr=args.lr, betas=(0.8, 0.999), weight_decay=1e-5, eps=1e-8)
        self.amp_dtype = getattr(torch, args.amp_dtype)
        # float16's gradients underflow without loss scaling (the official code: apex's
        # scale_loss); disabled, the scaler passes everything through
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp and self.amp_dtype == torch.float16)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda t: lr_factor(t, self.steps_per_epoch, args.warmup_steps, args.milestones))
        self.step = 0
        self.saved_step = None  # the step of the checkpoint this run wrote last
        self.checkpoint_path = os.path.join(args.out, "last.pt")
        # nce_loss traces without graph breaks on every backend, so the whole forward compiles
        self.forward_losses = (torch.compile(self._forward_losses, backend=args.compile_backend, mode=args.compile_mode)
                               if args.compile else self._forward_losses)

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to (epochs end together with their last step)."""
        return self.step // self.steps_per_epoch

    def done(self) -> bool:
        return self.epoch >= self.args.epochs or bool(self.args.max_steps and self.step >= self.args.max_steps)

    # ---- data ----
    def train_loader(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        """This epoch's batches, in an order fixed by (seed, epoch), from batch `skip_batches`
        on; each image augmented from its own seed (SeededAugmentation)."""
        a = self.args
        if self.distributed:
            sampler = DistributedSampler(self.train_set, shuffle=True, seed=a.seed, drop_last=True)
            sampler.set_epoch(epoch)
            indices = list(sampler)
        else:
            gen = torch.Generator().manual_seed(a.seed * 100003 + epoch)
            indices = torch.randperm(len(self.train_set), generator=gen).tolist()
        b = self.rank_batch
        indices = indices[skip_batches * b: self.steps_per_epoch * b]
        images = Subset(SeededAugmentation(self.train_set, a.seed, epoch), indices)
        # the loader's own generator: making an iterator must not draw from the global RNG
        return DataLoader(images, batch_size=b, shuffle=False, drop_last=True, num_workers=a.workers,
                          pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(a.seed + epoch),
                          worker_init_fn=_leave_signals_to_the_main_process, persistent_workers=False)

    # ---- one update ----
    def nce_losses(self, features, b: int, locations=None):
        """The multiscale NCE of (r1, r5, r7) given for both views at once (view 1 first,
        b images each); call it inside the run's autocast."""
        view1, view2 = tuple(f[:b] for f in features), tuple(f[b:] for f in features)
        return self.view_losses(view1, view2, locations)

    def view_losses(self, view1, view2, locations=None):
        """The multiscale NCE between two views' (r1, r5, r7); call it inside the run's autocast."""
        return multiscale_nce(view1, view2, tclip=self.args.tclip or None, backend=self.args.backend,
                              locations=locations)

    def classifier_loss(self, view1, view2, labels):
        """The online classifiers' loss on each view's r1 apart, so that the MLP's BatchNorm
        too sees one view's batch; the mean of the two is the loss of both views together.
        One call of the (DDP-wrapped) classifiers for both views."""
        logits = self.probes(torch.cat([view1[0], view2[0]]), n_views=2)
        return 0.5 * sum(probe_loss(lin, labels) + probe_loss(mlp, labels) for lin, mlp in logits)

    def _forward_losses(self, x, labels, locations):
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.args.amp):
            view1, view2 = self.net(x, n_views=2)  # each view in its own pass: per-view BatchNorm statistics
            losses = self.view_losses(view1, view2, locations)
            cls_loss = self.classifier_loss(view1, view2, labels)
        return losses, cls_loss

    def train_step(self, views, labels) -> dict[str, torch.Tensor | float]:
        """One update. Returns the losses as device tensors and the learning rate: nothing
        here waits for the device (read_metrics does), so the host can queue the next
        step's work while this one runs."""
        x = torch.cat(views).to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device)
        # the 5->5 source locations: drawn outside any compiled graph, from the CPU RNG, so
        # that --resume replays them exactly with --compile too
        losses, cls_loss = self.forward_losses(x, labels, draw_locations(labels.shape[0]))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses.total + cls_loss).backward()
        self.scaler.step(self.optimizer)  # skipped where the scaled gradients overflowed
        self.scaler.update()
        with warnings.catch_warnings():
            # the schedule counts steps taken or skipped; torch warns when the first is skipped,
            # as float16's first few are while the scale settles
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
            self.scheduler.step()
        self.step += 1
        return dict(losses.as_dict(), cls=cls_loss.detach(), lr=self.scheduler.get_last_lr()[0])

    def test_batches(self, limit: int):
        """The first `limit` test batches (all of them with 0), on the device, in a fixed
        order; the loader has its own generator: testing draws nothing from the training
        run's RNG."""
        loader = DataLoader(self.test_set, batch_size=256, num_workers=self.args.workers,
                            generator=torch.Generator().manual_seed(0),
                            worker_init_fn=_leave_signals_to_the_main_process)
        for k, (x, y) in enumerate(loader):
            if limit and k >= limit:
                break
            yield x.to(self.device).contiguous(memory_format=self.memory_format), y.to(self.device)

    def _encode_and_classify(self, x):
        return self.evaluator(self.model(x)[0])

    @torch.no_grad()
    def test_accuracy(self) -> dict[str, float]:
        """The online classifiers' test accuracy, after the official BatchNorm warm-up on
        the first test batches. The warm-up's running statistics serve this test only: they
        are restored afterwards, so that testing leaves the run's state (its checkpoint, its
        resumed twin) bitwise as training left it."""
        limit = self.args.eval_batches
        with batchnorm_statistics_kept(self.model, self.evaluator):
            return accuracy_after_warm_up(
                (self.model, self.evaluator), self._encode_and_classify,
                (x for x, _ in self.test_batches(min(limit or WARMUP_BATCHES, WARMUP_BATCHES))),
                self.test_batches(limit))

    # ---- stopping ----
    def agree_to_stop(self, requested: bool) -> bool:
        """Whether any process was asked to stop: all of them stop after the same step. One
        process decides alone; several combine their flags on the host (no device wait)."""
        if not self.distributed:
            return requested
        flag = torch.tensor([int(requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(flag.item())

    # ---- checkpoints ----
    def state(self, rng: list[dict] | None = None) -> dict:
        """The checkpoint: tensors and plain values only. rng: every process's RNG states, by
        rank (default: this process's)."""
        return dict(model=self.model.state_dict(), evaluator=self.evaluator.state_dict(),
                    optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                    scaler=self.scaler.state_dict(), epoch=self.epoch, step=self.step, world=self.world,
                    rng=rng or [checkpoint.rng_state()], args=dict(vars(self.args)))

    def load_state(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.evaluator.load_state_dict(state["evaluator"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as e:
            raise cli.UsageError(f"--resume {self.args.resume}: its weights do not fit this model "
                                 f"({cli.first_complaint(e)})") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state["scaler"]:  # a disabled scaler saves {}
            self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        checkpoint.set_rng_state(state["rng"][self.rank])

    def save(self) -> None:
        """Write OUT/last.pt (rank 0), unless this step's is already written. Every process
        calls it at the same step: their RNG states are gathered into the checkpoint."""
        if self.saved_step == self.step:
            return
        rng = [checkpoint.rng_state()]
        if self.distributed:
            rng = [None] * self.world
            dist.all_gather_object(rng, checkpoint.rng_state(), group=self.host_group)
        if self.rank == 0:
            checkpoint.save(self.checkpoint_path, self.state(rng))
        self.saved_step = self.step


def read_metrics(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """train_step's metrics as floats, read back from the device in one transfer."""
    tensors = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)}
    values = torch.stack([v.float() for v in tensors.values()]).tolist() if tensors else []
    return {**metrics, **dict(zip(tensors, values))}


class Interrupted(Exception):
    """A stop signal ended the run after its checkpoint was written; str() is the line to print."""

    def __init__(self, signum: int, run: Run):
        self.exit_code = 128 + signum
        path = run.checkpoint_path
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {run.step} (epoch {run.epoch}): "
                         f"checkpoint {path}; continue with --resume {path}")


class StopSignals:
    """While active, SIGINT and SIGTERM ask the run to stop instead of interrupting it: the
    step in progress finishes and the checkpoint is written at the step boundary, so that it
    never holds half a step (a batch's augmentation or 5->5 locations drawn but not trained
    on, an optimiser half-stepped). With `again_stops_at_once`, a second SIGINT stops at once
    (KeyboardInterrupt); torchrun's processes go without it, since torchrun passes on the
    terminal's Ctrl-C, which each of them has received already."""

    def __init__(self, again_stops_at_once: bool = True):
        self.signal: int | None = None
        self.again_stops_at_once = again_stops_at_once
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # where Python runs handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT and self.again_stops_at_once:
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal = signum


class Log:
    """What rank 0 reports: the progress bar, TensorBoard (OUT/tb), the logged steps' losses
    (OUT/steps.csv), each epoch's metrics and test accuracy (OUT/metrics.csv and a line), and
    the curves of both (OUT/curves.png)."""

    def __init__(self, run: Run, resumed: bool):
        self.run, self.main = run, run.rank == 0
        self.csv_path = os.path.join(run.args.out, "metrics.csv")
        self.steps_path = os.path.join(run.args.out, "steps.csv")
        self.writer = self.bar = None
        if not self.main:
            return
        from torch.utils.tensorboard import SummaryWriter

        for path in (self.csv_path, self.steps_path):
            if resumed:  # what a killed run logged after its checkpoint is dropped: this run logs it again
                _drop_rows_after(path, run.step)
            elif os.path.exists(path):  # a new run in the folder of an earlier one starts new logs
                os.remove(path)
        self.writer = SummaryWriter(os.path.join(run.args.out, "tb"), purge_step=run.step + 1 if resumed else None)
        a = run.args
        print(f"AMDIM on {a.dataset} ({len(run.train_set)} training images, {run.world} process(es), "
              f"{a.device}, backend {a.backend}); {sum(p.numel() for p in run.model.parameters()) / 1e6:.1f}M "
              f"parameters; {run.steps_per_epoch} steps x {a.epochs} epochs", flush=True)

    def progress(self, loader: DataLoader) -> DataLoader:
        """The epoch's batches behind a progress bar; starts the images/s clock."""
        run = self.run
        self.t0, self.images, self.last = time.perf_counter(), 0, None
        if self.bar is not None:
            self.bar.close()
        # counts the steps taken (step() moves it), so an epoch's line follows a full bar
        self.bar = tqdm(desc=f"epoch {run.epoch}", disable=not self.main, dynamic_ncols=True,
                        initial=run.step % run.steps_per_epoch, total=run.steps_per_epoch)
        return loader

    def _read_back(self) -> dict[str, float]:
        # waits for the last step, so the rate is exact
        return dict(read_metrics(self.last), images_per_s=self.images / (time.perf_counter() - self.t0))

    def step(self, step_metrics: dict, batch: int) -> None:
        run = self.run
        self.last = step_metrics
        self.images += 2 * batch * run.world
        self.bar.update()
        if self.main and run.step % run.args.log_every == 0:
            metrics = self._read_back()
            self.bar.set_postfix(loss=f"{metrics['total']:.3f}", img_s=f"{metrics['images_per_s']:.0f}")
            for k, v in metrics.items():
                self.writer.add_scalar(f"train/{k}", v, run.step)
            _append_csv(self.steps_path, dict(epoch=run.epoch, step=run.step, **metrics))

    def report(self, accuracy: dict[str, float]) -> dict[str, float]:
        """The last step's metrics and the test accuracy, to the CSV, TensorBoard and stdout."""
        run = self.run
        metrics = dict(self._read_back(), **accuracy)
        if self.main:
            for k in ("test_acc_linear", "test_acc_mlp"):
                self.writer.add_scalar(f"test/{k}", metrics[k], run.step)
            _append_csv(self.csv_path, dict(epoch=run.epoch, step=run.step, **metrics))
            curves.draw(run.args.out)
            print(f"epoch {run.epoch} step {run.step}: loss {metrics['total']:.4f}, "
                  f"online linear probe {metrics['test_acc_linear']:.4f}, MLP {metrics['test_acc_mlp']:.4f}",
                  flush=True)
        return metrics

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def fit(run: Run, log: Log, stop: StopSignals) -> dict[str, float]:
    """Train until the last epoch or --max-steps, testing and writing the checkpoint at each
    epoch end (and every --save-every steps); raises Interrupted once a stop is requested and
    the checkpoint of the step boundary is written."""
    args, metrics = run.args, {}
    while not run.done():
        for (v1, v2), labels in log.progress(run.train_loader(run.epoch, run.step % run.steps_per_epoch)):
            log.step(run.train_step((v1, v2), labels), labels.shape[0])
            if run.step % run.steps_per_epoch == 0 or run.done():  # an epoch's end, or --max-steps
                metrics = log.report(run.test_accuracy())
                run.save()
            elif args.save_every and run.step % args.save_every == 0:
                run.save()
            if run.agree_to_stop(stop.signal is not None):
                run.save()
                raise Interrupted(stop.signal or signal.SIGTERM, run)  # another process's signal: SIGTERM's code
            if run.done():
                break
    return metrics


def train(args: argparse.Namespace, state: dict | None = None) -> dict[str, float]:
    """Train from scratch, or from `state` (default: the checkpoint --resume names); returns
    the last epoch's metrics."""
    with StopSignals(again_stops_at_once=world_size() == 1) as stop:
        run = Run(args)
        try:
            if state is None and args.resume:
                state = resume_state(args)
            if state is not None:
                run.load_state(state)
            if run.rank == 0:
                checkpoint.remove_stale_temporaries(run.checkpoint_path)
            log = Log(run, resumed=state is not None)
            try:
                return fit(run, log, stop)
            finally:
                log.close()
        finally:
            if run.distributed:
                dist.destroy_process_group()


def _append_csv(path: str, row: dict) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _drop_rows_after(path: str, step: int) -> None:
    """Remove the CSV rows of steps after `step`, and any row a kill cut short."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames
        rows = [row for row in reader
                if None not in row.values() and row["step"].isdigit() and int(row["step"]) <= step]
    with open(f"{path}.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(f"{path}.tmp", path)  # a kill leaves either CSV whole


def main(argv=None) -> None:
    p = build_parser()
    args = check_args(p, p.parse_args(argv))
    try:
        train(args, resume_state(args) if args.resume else None)
    except cli.UsageError as e:
        p.error(str(e))
    except MissingDataset as e:
        p.error(str(e))  # it names --data-root or --download
    except Interrupted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began
        print(f"stopped at once by Ctrl-C: the checkpoint written last, if any, is {os.path.join(args.out, 'last.pt')}",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
