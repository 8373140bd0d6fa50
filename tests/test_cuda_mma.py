"""backend="cuda" with its fused WMMA kernels (settings(cuda_scores="mma"), csrc/nce_cuda_mma.cu)
against the float64 truth. They take float16 and bfloat16 inputs; float32 stays on cuBLAS.

The shapes cover both operand loaders (16-byte cp.async when D % 8 == 0, element by element
otherwise), N off the 64-row tile, M*L off the 128-column tile, several splits per row block,
and the trainer's strided target (copied image chunk by image chunk)."""
import pytest
import torch

from amdim_kernels import available_backends, nce_loss, settings
from truth import assert_matches_truth, float64_truth, make_case, outputs_and_grads

HAS_CUDA_BACKEND = "cuda" in available_backends("cuda") if torch.cuda.is_available() else False
needs_cuda_backend = pytest.mark.skipif(not HAS_CUDA_BACKEND, reason="backend 'cuda' is not built or no GPU")


@pytest.fixture
def mma():
    with settings(cuda_scores="mma"):
        yield


DTYPES = [torch.bfloat16, torch.float16]
SHAPES = [  # (N, M, L, D, pos)
    (7, 7, 49, 64, "arange"),  # vector loads
    (9, 5, 25, 20, "random"),  # element loads (D % 8 != 0), one tile
    (1, 5, 3, 33, "random"),  # N = 1
    (70, 70, 25, 24, "arange"),  # two row blocks, 14 column tiles
    (130, 40, 49, 136, "random"),  # three row blocks, M*L = 1960 off the tile
    (37, 37, 1, 256, "arange"),  # InfoNCE layout
]


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("options", [dict(), dict(tclip=None), dict(tclip=3.0, reg_weight=0.2, scale=0.5,
                                                                     reduction="none")], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mma_matches_truth(shape, dtype, options, mma):
    n, m, l, d, pos = shape
    assert_matches_truth(make_case(n, m, l, d, pos=pos, dtype=dtype, device="cuda", **options), dtype, "cuda")


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("layout_d", [(16, "vector"), (19, "element")], ids=str)
def test_mma_strided_target(layout_d, mma):
    d = layout_d[0]
    case = make_case(6, 6, 25, d, trg_layout="feature_map", dtype=torch.bfloat16, device="cuda", reduction="none")
    assert not case.trg.is_contiguous()
    assert_matches_truth(case, torch.bfloat16, "cuda")


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("grad_of", [("src",), ("trg",)], ids=str)
def test_mma_partial_requires_grad(grad_of, mma):
    case = make_case(5, 5, 3, 16, dtype=torch.float16, device="cuda")
    assert_matches_truth(case, torch.float16, "cuda", grad_of=grad_of)


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(128, 1024, 49, 256), (200, 200, 49, 1024), (129, 67, 49, 520)], ids=str)
def test_mma_large(shape, dtype, mma):
    n, m, l, d = shape
    case = make_case(n, m, l, d, pos="arange" if n == m else "random", dtype=dtype, device="cuda", spread=3.0)
    assert_matches_truth(case, dtype, "cuda", truth=float64_truth(case))


@pytest.mark.gpu
@needs_cuda_backend
def test_mma_is_deterministic_and_agrees_with_cublas(mma):
    case = make_case(70, 70, 25, 24, dtype=torch.bfloat16, device="cuda", reduction="none")
    first = outputs_and_grads(nce_loss, case, backend="cuda")
    again = outputs_and_grads(nce_loss, case, backend="cuda")
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    with settings(cuda_scores="cublas"):
        other = outputs_and_grads(nce_loss, case, backend="cuda")
    torch.testing.assert_close(first[0], other[0], rtol=1e-4, atol=1e-4)  # float32 statistics either way


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("tclip", [20.0, None])
def test_mma_non_finite_input_gives_nan(tclip, mma):
    case = make_case(4, 4, 3, 16, dtype=torch.bfloat16, device="cuda", tclip=tclip, reduction="none")
    case.src[1, 3] = float("nan")
    loss, reg = nce_loss(case.src, case.trg, case.pos_idx, **case.kwargs(), backend="cuda")
    assert torch.isnan(loss[1]).all() and torch.isnan(reg)
    assert not torch.isnan(loss[[0, 2, 3]]).any()


@pytest.mark.gpu
@needs_cuda_backend
def test_bad_score_path_is_refused_by_the_op():
    """Settings refuses a bad cuda_scores before any work (tests/test_settings.py); the op,
    called directly, refuses it too."""
    case = make_case(4, 4, 3, 16, dtype=torch.bfloat16, device="cuda")
    pos_idx = torch.arange(4, device="cuda")
    with pytest.raises(RuntimeError, match="cuda_scores must be 'auto', 'cublas' or 'mma', got 'wgmma'"):
        torch.ops.amdim_kernels.nce_fwd(case.src, case.trg, pos_idx, 20.0, 0.25, 0.05, "wgmma")


@pytest.mark.gpu
@needs_cuda_backend
def test_auto_takes_mma_on_small_16_bit_problems_and_cublas_for_float32():
    """Unpinned ("auto"), a per-GPU-sized bf16 problem goes through the WMMA kernels and a
    float32 one through cuBLAS: each equals its pinned path bitwise (both are deterministic)."""
    for dtype, path in ((torch.bfloat16, "mma"), (torch.float32, "cublas")):
        case = make_case(37, 23, 25, 72, dtype=dtype, device="cuda", pos="random", reduction="none")
        with settings(cuda_scores="auto"):
            auto = outputs_and_grads(nce_loss, case, backend="cuda")
        with settings(cuda_scores=path):
            pinned = outputs_and_grads(nce_loss, case, backend="cuda")
        for a, b in zip(auto, pinned):
            assert torch.equal(a, b)
