"""Every backend on targets past 2^31 elements (GPU), where an int32 offset would wrap, and
on more target columns than one launch's grid axis holds (GPU); the zero-padded problems
that make such sizes checkable (tests/padded.py), on the CPU."""
import math

import pytest
import torch

from amdim_kernels import available_backends, nce_loss, settings
from padded import assert_zero_padded_matches_truth, make_zero_padded_case, zero_padded_truth
from truth import EXTRA_TOL, KERNEL_OPTIONS, truth_of

CPU_BACKENDS = available_backends("cpu")


@pytest.mark.parametrize("layout", ["contiguous", "feature-map"])
@pytest.mark.parametrize("options", KERNEL_OPTIONS, ids=str)
def test_zero_padded_truth_is_the_spec(options, layout):
    """The folded truth equals spec_loss_f64 on the whole problem (float64), every zero
    column's gradient included."""
    pc = make_zero_padded_case(4, 6, 3, 5, 12, dtype=torch.float64, trg_layout=layout, **options)
    loss, reg, d_src, d_tail, d_zero = zero_padded_truth(pc)
    whole = truth_of(pc.case)  # outputs_and_grads draws the same upstream weight
    for name, got, want in (("loss", loss, whole[0]), ("reg", reg, whole[1]), ("d src", d_src, whole[2]),
                            ("d tail", d_tail, whole[3][pc.zero_images:])):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15, msg=name)
    torch.testing.assert_close(whole[3][:pc.zero_images], d_zero.expand(pc.zero_images, 5, 12), rtol=1e-12,
                               atol=1e-15)
    assert d_zero.abs().max() > 0  # zero columns are negatives: their gradient is not zero


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("options", [dict(), dict(tclip=None, reduction="none")], ids=str)
def test_backends_on_a_zero_padded_problem(backend, options):
    pc = make_zero_padded_case(5, 40, 4, 7, 24, **options)
    assert_zero_padded_matches_truth(pc, backend, tol=1e-4)


class _GradientOneImageOn(torch.autograd.Function):
    """Identity forward; the backward moves each image's gradient one image further on, as
    a write through a wrapped offset would misplace it."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.roll(grad, 1, 0)


def _misplacing_loss(src, trg, pos_idx, **kwargs):
    return nce_loss(src, _GradientOneImageOn.apply(trg), pos_idx, **kwargs)


def test_the_check_catches_a_misplaced_gradient():
    """The same values, with d trg written one image off: the check fails."""
    pc = make_zero_padded_case(3, 10, 2, 3, 8)
    with pytest.raises(AssertionError, match="d trg"):
        assert_zero_padded_matches_truth(pc, "reference", tol=1e-4, loss_fn=_misplacing_loss)


# Past 2^31 elements: N = 5 sources, L = 49, D = 2048 and 21,400 zero images put every
# tail image's features beyond element 2^31 of trg (4.3 GB at 2 bytes, 8.6 GB at 4).
N, L, D, TAIL = 5, 49, 2048, 24
ZERO_IMAGES = math.ceil(2 ** 31 / (L * D))


def _gpu_paths() -> list[str]:
    """backend:path for each score path of each GPU backend built here."""
    paths = []
    if "triton" in available_backends("cuda"):
        paths += ["triton:tma", "triton:pointers"]
    if "cuda" in available_backends("cuda"):
        paths += ["cuda:cublas", "cuda:mma"]
    return paths


def _cases() -> list[tuple[str, torch.dtype, str]]:
    """(backend:path, dtype, trg layout): each score path of each GPU backend on bf16 and
    float16 targets, on the trainer's feature-map layout, and float32 (cuBLAS scores)."""
    paths = _gpu_paths()
    cases = [(path, dtype, layout) for path in paths for dtype, layout in
             ((torch.bfloat16, "contiguous"), (torch.float16, "contiguous"), (torch.bfloat16, "feature-map"))]
    cases += [(path, torch.float32, "contiguous") for path in ("triton:gemm", "cuda:cublas")
              if path.split(":")[0] in available_backends("cuda")]
    return cases or [("none", torch.float32, "contiguous")]


def _path(impl: str):
    """Pins the score path of `impl` (backend:path) for the calls inside."""
    backend, how = impl.split(":")
    if backend == "cuda":
        return settings(cuda_scores=how)
    return settings(triton_scores="gemm") if how == "gemm" else settings(triton_scores="fused", triton_loads=how)


@pytest.mark.gpu
@pytest.mark.xdist_group("past_2_31")  # 9-17 GB of GPU memory each: one at a time under xdist
@pytest.mark.parametrize("impl,dtype,layout", _cases(), ids=lambda v: str(v).replace("torch.", ""))
def test_targets_past_2_31_elements(impl, dtype, layout):
    if impl == "none":
        pytest.skip("no GPU backend is available")
    pc = make_zero_padded_case(N, ZERO_IMAGES, TAIL, L, D, dtype=dtype, device="cuda", trg_layout=layout)
    assert pc.case.trg.numel() > 2 ** 31 and pc.zero_images * L * D >= 2 ** 31
    with _path(impl):
        assert_zero_padded_matches_truth(pc, impl.split(":")[0], tol=2 * EXTRA_TOL[dtype])


# More columns than a grid axis holds: the backward kernels' grids are (row blocks, column
# tiles of a chunk), and CUDA caps the second axis at 65,535. 70M columns in 8 chunks would be
# 68k tiles of 128; the chunk plans take more chunks instead. L = 1 and D = 16 keep trg at
# 2.2 GB of bf16.
WIDE_ZERO_IMAGES = 70_000_000


@pytest.mark.gpu
@pytest.mark.xdist_group("past_2_31")  # several GB each: one at a time under xdist
@pytest.mark.parametrize("impl", _gpu_paths() or ["none"])
def test_more_column_tiles_than_a_grid_axis_holds(impl):
    if impl == "none":
        pytest.skip("no GPU backend is available")
    pc = make_zero_padded_case(3, WIDE_ZERO_IMAGES, TAIL, 1, 16, dtype=torch.bfloat16, device="cuda")
    with _path(impl):
        assert_zero_padded_matches_truth(pc, impl.split(":")[0], tol=2 * EXTRA_TOL[torch.bfloat16])
