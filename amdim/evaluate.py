"""Linear probe on frozen features: encode the train and test sets with a checkpoint's encoder
(eval mode, test-time transform), train a fresh linear classifier on r1 and print its test
accuracy.

    python -m amdim.evaluate runs/amdim/last.pt
    python -m amdim.evaluate runs/amdim/last.pt --random-init   # the same probe on an untrained encoder
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, Subset

from . import checkpoint
from .data import build_datasets, test_transform
from .model import AMDIM


@torch.no_grad()
def encode(model: AMDIM, dataset, device, batch_size: int = 256, workers: int = 2):
    feats, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        feats.append(model(x.to(device))[0].float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


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


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--random-init", action="store_true", help="probe the same architecture, untrained")
    p.add_argument("--data-root", default=None, help="default: the training run's")
    p.add_argument("--train-subset", type=int, default=None, help="default: the training run's")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    state = checkpoint.load(args.checkpoint)
    run = state["args"]
    _, test_set, spec = build_datasets(run["dataset"], args.data_root or run["data_root"])
    train_set, _, _ = build_datasets(run["dataset"], args.data_root or run["data_root"])
    train_set.transform = test_transform(spec)  # features of un-augmented images
    subset = run["train_subset"] if args.train_subset is None else args.train_subset
    if subset:
        train_set = Subset(train_set, range(min(subset, len(train_set))))
    torch.manual_seed(0)
    model = AMDIM(spec.image_size, run["ndf"], run["n_rkhs"], run["n_depth"], run["use_bn"])
    if not args.random_init:
        model.load_state_dict(state["model"])
    model.to(args.device).eval()
    acc = linear_probe(*encode(model, train_set, args.device), *encode(model, test_set, args.device),
                       spec.n_classes, args.epochs)
    which = "randomly initialised encoder" if args.random_init else f"encoder of {args.checkpoint}"
    print(f"linear probe on frozen r1 ({which}), {run['dataset']} test accuracy: {acc:.4f}")
    return acc


if __name__ == "__main__":
    main()
