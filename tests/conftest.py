import os

import pytest
import torch

# Without a GPU the Triton kernels run on the CPU through Triton's interpreter; it must be
# switched on before any kernel is decorated, i.e. before amdim_kernels.triton_nce is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
