import os
import random

import pytest
import torch

# Without a GPU the Triton kernels run on the CPU through Triton's interpreter; it must be
# switched on before any kernel is decorated, i.e. before amdim_kernels.triton_nce is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    """One seed per run for the tests that draw their problems (test_random_problems.py),
    unless AMDIM_TEST_SEED is set; xdist's workers inherit it from this process, so they
    collect the same problems."""
    if not hasattr(config, "workerinput"):  # the main process, not an xdist worker
        os.environ.setdefault("AMDIM_TEST_SEED", str(random.SystemRandom().randrange(2 ** 31)))
    else:
        # the workers share the cores: each takes its share of torch's threads, so that two
        # workers' parallel regions do not oversubscribe the cores and wait on each other's
        # descheduled threads (tests that compare thread counts set them themselves)
        workers = int(config.workerinput["workercount"])
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
