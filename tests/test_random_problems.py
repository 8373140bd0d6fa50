"""Every fused backend against the float64 truth on problems drawn at random each run.

The other tests fix their shapes and options and draw only the values. Here the shape, the
dtype, the options, the layouts and pos_idx are drawn too, from a seed drawn fresh each
run, so each CI run tries combinations no test names. A failure's test id carries the
seed and the problem; `AMDIM_TEST_SEED=<seed>` draws the same problems again.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from truth import assert_matches_truth, backends_here, float64_truth, make_case

# conftest.py draws it once per run and passes it to pytest-xdist's workers, which must all
# collect the same problems
SEED = int(os.environ["AMDIM_TEST_SEED"])
PROBLEMS = 10  # per backend and device: 3-23 s in all here, most of it Triton's interpreter

# Sizes around the kernels' blocks (row blocks of 16-128, column tiles of 32-128, K steps
# of 16-64) and the edge cases (one row, one image, one location, one feature).
NS = [1, 2, 5, 16, 33, 64, 65, 129]
MS = [1, 2, 3, 9, 17, 40]
LS = [1, 2, 7, 25, 49, 60]
DS = [1, 3, 16, 17, 33, 64, 80]


def draw(rng: random.Random) -> dict:
    """One problem: make_case's arguments."""
    n, m = rng.choice(NS), rng.choice(MS)
    first = rng.randint(0, m - n) if n <= m else None
    return dict(
        n=n, m=m, l=rng.choice(LS), d=rng.choice(DS),
        dtype=rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16]),
        # a run of images, as the trainer's rank * N + arange(N), or any indices with repeats
        pos=torch.arange(first, first + n) if first is not None and rng.random() < 0.5 else "random",
        spread=rng.choice([0.5, 2.0, 6.0]),
        src_layout=rng.choice(["contiguous", "transposed"]),
        trg_layout=rng.choice(["contiguous", "feature_map"]),
        tclip=rng.choice([None, 0.5, 5.0, 20.0, 50.0]),
        reg_weight=rng.choice([0.0, 0.05, 1.0]),
        scale=rng.choice([None, 0.1, 1.0]),
        reduction=rng.choice(["mean", "none"]),
    )


def _describe(problem: dict) -> str:
    """The problem as a test id: seed, N x M x L x D, dtype, pos_idx, spread, layouts, options."""
    pos = problem["pos"] if isinstance(problem["pos"], str) else f"run{int(problem['pos'][0])}"
    shape = "x".join(str(problem[k]) for k in "nmld")
    options = "-".join(f"{k}{problem[k]}" for k in ("tclip", "reg_weight", "scale", "reduction"))
    return (f"seed{SEED}-{shape}-{str(problem['dtype'])[6:]}-pos_{pos}-spread{problem['spread']}-"
            f"src_{problem['src_layout']}-trg_{problem['trg_layout']}-{options}")


def _cases():
    rng = random.Random(SEED)
    for here in backends_here(fused_only=True):
        backend, device = here.values
        for _ in range(PROBLEMS):
            problem = draw(rng)
            yield pytest.param(backend, device, problem, marks=here.marks, id=f"{backend}-{device}-{_describe(problem)}")


@pytest.mark.parametrize("backend, device, problem", list(_cases()))
def test_random_problem_matches_the_truth(backend, device, problem):
    """The criterion of tests/truth.py: the backend's error against the float64 truth is no
    larger than the reference's in the same dtype, plus what it rounds differently."""
    problem = dict(problem)
    n, m, l, d, dtype = (problem.pop(k) for k in ("n", "m", "l", "d", "dtype"))
    case = make_case(n, m, l, d, dtype=dtype, device=device, **problem)
    assert_matches_truth(case, dtype, backend, truth=float64_truth(case))
