"""Argument checks the benchmark programs share, as the trainer's (amdim.cli): a bad value is
refused in one line that names its flag, `prog: error: message`, exit code 2, before any
work starts."""
from __future__ import annotations

import argparse

import torch

from amdim import cli

Parser = cli.Parser  # errors in one line, without the usage block
integer = cli.integer  # an argparse type: an int of at least its minimum


def check_device(ap: argparse.ArgumentParser, device: str) -> None:
    """The one-line error where --device cannot run here."""
    if (why := cli.device_problem(device)) is not None:
        ap.error(why)


def check_folder(ap: argparse.ArgumentParser, flag: str, path: str) -> None:
    """The one-line error where `path` (created if missing) cannot take the files a run writes."""
    if (why := cli.folder_problem(flag, path)) is not None:
        ap.error(why)


def require_gpu(ap: argparse.ArgumentParser, what: str) -> None:
    """The one-line error for a program (or mode) that times GPU kernels, where there is no GPU."""
    if not torch.cuda.is_available():
        ap.error(f"{what} needs a CUDA GPU; none is available here (torch.cuda.is_available() is False)")
