"""Linear probe on frozen features: encode the train and test sets with a checkpoint's encoder
(test-time transform; eval mode after the official BatchNorm warm-up on test batches), train
a fresh linear classifier on r1 and print its test accuracy. Unlabeled training images (label
-1: STL-10's train+unlabeled split) are left out of the probe's training set.

    python -m amdim.evaluate runs/amdim/last.pt
    python -m amdim.evaluate runs/amdim/last.pt --random-init   # the same probe on an untrained encoder
"""
from __future__ import annotations

import argparse
import itertools
import os

import torch
from torch.utils.data import DataLoader, Subset

from . import checkpoint, cli
from .data import MissingDataset, build_datasets, test_transform
from .model import AMDIM
from .warmup import WARMUP_BATCHES, warm_up_batchnorm


@torch.no_grad()
def encode(model: AMDIM, dataset, device, batch_size: int = 256, workers: int = 2):
    feats, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        feats.append(model(x.to(device))[0].float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def warm_up(model: AMDIM, test_set, device, batch_size: int = 256, workers: int = 2) -> None:
    """The official BatchNorm warm-up on the first test batches, in their fixed order; leaves
    the model in eval mode."""
    loader = DataLoader(test_set, batch_size=batch_size, num_workers=workers)
    batches = (x.to(device) for x, _ in itertools.islice(loader, WARMUP_BATCHES))
    warm_up_batchnorm([model], batches, model)


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


def linear_probe(train_x, train_y, test_x, test_y, n_classes: int, epochs: int = 30, seed: int = 0) -> float:
    """Test accuracy of a linear classifier (Adam, full-batch standardised features)."""
    torch.manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    clf = torch.nn.Linear(train_x.shape[1], n_classes)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3, weight_decay=1e-5)
    for _ in range(epochs):
        for idx in torch.randperm(len(train_x)).split(256):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(clf(train_x[idx]), train_y[idx]).backward()
            opt.step()
    return float((clf(test_x).argmax(1) == test_y).float().mean())


# What the probe reads from the training run's arguments.
RUN_KEYS = ("dataset", "data_root", "ndf", "n_rkhs", "n_depth", "use_bn", "train_subset")


def build_parser() -> cli.Parser:
    p = cli.Parser(prog="amdim.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a last.pt of amdim.train")
    p.add_argument("--random-init", action="store_true", help="probe the same architecture, untrained")
    p.add_argument("--data-root", default=None,
                   help="an existing folder holding the dataset (default: the training run's)")
    p.add_argument("--train-subset", type=cli.integer(0), default=None,
                   help="probe-train on the first N training images (0: all; default: the training run's)")
    p.add_argument("--epochs", type=cli.integer(1), default=30)
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


def main(argv=None) -> float:
    p = build_parser()
    args = p.parse_args(argv)
    problem = cli.device_problem(args.device)
    if problem:
        p.error(problem)
    if args.data_root is not None and not os.path.isdir(args.data_root):
        p.error(f"--data-root {args.data_root}: no such folder")
    state = load_run(p, args.checkpoint)
    run = state["args"]
    root = args.data_root or run["data_root"]
    try:
        train_set, test_set, spec = build_datasets(run["dataset"], root)
    except MissingDataset as e:
        p.error(f"--data-root {root}: {e}")
    train_set.transform = test_transform(spec)  # features of un-augmented images
    subset = run["train_subset"] if args.train_subset is None else args.train_subset
    if subset:
        train_set = Subset(train_set, range(min(subset, len(train_set))))
    train_set = labeled(train_set)
    if len(train_set) == 0:
        p.error(f"no labeled training image to probe on (--train-subset {subset})")
    torch.manual_seed(0)
    model = AMDIM(spec.image_size, run["ndf"], run["n_rkhs"], run["n_depth"], run["use_bn"])
    if not args.random_init:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            p.error(f"checkpoint {args.checkpoint}: its weights do not fit the model its arguments describe "
                    f"({cli.first_complaint(e)})")
    model.to(args.device)
    warm_up(model, test_set, args.device)
    acc = linear_probe(*drop_unlabeled(*encode(model, train_set, args.device)),
                       *encode(model, test_set, args.device), spec.n_classes, args.epochs)
    which = "randomly initialised encoder" if args.random_init else f"encoder of {args.checkpoint}"
    print(f"linear probe on frozen r1 ({which}), {run['dataset']} test accuracy: {acc:.4f}")
    return acc


if __name__ == "__main__":
    main()
