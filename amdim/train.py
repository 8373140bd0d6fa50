"""Train AMDIM with the multiscale NCE objective of amdim_kernels.

    python -m amdim.train                              # Fashion-MNIST, sized for this machine
    python -m amdim.train --dataset cifar10 --data-root ~/data --preset official
    torchrun --nproc-per-node 4 -m amdim.train --dataset imagenet --data-root /data/in128 ...

Online linear and MLP classifiers on the detached r1 are trained alongside and tested after
every epoch. Metrics go to tqdm, TensorBoard (OUT/tb) and OUT/metrics.csv; OUT/last.pt is
written atomically after every epoch and on Ctrl-C, and --resume OUT/last.pt continues the
run exactly (weights, optimiser, schedule, RNG, epoch and step; mid-epoch too with
--workers 0).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from amdim_kernels import available_backends

from . import checkpoint
from .data import SPECS, MissingDataset, build_datasets
from .evaluator import Evaluator
from .model import AMDIM
from .objective import draw_locations, multiscale_nce

PRESETS = {
    # the official defaults (train.py of amdim-public)
    "official": dict(ndf=128, n_rkhs=1024, n_depth=3, batch_size=200, epochs=None, train_subset=0, warmup_steps=500),
    # minutes on a 2-core CPU: a small encoder, 10k training images, 2 epochs
    "cpu-demo": dict(ndf=32, n_rkhs=256, n_depth=1, batch_size=100, epochs=2, train_subset=10000, warmup_steps=50),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(SPECS))
    p.add_argument("--data-root", default=os.path.expanduser("~/.cache/amdim-data"))
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model/run size; default: official with a GPU, cpu-demo without")
    p.add_argument("--ndf", type=int)
    p.add_argument("--n-rkhs", type=int)
    p.add_argument("--n-depth", type=int)
    p.add_argument("--use-bn", action="store_true", help="batch norm inside the encoder (off in the official runs)")
    p.add_argument("--batch-size", type=int, help="images per process")
    p.add_argument("--epochs", type=int, help="default: the dataset's official schedule")
    p.add_argument("--train-subset", type=int, help="use only the first N training images (0: all)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many updates (0: no limit)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, help="linear warm-up updates (official: 500)")
    p.add_argument("--milestones", type=int, nargs="*", help="MultiStepLR epochs, gamma 0.2 (default: the dataset's)")
    p.add_argument("--tclip", type=float, default=20.0, help="score clipping; 0 disables it")
    p.add_argument("--backend", default="auto", help=f"nce_loss backend: auto or one of {available_backends()}")
    p.add_argument("--amp", action="store_true", help="autocast to --amp-dtype")
    p.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16"],
                   help="--amp's dtype; float16 (GPUs without bf16, as the official apex O2 runs) scales the loss "
                        "with a GradScaler, whose inf check waits for the device once a step")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the forward pass: encoder, the four NCE calls (one opaque op each) and probes")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    p.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode for --compile; reduce-overhead replays CUDA graphs (no launch overhead)")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last images and weights: NHWC convolutions, and feature maps whose targets have "
                        "contiguous features (the fused backends then copy nothing)")
    p.add_argument("--log-every", type=int, default=10,
                   help="read the losses back (a wait for the device) and log them every this many steps")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="runs/amdim")
    p.add_argument("--resume", default=None, help="checkpoint to continue from")
    p.add_argument("--eval-batches", type=int, default=0, help="test batches per evaluation (0: the whole test set)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset or ("official" if args.device.startswith("cuda") else "cpu-demo")]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    spec = SPECS[args.dataset]
    args.epochs = args.epochs or spec.epochs
    args.milestones = spec.milestones if args.milestones is None else tuple(args.milestones)
    for name in ("ndf", "n_rkhs", "n_depth", "batch_size", "epochs", "log_every"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.tclip < 0:
        p.error(f"--tclip must be >= 0 (0 disables clipping), got {args.tclip}")
    if args.backend != "auto" and args.backend not in ("reference", "triton", "cuda", "cpp"):
        p.error(f"--backend must be auto, reference, triton, cuda or cpp, got {args.backend!r}")
    return args


def lr_factor(step: int, steps_per_epoch: int, warmup: int, milestones, gamma: float = 0.2) -> float:
    """Linear warm-up over the first `warmup` updates, then x0.2 at each milestone epoch."""
    epoch = step // max(1, steps_per_epoch)
    return min(1.0, (step + 1) / max(1, warmup)) * gamma ** sum(epoch >= m for m in milestones)


class Run:
    """Everything a training run holds, and one step of it."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed:
            dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if args.device.startswith("cuda"):
                args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                torch.cuda.set_device(args.device)
        else:
            self.rank, self.world = 0, 1
        self.device = torch.device(args.device)
        torch.manual_seed(args.seed + self.rank)

        train, test, self.spec = build_datasets(args.dataset, args.data_root, args.download)
        if args.train_subset:
            train = torch.utils.data.Subset(train, range(min(args.train_subset, len(train))))
        self.train_set, self.test_set = train, test
        self.steps_per_epoch = len(train) // (args.batch_size * self.world)
        if self.steps_per_epoch == 0:
            raise ValueError(f"--batch-size {args.batch_size} x {self.world} processes exceeds the {len(train)} training images")

        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = AMDIM(self.spec.image_size, args.ndf, args.n_rkhs, args.n_depth, args.use_bn).to(
            self.device, memory_format=self.memory_format)
        self.evaluator = Evaluator(args.n_rkhs, self.spec.n_classes).to(self.device)
        if self.distributed and args.sync_bn:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.net = DistributedDataParallel(self.model) if self.distributed else self.model
        params = list(self.model.parameters()) + list(self.evaluator.parameters())
        self.optimizer = torch.optim.Adam(params, lr=args.lr, betas=(0.8, 0.999), weight_decay=1e-5, eps=1e-8)
        self.amp_dtype = getattr(torch, args.amp_dtype)
        # float16's gradients underflow without loss scaling (the official code: apex's
        # scale_loss); disabled, the scaler passes everything through
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp and self.amp_dtype == torch.float16)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda t: lr_factor(t, self.steps_per_epoch, args.warmup_steps, args.milestones))
        self.epoch, self.step = 0, 0
        # nce_loss traces without graph breaks on every backend, so the whole forward compiles
        self.forward_losses = (torch.compile(self._forward_losses, backend=args.compile_backend, mode=args.compile_mode)
                               if args.compile else self._forward_losses)

    # ---- data ----
    def train_loader(self, epoch: int, skip_batches: int = 0) -> DataLoader:
        """This epoch's batches, in an order fixed by (seed, epoch), from batch `skip_batches` on."""
        a = self.args
        if self.distributed:
            sampler = DistributedSampler(self.train_set, shuffle=True, seed=a.seed, drop_last=True)
            sampler.set_epoch(epoch)
            indices = list(sampler)
        else:
            gen = torch.Generator().manual_seed(a.seed * 100003 + epoch)
            indices = torch.randperm(len(self.train_set), generator=gen).tolist()
        indices = indices[skip_batches * a.batch_size: self.steps_per_epoch * a.batch_size]
        return DataLoader(torch.utils.data.Subset(self.train_set, indices), batch_size=a.batch_size,
                          shuffle=False, drop_last=True, num_workers=a.workers, pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(a.seed + epoch), persistent_workers=False)

    # ---- one update ----
    def nce_losses(self, features, b: int, locations=None):
        """The multiscale NCE of (r1, r5, r7) computed on both views at once (view 1 first,
        b images each); call it inside the run's autocast."""
        view1, view2 = tuple(f[:b] for f in features), tuple(f[b:] for f in features)
        return multiscale_nce(view1, view2, tclip=self.args.tclip or None, backend=self.args.backend,
                              locations=locations)

    def _forward_losses(self, x, labels, locations):
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.args.amp):
            features = self.net(x)  # both views in one pass
            losses = self.nce_losses(features, labels.shape[0], locations)
            cls_loss = self.evaluator.loss(features[0], torch.cat([labels, labels]))
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

    @torch.no_grad()
    def test_accuracy(self) -> dict[str, float]:
        self.model.eval()
        self.evaluator.eval()
        # its own generator: evaluating must not draw from the training run's RNG
        loader = DataLoader(self.test_set, batch_size=256, num_workers=self.args.workers,
                            generator=torch.Generator().manual_seed(0))
        correct = {"linear": 0, "mlp": 0}
        seen = 0
        for k, (x, y) in enumerate(loader):
            if self.args.eval_batches and k >= self.args.eval_batches:
                break
            r1 = self.model(x.to(self.device).contiguous(memory_format=self.memory_format))[0]
            lin, mlp = self.evaluator(r1)
            y = y.to(self.device)
            correct["linear"] += int((lin.argmax(1) == y).sum())
            correct["mlp"] += int((mlp.argmax(1) == y).sum())
            seen += len(y)
        self.model.train()
        self.evaluator.train()
        return {f"test_acc_{k}": v / max(1, seen) for k, v in correct.items()}

    # ---- checkpoints ----
    def state(self) -> dict:
        return dict(model=self.model.state_dict(), evaluator=self.evaluator.state_dict(),
                    optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                    scaler=self.scaler.state_dict(), epoch=self.epoch, step=self.step, rng=checkpoint.rng_state(),
                    args=vars(self.args))

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.evaluator.load_state_dict(state["evaluator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler"):  # a disabled scaler saves {}
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        checkpoint.set_rng_state(state["rng"])

    def save(self) -> None:
        if self.rank == 0:
            checkpoint.save(os.path.join(self.args.out, "last.pt"), self.state())


def read_metrics(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """train_step's metrics as floats, read back from the device in one transfer."""
    tensors = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)}
    values = torch.stack([v.float() for v in tensors.values()]).tolist() if tensors else []
    return {**metrics, **dict(zip(tensors, values))}


def train(args: argparse.Namespace) -> dict[str, float]:
    run = Run(args)
    if args.resume:
        run.load_state(checkpoint.load(args.resume))
    main = run.rank == 0
    writer = None
    if main:
        os.makedirs(args.out, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(args.out, "tb"))
        print(f"AMDIM on {args.dataset} ({len(run.train_set)} training images, {run.world} process(es), "
              f"{args.device}, backend {args.backend}); {sum(p.numel() for p in run.model.parameters()) / 1e6:.1f}M "
              f"parameters; {run.steps_per_epoch} steps x {args.epochs} epochs", flush=True)
    csv_path = os.path.join(args.out, "metrics.csv")
    metrics: dict[str, float] = {}
    try:
        while run.epoch < args.epochs and not (args.max_steps and run.step >= args.max_steps):
            skip = run.step - run.epoch * run.steps_per_epoch  # > 0 when resuming mid-epoch
            loader = run.train_loader(run.epoch, skip)
            bar = tqdm(loader, desc=f"epoch {run.epoch}", disable=not main, dynamic_ncols=True, initial=skip,
                       total=run.steps_per_epoch)
            t0, images, step_metrics = time.perf_counter(), 0, None

            def read_back() -> dict[str, float]:
                # waits for the last step, so the rate is exact
                return dict(read_metrics(step_metrics), images_per_s=images / (time.perf_counter() - t0))

            for (v1, v2), labels in bar:
                step_metrics = run.train_step((v1, v2), labels)
                images += 2 * labels.shape[0] * run.world
                if main and run.step % args.log_every == 0:
                    metrics = read_back()
                    bar.set_postfix(loss=f"{metrics['total']:.3f}", img_s=f"{metrics['images_per_s']:.0f}")
                    for k, v in metrics.items():
                        writer.add_scalar(f"train/{k}", v, run.step)
                if args.max_steps and run.step >= args.max_steps:
                    break
            else:
                run.epoch += 1
            if step_metrics is not None:  # the epoch's last step, for the CSV row
                metrics = read_back()
            metrics.update(run.test_accuracy())
            if main:
                for k in ("test_acc_linear", "test_acc_mlp"):
                    writer.add_scalar(f"test/{k}", metrics[k], run.step)
                _append_csv(csv_path, dict(epoch=run.epoch, step=run.step, **metrics))
                print(f"epoch {run.epoch} step {run.step}: loss {metrics.get('total', float('nan')):.4f}, "
                      f"online linear probe {metrics['test_acc_linear']:.4f}, MLP {metrics['test_acc_mlp']:.4f}",
                      flush=True)
            run.save()
    except KeyboardInterrupt:
        run.save()
        if main:
            print(f"interrupted: checkpoint at {os.path.join(args.out, 'last.pt')} (epoch {run.epoch}, step {run.step})")
        raise
    finally:
        if writer:
            writer.close()
        if run.distributed:
            dist.destroy_process_group()
    return metrics


def _append_csv(path: str, row: dict) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except MissingDataset as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
