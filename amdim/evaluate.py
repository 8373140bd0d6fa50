"""Evaluate a pretrained encoder on its dataset's labels.

By default, a linear probe on frozen features: the train and test sets are encoded with the
checkpoint's encoder (test-time transform; eval mode after the official BatchNorm warm-up on
test batches), and a logistic regression is fitted to convergence (L-BFGS, a small L2
penalty, --l2) on the standardised r1 of the training images (standardisation fitted on
them alone) and tested on the test set. Unlabeled training
images (label -1: STL-10's train+unlabeled split) are left out.

--baselines also probes, in the same way, a randomly initialised encoder of the same
architecture and the raw pixels of the encoder's input, and prints the pretrained encoder's
accuracy last. --classifiers runs the official final evaluation instead (amdim-public's
`--classifiers`, see amdim/classifiers.py): fresh linear and MLP classifiers trained on the
frozen encoder under the training augmentation, 120 epochs for CIFAR, STL-10 and the grey
datasets, 30 for ImageNet.

    python -m amdim.evaluate runs/amdim/last.pt
    python -m amdim.evaluate runs/amdim/last.pt --baselines      # and a random encoder, raw pixels
    python -m amdim.evaluate runs/amdim/last.pt --random-init    # the probe on an untrained encoder
    python -m amdim.evaluate runs/amdim/last.pt --classifiers    # the official 120-epoch classifiers
"""
from __future__ import annotations

import argparse
import itertools
import os

import torch
from torch.utils.data import DataLoader, Subset

from . import checkpoint, cli
from .classifiers import Schedule, train_classifiers
from .data import SPECS, MissingDataset, build_datasets, test_transform
from .model import AMDIM
from .probe import L2, linear_probe
from .warmup import WARMUP_BATCHES, warm_up_batchnorm


@torch.no_grad()
def features(dataset, feature, batch_size: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature(images) of every batch, labels), the features in float32 on the CPU."""
    feats, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        feats.append(feature(x).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def encode(model: AMDIM, dataset, device, batch_size: int = 256, workers: int = 2,
           memory_format=torch.contiguous_format):
    """(r1 of every image, labels), r1 without the phi heads (AMDIM.global_feature)."""
    return features(dataset, lambda x: model.global_feature(x.to(device).contiguous(memory_format=memory_format)),
                    batch_size, workers)


def pixels(dataset, grey: bool, batch_size: int = 1024, workers: int = 2):
    """(the encoder's input images flattened, labels): one channel of the grey datasets,
    whose three are copies."""
    return features(dataset, lambda x: (x[:, :1] if grey else x).flatten(1), batch_size, workers)


@torch.no_grad()
def warm_up(model: AMDIM, test_set, device, batch_size: int = 256, workers: int = 2,
            memory_format=torch.contiguous_format) -> None:
    """The official BatchNorm warm-up on the first test batches, in their fixed order, of the
    encoder (r1 depends on nothing else); leaves the model in eval mode."""
    loader = DataLoader(test_set, batch_size=batch_size, num_workers=workers)
    batches = (x.to(device).contiguous(memory_format=memory_format) for x, _ in itertools.islice(loader, WARMUP_BATCHES))
    model.eval()
    warm_up_batchnorm([model.encoder], batches, model.encoder)


def labeled(dataset):
    """`dataset` without its unlabeled images (label -1: STL-10's train+unlabeled split),
    chosen from its label list where it has one, so that they are not encoded at all."""
    base, indices = (dataset.dataset, list(dataset.indices)) if isinstance(dataset, Subset) else (dataset, None)
    labels = getattr(base, "labels", None)
    if labels is None:
        return dataset
    labels = torch.as_tensor(labels)
    keep = torch.nonzero(labels[indices] >= 0 if indices is not None else labels >= 0).flatten()
    chosen = keep.tolist() if indices is None else [indices[k] for k in keep.tolist()]
    return Subset(base, chosen)


def drop_unlabeled(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels without the label -1 rows (a probe learns nothing from them)."""
    keep = y >= 0
    return x[keep], y[keep]


# What the probe reads from the training run's arguments.
RUN_KEYS = ("dataset", "data_root", "ndf", "n_rkhs", "n_depth", "use_bn", "train_subset")


def build_parser() -> cli.Parser:
    positive = cli.integer(1)
    p = cli.Parser(prog="amdim.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a last.pt of amdim.train")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--random-init", action="store_true", help="probe the same architecture, untrained")
    which.add_argument("--baselines", action="store_true",
                       help="also probe a randomly initialised encoder and the raw pixels; the pretrained encoder's "
                            "accuracy is printed last")
    p.add_argument("--classifiers", action="store_true",
                   help="the official final evaluation: fresh linear and MLP classifiers trained on the frozen "
                        "encoder under the training augmentation (see --epochs, --milestones)")
    p.add_argument("--data-root", default=None,
                   help="an existing folder holding the dataset (default: the training run's)")
    p.add_argument("--train-subset", type=cli.integer(0), default=None,
                   help="train the probe or classifiers on the first N training images (0: all; default: the "
                        "training run's)")
    p.add_argument("--l2", type=cli.real(0, above=False), default=None,
                   help=f"the linear probe's L2 penalty on its weights (default {L2:g})")
    p.add_argument("--epochs", type=positive, default=None,
                   help="--classifiers: their epochs (default: the dataset's official schedule, 120 for CIFAR, "
                        "STL-10 and the grey datasets, 30 for ImageNet)")
    p.add_argument("--milestones", type=cli.integer(0), nargs="*", default=None,
                   help="--classifiers: MultiStepLR epochs, gamma 0.2 (default: the dataset's, e.g. 80 110)")
    p.add_argument("--batch-size", type=positive, default=None,
                   help="--classifiers: images per step (default: the training run's batch size)")
    p.add_argument("--lr", type=cli.real(0, above=True), default=None,
                   help="--classifiers: Adam's learning rate (default: the training run's, 2e-4 officially)")
    p.add_argument("--workers", type=cli.integer(0), default=2, help="DataLoader worker processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def load_run(p: cli.Parser, path: str) -> dict:
    """The checkpoint at `path`, or p.error naming the checkpoint argument."""
    try:
        state = checkpoint.load(path)
    except checkpoint.Unreadable as e:
        p.error(f"checkpoint {path}: {e}")
    run = state["args"]
    missing = [k for k in RUN_KEYS if not isinstance(run, dict) or k not in run]
    if missing:
        p.error(f"checkpoint {path}: not a checkpoint of amdim.train (its arguments lack {', '.join(missing)})")
    return state


def check_args(p: cli.Parser, args: argparse.Namespace) -> None:
    """Refuse, before any work, what only applies to the other mode or cannot run here."""
    if args.classifiers and args.l2 is not None:
        p.error("--l2 applies to the linear probe, not to --classifiers")
    if not args.classifiers:
        for flag in ("epochs", "milestones", "batch_size", "lr"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag.replace('_', '-')} applies to --classifiers only")
    elif args.random_init or args.baselines:
        p.error("--classifiers evaluates the checkpoint's encoder: without --random-init and --baselines")
    problem = cli.device_problem(args.device)
    if problem:
        p.error(problem)
    if args.data_root is not None and not os.path.isdir(args.data_root):
        p.error(f"--data-root {args.data_root}: no such folder")


def build_model(p: cli.Parser, state: dict, path: str, pretrained: bool, device, memory_format) -> AMDIM:
    """The checkpoint's architecture, with its weights (pretrained) or freshly initialised
    from seed 0."""
    run = state["args"]
    torch.manual_seed(0)
    model = AMDIM(SPECS[run["dataset"]].image_size, run["ndf"], run["n_rkhs"], run["n_depth"], run["use_bn"])
    if pretrained:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            p.error(f"checkpoint {path}: its weights do not fit the model its arguments describe "
                    f"({cli.first_complaint(e)})")
    return model.to(device, memory_format=memory_format)


def main(argv=None) -> float:
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    state = load_run(p, args.checkpoint)
    run = state["args"]
    root = args.data_root or run["data_root"]
    memory_format = torch.channels_last if run.get("channels_last") else torch.contiguous_format
    device = torch.device(args.device)
    # the weights are checked before the datasets are read
    model = build_model(p, state, args.checkpoint, not args.random_init, device, memory_format)
    try:
        train_set, test_set, spec = build_datasets(run["dataset"], root)
    except MissingDataset as e:
        p.error(f"--data-root {root}: {e}")
    subset = run["train_subset"] if args.train_subset is None else args.train_subset
    if subset:
        train_set = Subset(train_set, range(min(subset, len(train_set))))
    train_set = labeled(train_set)
    if len(train_set) == 0:
        p.error(f"no labeled training image to probe on (--train-subset {subset})")
    if args.classifiers:
        return classifiers(args, run, model, train_set, test_set, spec, device, memory_format)

    # features of un-augmented images
    (train_set.dataset if isinstance(train_set, Subset) else train_set).transform = test_transform(spec)
    l2 = L2 if args.l2 is None else args.l2

    def probe(encoder: AMDIM) -> float:
        warm_up(encoder, test_set, device, workers=args.workers, memory_format=memory_format)
        train = drop_unlabeled(*encode(encoder, train_set, device, workers=args.workers, memory_format=memory_format))
        test = encode(encoder, test_set, device, workers=args.workers, memory_format=memory_format)
        return linear_probe(*train, *test, spec.n_classes, l2)

    name = run["dataset"]
    if args.baselines:
        random_init = probe(build_model(p, state, args.checkpoint, False, device, memory_format))
        print(f"linear probe on frozen r1 (randomly initialised encoder), {name} test accuracy: {random_init:.4f}")
        raw = linear_probe(*drop_unlabeled(*pixels(train_set, spec.grey, workers=args.workers)),
                           *pixels(test_set, spec.grey, workers=args.workers), spec.n_classes, l2)
        print(f"linear probe on the raw pixels, {name} test accuracy: {raw:.4f}")
    acc = probe(model)
    which = "randomly initialised encoder" if args.random_init else f"encoder of {args.checkpoint}"
    print(f"linear probe on frozen r1 ({which}), {name} test accuracy: {acc:.4f}")
    return acc


def classifiers(args, run: dict, model: AMDIM, train_set, test_set, spec, device, memory_format) -> float:
    """The official final evaluation; prints each epoch's test accuracy and returns the last
    epoch's linear one."""
    schedule = Schedule(epochs=args.epochs or spec.classifier_epochs,
                        milestones=tuple(spec.classifier_milestones if args.milestones is None else args.milestones),
                        lr=args.lr or run.get("lr", 2e-4),
                        batch_size=min(args.batch_size or run.get("batch_size", 200), len(train_set)))

    def report(epoch: int, accuracy: dict[str, float]) -> None:
        print(f"classifiers epoch {epoch + 1}/{schedule.epochs}: linear {accuracy['test_acc_linear']:.4f}, "
              f"MLP {accuracy['test_acc_mlp']:.4f}", flush=True)

    accuracy = train_classifiers(model, train_set, test_set, spec.n_classes, schedule, device,
                                 seed=run.get("seed", 1), workers=args.workers, memory_format=memory_format,
                                 report=report)
    print(f"official classifiers on frozen r1 (encoder of {args.checkpoint}), {run['dataset']} test accuracy: "
          f"linear {accuracy['test_acc_linear']:.4f}, MLP {accuracy['test_acc_mlp']:.4f}")
    return accuracy["test_acc_linear"]


if __name__ == "__main__":
    main()
