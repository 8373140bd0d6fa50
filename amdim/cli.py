"""Command-line checks shared by amdim.train and amdim.evaluate.

A bad value is refused before any work starts, in one line that names its flag and says what
the flag needs, with exit code 2 (argparse's convention): argparse types refuse numbers out of
range, and the checks below refuse devices, folders and backends that cannot serve the run.
Values that can only be judged later (a dataset smaller than a batch) raise UsageError, which
the programs report the same way.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile

import torch

from amdim_kernels import available_backends
from amdim_kernels.registry import unavailable_reason


class UsageError(ValueError):
    """A command-line value found wrong after parsing; its message names the flag."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `prog: error: message`, without the usage
    block (the trainer's usage runs to a dozen lines; --help shows it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def integer(minimum: int):
    """An argparse type: an int of at least `minimum`."""
    what = {0: "an integer >= 0", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"needs {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"needs {what}, got {value}")
        return value

    return parse


def real(minimum: float, *, above: bool):
    """An argparse type: a finite float > `minimum` (above) or >= `minimum`."""
    what = f"a finite number {'>' if above else '>='} {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"needs {what}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (above and value == minimum):
            raise argparse.ArgumentTypeError(f"needs {what}, got {text}")
        return value

    return parse


def device_problem(text: str) -> str | None:
    """Why --device `text` cannot run here, or None if it can."""
    try:
        device = torch.device(text)
    except RuntimeError:
        return f"--device {text!r} is not a device: expected cpu, cuda or cuda:INDEX"
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"--device {text}: expected a cpu or cuda device"
    if not torch.cuda.is_available():
        return f"--device {text}: no CUDA GPU is available here (use --device cpu)"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"--device {text}: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
    return None


def backend_problem(backend: str, device: str) -> str | None:
    """Why --backend `backend` cannot run on --device `device` (a valid one), or None."""
    if backend == "auto" or backend in available_backends(device):
        return None
    return f"--backend {backend} cannot run on --device {device}: {unavailable_reason(backend, torch.device(device))}"


def folder_problem(flag: str, path: str) -> str | None:
    """Why `path` cannot be the folder a run writes to, or None; creates it if missing."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return f"{flag} {path}: cannot write there ({e.strerror or e})"
    return None


def first_complaint(error: Exception) -> str:
    """The first of load_state_dict's complaints, which it lists one a line after a heading."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) < 2:
        return lines[0] if lines else type(error).__name__
    more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
    return lines[1].rstrip(".") + more
