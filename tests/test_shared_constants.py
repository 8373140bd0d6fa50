"""The constants and the chunking rule that the Triton kernels (amdim_kernels/shared_constants.py)
and the C++/CUDA kernels (csrc/nce_shared.h) share agree, read from the built extension."""
import random

import pytest

from amdim_kernels import registry, shared_constants

EXTENSION = registry.extension_state().module

pytestmark = pytest.mark.skipif(EXTENSION is None, reason="the compiled extension is not built")

NAMES = ("CHUNK_PARTS", "MIN_CHUNK_BYTES", "GRID_Y_MAX", "CUDA_COLS_PER_BLOCK", "MAX_SHIFT_TCLIP", "SCALE_LOG2_TARGET",
         "SCALE_MAX_EXP")


def test_the_extension_has_the_same_constants():
    assert EXTENSION.SHARED_CONSTANTS == {name: getattr(shared_constants, name) for name in NAMES}


def test_the_chunking_rule_is_the_same_on_both_sides():
    rng = random.Random()
    cases = [(1, 1, 0, 1, 1, 0, 1), (200, 49, 4 * 200 + 2 * 200, 4 * 132 * 64, 64, 8 << 20, 8),
             (3, 10**7, 6, 1, 128, 8 << 20, 8)]  # the grid's cap binds
    for _ in range(500):
        cases.append((rng.randint(1, 5000), rng.randint(1, 300), rng.randint(0, 1 << 14), rng.randint(1, 1 << 16),
                      rng.choice([32, 64, 128, 256]), rng.choice([0, 1 << 10, 8 << 20]), rng.randint(1, 20)))
    for case in cases:
        assert EXTENSION.images_per_chunk(*case) == shared_constants.images_per_chunk(*case), case


def test_the_settings_default_chunks_is_the_shared_one():
    from amdim_kernels import Settings

    assert Settings().triton_chunks == shared_constants.CHUNK_PARTS
