"""Atomic checkpoints that let a run continue exactly: weights, optimiser, scheduler, every
RNG, epoch and step.

A checkpoint holds only tensors and plain Python values (RNG states as tensors, lists and
ints; the run's arguments as a dict), so it is read with torch.load(weights_only=True): a
file from elsewhere cannot run code when it is loaded.
"""
from __future__ import annotations

import glob
import os
import pickle
import random
import re
import warnings

import numpy as np
import torch

# What amdim.train writes; a file without them is someone else's.
KEYS = ("model", "evaluator", "optimizer", "scheduler", "scaler", "epoch", "step", "world", "rng", "args")


class Unreadable(ValueError):
    """A file that is not a checkpoint of amdim.train; the message says why."""


def rng_state() -> dict:
    """This process's RNG states as tensors and plain values."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(mt), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _temporary(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


def save(path: str, state: dict) -> None:
    """Write to a temporary file, flush it to disk, then rename: the file at `path` is always
    a whole checkpoint, whenever the process is killed. A failed write removes its temporary."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: str) -> list[str]:
    """Delete the temporaries that writers of `path` killed mid-write left behind: those of
    processes no longer running. Returns what it deleted."""
    removed = []
    for tmp in glob.glob(glob.escape(path) + ".tmp*"):
        pid = tmp[len(path) + len(".tmp"):]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            os.remove(tmp)
            removed.append(tmp)
    return removed


def _why_unreadable(error: Exception) -> str:
    text = str(error).strip()
    unsafe = re.search(r"GLOBAL [\w.]+", text)
    if unsafe:
        return (f"it holds Python objects other than tensors and plain values ({unsafe.group()}), "
                "which are not loaded: loading them could run code")
    if isinstance(error, OSError):
        return error.strerror or text
    if isinstance(error, EOFError):
        return "the file is empty or cut short"
    if isinstance(error, pickle.UnpicklingError):
        return "not a PyTorch checkpoint"
    first = text.splitlines()[0].split(". ")[0] if text else type(error).__name__
    return f"truncated or corrupted ({first})"


def load(path: str) -> dict:
    """A checkpoint of amdim.train, on the CPU; raises Unreadable (message without the flag,
    which the caller names) for a missing file, a damaged one or someone else's."""
    if not os.path.exists(path):
        raise Unreadable("no such file")
    try:
        with warnings.catch_warnings():
            # plain pickles of other protocols make torch warn before it refuses them
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds for files it cannot read
        raise Unreadable(_why_unreadable(e)) from e
    missing = [k for k in KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise Unreadable(f"not a checkpoint of amdim.train (it lacks {', '.join(map(repr, missing))})")
    if not (isinstance(state["args"], dict) and isinstance(state["rng"], list) and isinstance(state["step"], int)):
        raise Unreadable("not a checkpoint of amdim.train (its args, rng or step are of other types)")
    return state
