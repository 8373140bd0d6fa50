"""backend="triton" against the float64 truth, on the CPU interpreter (CI) and on a GPU.
The criterion is tests/truth.py's assert_matches_truth."""
import math

import pytest
import torch

from amdim_kernels import available_backends, nce_loss
from truth import (
    FAR_BELOW_TCLIP, KERNEL_OPTIONS, ODD_LAYOUTS, assert_captured_graph_matches_eager,
    assert_cuda_graph_replay_matches_eager, assert_float16_g_overflows_only_with_the_gradient,
    assert_float16_loss_scale, assert_gradients_of_each_output, assert_matches_truth,
    assert_odd_layout_matches_reference, far_below_tclip_case, far_below_tclip_tol, float64_truth, make_case,
    outputs_and_grads, rel_err)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    "triton" not in available_backends(DEVICE), reason="Triton is not available here"
)


def run_case(case, dtype, grad_of=("src", "trg"), truth=None):
    assert_matches_truth(case, dtype, "triton", grad_of=grad_of, truth=truth)


@pytest.fixture(params=["fused", "gemm"])
def strategy(request):
    import amdim_kernels

    with amdim_kernels.settings(triton_scores=request.param):
        yield request.param


SHAPES = [  # (N, M, L, D, pos): odd D, L in 1/25/49/70, M*L off the block size, N = 1, M = 1
    (1, 5, 3, 33, "random"),
    (7, 7, 49, 33, "arange"),
    (5, 9, 25, 40, "random"),
    (37, 37, 1, 70, "arange"),
    (4, 1, 5, 16, "random"),
    (13, 6, 25, 20, "random"),
    (40, 40, 25, 24, "arange"),  # several splits in the forward and several chunks in the backward
    (3, 4, 70, 9, "random"),  # L > 64: the merge kernel's losses take two blocks of locations
]
@pytest.mark.parametrize("options", KERNEL_OPTIONS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_float32(shape, options, strategy):
    n, m, l, d, pos = shape
    run_case(make_case(n, m, l, d, pos=pos, device=DEVICE, **options), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tclip, depth", FAR_BELOW_TCLIP, ids=str)
def test_triton_scores_far_below_tclip(tclip, depth, dtype, strategy):
    """Before the running maximum past MAX_SHIFT_TCLIP, tclip = 100 gave a loss of 0 and
    NaN gradients here, and tclip = 1e30 lost every score to the clip's rounding. Several
    splits and chunks: the running maxima are merged."""
    case = far_below_tclip_case(40, 40, 25, 24, tclip, depth, pos="arange", device=DEVICE, dtype=dtype)
    assert_matches_truth(case, dtype, "triton", tol=far_below_tclip_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(7, 7, 49, 33, "arange"), (9, 5, 25, 20, "random")], ids=str)
def test_triton_half_precision(shape, dtype):
    n, m, l, d, pos = shape
    run_case(make_case(n, m, l, d, pos=pos, dtype=dtype, device=DEVICE), dtype)


@pytest.mark.parametrize("used", ["loss", "reg", "both"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_gradients_of_each_output(reduction, used):
    assert_gradients_of_each_output("triton", DEVICE, reduction, used)


@pytest.mark.parametrize("loss_scale", [2.0 ** -4, 1.0, 2.0 ** 16])
def test_triton_float16_gradients_under_a_loss_scale(loss_scale):
    """float16 G is stored times a power of two that the device finds from the gradient's
    own bound (grad_rows.gradient_scale). Left unscaled, G's error on this case is 8e-3 at 2^-4
    (measured under the interpreter)."""
    assert_float16_loss_scale("triton", loss_scale, DEVICE)


def test_triton_float16_g_overflows_only_with_the_gradient():
    assert_float16_g_overflows_only_with_the_gradient("triton", DEVICE)


@pytest.mark.parametrize("need_trg", [False, True])
def test_triton_gradient_scale_is_the_largest_power_that_fits(need_trg):
    """2^k is the largest power of two with bound * 2^k <= 2^15, the bound taken over G's
    entries (grad_rows.nce_grad_scale_kernel) and, with need_trg, its growth through
    G^T @ src; a row (or a column of src) whose bound is not finite is left out of it (a
    poisoned row's G is NaN at any scale), and a zero gradient gives a finite 2^100."""
    from amdim_kernels.triton_nce import grad_rows

    n, l, d, scale = 37, 25, 70, 0.3
    src = torch.randn(n, d, device=DEVICE, dtype=torch.float16)
    g_pos, r, reg_coef = torch.randn(n, l, device=DEVICE), torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    sq = torch.rand(n, device=DEVICE) * 100

    def bound_of(src, g_pos, r, reg_coef, sq):
        rows = torch.maximum(g_pos.abs().amax(1), scale * (r.abs() + reg_coef.abs() * sq.sqrt())).double()
        bound = rows[rows.isfinite()].max()
        if need_trg:
            cols = src.double().abs().sum(0)
            bound *= cols[cols.isfinite()].max().clamp_min(1)
        return bound

    def assert_fits(*args):
        g_scale, inverse = grad_rows.gradient_scale(*args, scale, need_trg).tolist()
        assert g_scale * inverse == 1 and math.log2(g_scale).is_integer()
        bound = bound_of(*args)
        assert bound * g_scale <= 2 ** 15 < bound * g_scale * 2

    assert_fits(src, g_pos, r, reg_coef, sq)
    # a NaN (a poisoned row) or an infinite upstream gradient in a row, or a non-finite source
    for x in (r, sq) + ((src,) if need_trg else ()):
        for bad in (float("nan"), float("inf")):
            x_bad = x.clone()
            x_bad.view(-1)[x_bad.numel() // 2] = bad
            assert_fits(*[x_bad if y is x else y for y in (src, g_pos, r, reg_coef, sq)])
    zero = torch.zeros_like(r)
    assert grad_rows.gradient_scale(src, g_pos * 0, zero, zero, sq, scale, need_trg)[0].item() == 2.0 ** 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(7, 7, 49, 33, "arange"), (13, 6, 25, 20, "random"), (37, 37, 1, 70, "arange"),
                                   (3, 4, 70, 9, "random"), (40, 40, 25, 24, "arange")], ids=str)
def test_triton_positives_are_the_raw_scores(shape, dtype, strategy):
    """The forward's masked launch copies every positive's raw score out of the tile that
    holds it (three bfloat16 parts through a selection product): each one is there, to
    float32's accuracy. The bound: 1e-5 (about 100 float32 ulps) of Cauchy-Schwarz's
    bound on |a|; a positive never written would be whatever the buffer held."""
    import amdim_kernels
    from amdim_kernels.triton_nce import config, forward

    n, m, l, d, pos = shape
    case = make_case(n, m, l, d, pos=pos, dtype=dtype, device=DEVICE)
    pos_idx = torch.arange(n, device=DEVICE) if case.pos_idx is None else case.pos_idx
    scale = d ** -0.5
    options = config.CallOptions.of(amdim_kernels.current_settings(), dtype)
    stats = forward.forward(case.src, case.trg, pos_idx, 20.0, scale, 0.05, options)
    src, own = case.src.double(), case.trg[pos_idx].double()
    truth = scale * torch.einsum("nd,nld->nl", src, own)
    bound = scale * src.norm(dim=1)[:, None] * own.norm(dim=2)
    assert ((stats.a_pos.double() - truth).abs() <= 1e-5 * bound).all()


def test_masked_tiles_must_divide_the_sorting_tiles():
    """The masked launch's narrower tiles must not straddle two of the tiles both launches
    sort by (forward.nce_fwd_kernel's PLAIN_J)."""
    from amdim_kernels.triton_nce import config

    assert config.TileConfig(128, 128, 64, 8, 3, masked_block_j=32).masked.block_j == 32
    with pytest.raises(ValueError, match="masked_block_j must divide block_j = 128, got 48"):
        config.TileConfig(128, 128, 64, 8, 3, masked_block_j=48)


@pytest.mark.parametrize("column_bytes", [0, 256, 4096])
@pytest.mark.parametrize("n, m, l", [(200, 200, 49), (128, 1024, 49), (1024, 1024, 49), (5, 3, 7), (64, 1, 1)])
def test_chunks_are_even_whole_images(n, m, l, column_bytes):
    """The chunk loops' columns: whole images, consecutive, covering all M*L columns, in as
    many chunks as the rules give (about 1/CHUNK_PARTS of the images, no chunk's buffers
    needlessly under the floor, enough columns to fill the GPU), the last short of the
    others by fewer images than there are chunks."""
    from amdim_kernels.triton_nce import config

    cfg = config.TileConfig(128, 128, 64, 8, 3)
    floor = config.MIN_CHUNK_BYTES
    c_max = config.chunk_columns(n, m, l, cfg, 132, column_bytes, floor)
    chunks = list(config.chunk_ranges(m, l, c_max))
    fill = config.cdiv(132, config.cdiv(n, 128)) * 128
    parts = min(config.CHUNK_PARTS, max(1, config.cdiv(m * l * column_bytes, floor)))
    wanted = min(m, max(config.cdiv(m, parts), config.cdiv(fill, l)))
    assert len(chunks) == config.cdiv(m, wanted)
    assert [c0 for c0, _ in chunks] == [sum(c for _, c in chunks[:i]) for i in range(len(chunks))]
    assert sum(c for _, c in chunks) == m * l and all(c % l == 0 for _, c in chunks)
    assert all(c == c_max for _, c in chunks[:-1]) and c_max - chunks[-1][1] < len(chunks) * l


@pytest.mark.parametrize("n, m, l", [(5, 70_000_000, 1), (2, 2_000_000, 49), (1024, 1_500_000, 49)])
def test_chunks_fit_the_grid_axis(n, m, l):
    """A chunk's G launch has one program per column tile on the grid's second axis, which
    CUDA caps at 65,535: past 67M columns the plan takes more chunks than CHUNK_PARTS rather
    than a launch that fails."""
    from amdim_kernels.triton_nce import config

    cfg = config.TileConfig(128, 128, 64, 8, 3)
    c_max = config.chunk_columns(n, m, l, cfg, 132, 2 * n, config.MIN_CHUNK_BYTES)
    assert config.cdiv(c_max, cfg.block_j) <= config.GRID_Y_MAX and c_max % l == 0
    assert config.cdiv(m * l, c_max) > config.CHUNK_PARTS


@pytest.mark.parametrize("grid_y_max", [1, 3])
def test_triton_backward_under_a_small_grid_axis_cap(grid_y_max, monkeypatch):
    """With the grid's cap lowered to 1 or 3 column tiles, the backward takes chunks of one
    or a few images each and still gives the reference's gradients."""
    from amdim_kernels import shared_constants

    monkeypatch.setattr(shared_constants, "GRID_Y_MAX", grid_y_max)
    run_case(make_case(6, 9, 70, 24, pos="random", device=DEVICE), torch.float32)


@pytest.mark.parametrize("problem, dtype, chunks", [
    ("CIFAR", torch.bfloat16, 1), ("IMAGENET_4GPU", torch.bfloat16, 1), ("ONE_GPU_SHARE", torch.bfloat16, 2),
    ("SINGLE_GPU", torch.bfloat16, 8), ("SINGLE_GPU", torch.float32, 8), ("CIFAR", torch.float32, 2),
    ("SINGLE_GPU_FEATURE_MAP", torch.bfloat16, 8),
    # float16 G has the inputs' dtype, as bf16's (before: float32 G and features, 2 and 3 chunks)
    ("CIFAR", torch.float16, 1), ("ONE_GPU_SHARE", torch.float16, 2),
], ids=str)
def test_backward_chunks_of_amdim_problems(problem, dtype, chunks):
    """The backward's chunk counts on an H100 (132 SMs) for AMDIM's problems: the per-GPU ones
    take fewer, larger chunks than 1/CHUNK_PARTS (each chunk costs host time they wait on),
    no chunk's buffers over the floor where more chunks were allowed; the single-GPU one
    keeps CHUNK_PARTS. Buffers per column: G, cuBLAS's float32 scores for float32 ("gemm"),
    a contiguous copy of the features for feature-map targets."""
    from amdim_kernels.triton_nce import config
    from benchmarks import problems

    p = getattr(problems, problem)
    trg = torch.empty(p.m, p.l, p.d, dtype=dtype, device="meta")
    if p.trg_layout == "feature-map":
        trg = torch.empty(p.m, p.d, p.l, dtype=dtype, device="meta").transpose(1, 2)
    cfg = config.TileConfig(128, 128, 64, 8, 3)
    per_column = config.column_bytes(p.n, trg, config.default_score_strategy(dtype) == "gemm", backward=True)
    c_max = config.chunk_columns(p.n, p.m, p.l, cfg, 132, per_column, config.MIN_CHUNK_BYTES)
    assert len(list(config.chunk_ranges(p.m, p.l, c_max))) == chunks
    if chunks > 1 and chunks < config.CHUNK_PARTS:
        assert c_max * per_column <= config.MIN_CHUNK_BYTES + p.l * per_column


@pytest.mark.parametrize("src_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("options", KERNEL_OPTIONS, ids=str)
def test_triton_feature_map_layout(src_layout, options, strategy):
    """The trainer's layout: (M, D, H*W) feature maps seen as (M, L, D), stride L along D.
    The kernels read a contiguous copy of each chunk's images (several chunks here: 24
    images of 9 locations, a run of own images across chunk boundaries)."""
    case = make_case(10, 24, 9, 19, pos=7 + torch.arange(10), trg_layout="feature_map", src_layout=src_layout,
                     device=DEVICE, **options)
    assert case.trg.stride(2) != 1 and (case.src.stride(1) != 1) == (src_layout == "transposed")
    run_case(case, torch.float32)


# Sources whose own images are a run (the trainer's pos_idx on one rank): most score tiles
# then hold none of a row block's own images and take the kernels' unmasked path. With L = 8
# the interpreter's 64-column tiles start on image boundaries, and images 31..40 are the last
# image of one tile and the first of another: an off-by-one in the tile test shows.
RUNS = [(31, 10, 72, 8), (24, 24, 72, 9)]  # (first image, N, M, L)


@pytest.mark.parametrize("shuffle", [False, True], ids=["run", "shuffled"])
@pytest.mark.parametrize("run", RUNS, ids=str)
@pytest.mark.parametrize("options", KERNEL_OPTIONS, ids=str)
def test_triton_own_images_in_a_run(run, shuffle, options, strategy):
    first, n, m, l = run
    pos = first + torch.arange(n)
    if shuffle:
        pos = pos[torch.randperm(n)]
    run_case(make_case(n, m, l, 20, pos=pos, device=DEVICE, **options), torch.float32)


# The fused K-loop's operands as tensor descriptors (TMA, the default on sm_90 and newer):
# the copy engine's zero fill stands in for the masks past N, the chunk's end and D.
# (N, M, L, D): rows off the row block, columns off the column tile, D off BLOCK_K (24, 40),
# several forward splits and backward chunks, and one of a single location.
TMA_SHAPES = [(7, 7, 49, 32), (40, 40, 25, 24), (13, 6, 25, 40), (37, 37, 1, 16)]


@pytest.fixture
def tma_loads(monkeypatch):
    """Pin TMA operands (fused strategy) and count the descriptors the launchers build."""
    import amdim_kernels
    from amdim_kernels.triton_nce import operands

    built, make = [], operands.TensorDescriptor

    def descriptor(*args):
        built.append(args)
        return make(*args)

    monkeypatch.setattr(operands, "TensorDescriptor", descriptor)
    with amdim_kernels.settings(triton_scores="fused", triton_loads="tma"):
        yield built


@pytest.mark.parametrize("options", KERNEL_OPTIONS, ids=str)
@pytest.mark.parametrize("shape", TMA_SHAPES, ids=str)
def test_triton_tma_operands(shape, options, tma_loads):
    n, m, l, d = shape
    pos = "arange" if n == m else "random"
    run_case(make_case(n, m, l, d, pos=pos, device=DEVICE, **options), torch.float32)
    assert tma_loads, "the K-loop did not take tensor descriptors"


@pytest.mark.parametrize("run", RUNS, ids=str)
def test_triton_tma_own_images_in_a_run(run, tma_loads):
    """Plain tiles and tiles with own images, with TMA operands: the forward's two launches
    and the G kernel's overwrite of the positives."""
    first, n, m, l = run
    run_case(make_case(n, m, l, 24, pos=first + torch.arange(n), device=DEVICE), torch.float32)
    assert tma_loads


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_tma_half_precision(dtype, tma_loads):
    run_case(make_case(9, 5, 25, 24, pos="random", dtype=dtype, device=DEVICE), dtype)
    assert tma_loads


def test_triton_tma_feature_map_layout(tma_loads):
    """Feature-map targets reach the kernels as contiguous chunk copies, which TMA reads."""
    case = make_case(10, 24, 9, 20, pos=7 + torch.arange(10), trg_layout="feature_map", device=DEVICE)
    run_case(case, torch.float32)
    assert tma_loads


@pytest.mark.parametrize("d, dtype, ready", [(24, torch.float32, True), (33, torch.float32, False),
                                             (20, torch.float16, False), (40, torch.bfloat16, True)], ids=str)
def test_triton_tma_only_where_the_copy_engine_can(d, dtype, ready, tma_loads):
    """TMA needs 16-byte rows: 4 float32 or 8 16-bit features at a time. Other sizes take
    pointers, and still match."""
    run_case(make_case(6, 6, 5, d, dtype=dtype, device=DEVICE), dtype)
    assert bool(tma_loads) == ready


def test_triton_tma_not_for_targets_with_gaps(tma_loads):
    """Targets whose images are not evenly spaced runs of locations (5 of every 7 here) have
    no (C, D) view for a descriptor: the kernels take pointers, and match the reference."""
    case = make_case(6, 6, 5, 24, device=DEVICE)
    results = []
    for backend in ("triton", "reference"):
        gapped = torch.zeros(6, 7, 24, device=DEVICE)
        gapped[:, :5] = case.trg
        gapped.requires_grad_()
        loss, reg = nce_loss(case.src, gapped[:, :5], backend=backend)
        results.append((loss, reg, *torch.autograd.grad(loss + reg, gapped)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert not tma_loads


def test_tma_ready_rules():
    """The copy engine takes features contiguous, 16-byte aligned base and row stride, and
    rows that are not all the same memory (stride 0 takes pointers)."""
    from amdim_kernels.triton_nce import operands

    x = torch.zeros(6, 16, dtype=torch.bfloat16)
    assert operands.tma_ready(x)
    assert not operands.tma_ready(x[:1].expand(6, 16))  # stride 0
    assert not operands.tma_ready(torch.zeros(6, 9, dtype=torch.bfloat16))  # 18-byte rows
    assert not operands.tma_ready(x.view(-1)[1:81].view(5, 16))  # base 2 bytes past alignment
    assert not operands.tma_ready(x.t())  # features strided


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(ODD_LAYOUTS))
def test_triton_odd_layouts(layout, dtype):
    assert_odd_layout_matches_reference("triton", DEVICE, layout, dtype)


def test_launches_follow_the_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device: inputs on another one switch it for the
    call, and inputs on the current device or the CPU (the interpreter) leave it be."""
    import contextlib
    from types import SimpleNamespace

    from amdim_kernels.triton_nce import operands

    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())
    for index in (1, 0):
        x = SimpleNamespace(is_cuda=True, device=torch.device("cuda", index))
        with operands.on_device_of(x):
            pass
    with operands.on_device_of(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_triton_on_a_device_that_is_not_current():
    """Inputs on cuda:1 while cuda:0 is current: the reference's loss and gradients."""
    case = make_case(6, 6, 5, 40, dtype=torch.bfloat16, device="cuda:1")
    with torch.cuda.device(0):
        run_case(case, torch.bfloat16)


@pytest.mark.parametrize("grad_of", [("src",), ("trg",), ()], ids=str)
def test_triton_partial_requires_grad(grad_of):
    case = make_case(5, 5, 3, 17, device=DEVICE)
    if grad_of:
        run_case(case, torch.float32, grad_of=grad_of)
    else:
        loss, reg = nce_loss(case.src, case.trg, backend="triton")
        assert not loss.requires_grad and not reg.requires_grad


def _src_sum_placement(n, m, l, d):
    """Where backward keeps d src's float32 sum for float32 inputs on DEVICE, from the chunk
    plan: in d trg's tail within the last chunk's images, reaching into earlier chunks, or
    (d trg smaller than the sum) in memory of its own."""
    from amdim_kernels.triton_nce import config

    cfg = config.tile_config(torch.float32, d)
    trg = torch.empty(m, l, d, device="meta")
    per_column = config.column_bytes(n, trg, config.default_score_strategy(torch.float32) == "gemm", backward=True)
    device = torch.device(DEVICE)
    c_max = config.chunk_columns(n, m, l, cfg, config.num_sms(device), per_column, config.chunk_floor_bytes(device))
    last = list(config.chunk_ranges(m, l, c_max))[-1][1]  # columns of the last chunk
    if n > m * l:  # 4*N*D bytes against d trg's 4*M*L*D
        return "own memory"
    return "last chunk" if n <= last else "earlier chunks"


@pytest.mark.parametrize("shape, where", [
    ((40, 40, 25, 24), "last chunk"),
    ((200, 16, 64, 4), "earlier chunks"),  # on the interpreter: 8 chunks of 128 columns
    ((37, 4, 1, 8), "own memory"),
], ids=str)
def test_triton_src_gradient_sum_in_dtrg_tail(shape, where):
    """d src's float32 sum over the chunks lives in d trg's tail until the chunks write it:
    finished by the last chunk, moved out before an earlier chunk overwrites it, or in memory
    of its own where d trg is too small; the gradients are right every way."""
    from unittest import mock

    from amdim_kernels.triton_nce import backward

    n, m, l, d = shape
    if DEVICE == "cpu":  # the CPU plan is the one these shapes were picked for
        assert _src_sum_placement(n, m, l, d) == where
    placed = []
    real = backward.src_sum_in_tail

    def spy(dtrg, n, d):
        acc = real(dtrg, n, d)
        placed.append(acc is not None)
        return acc

    with mock.patch.object(backward, "src_sum_in_tail", spy):
        run_case(make_case(n, m, l, d, pos="random", device=DEVICE), torch.float32)
    assert placed and all(p == (_src_sum_placement(n, m, l, d) != "own memory") for p in placed)


def test_triton_is_deterministic():
    case = make_case(40, 40, 25, 24, device=DEVICE, reduction="none")
    first = outputs_and_grads(nce_loss, case, backend="triton")
    second = outputs_and_grads(nce_loss, case, backend="triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# the interpreter computes with numpy, which warns where inf - inf or inf * 0 makes a NaN
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["src", "trg"])
@pytest.mark.parametrize("tclip", [20.0, None])
def test_triton_non_finite_input_gives_nan(bad, where, tclip):
    case = make_case(4, 4, 3, 6, device=DEVICE)
    (case.src if where == "src" else case.trg).view(-1)[5] = bad
    loss, _ = nce_loss(case.src, case.trg, tclip=tclip, backend="triton")
    assert torch.isnan(loss)


@pytest.mark.parametrize("options", [dict(), dict(tclip=None, reg_weight=0.0, reduction="none")], ids=str)
@pytest.mark.parametrize("grad_of", [("src", "trg"), ("trg",)], ids=str)
def test_triton_under_torch_compile(options, grad_of):
    """torch.compile(fullgraph=True) traces the Triton backend as its registered ops (no graph
    break), and the compiled step gives the eager step's values and gradients."""
    case = make_case(7, 7, 5, 20, device=DEVICE, **options)

    def step(src, trg):
        loss, reg = nce_loss(src, trg, **case.kwargs(), backend="triton")
        return loss.sum() + 3.0 * reg

    def grads(fn):
        src = case.src.clone().requires_grad_("src" in grad_of)
        trg = case.trg.clone().requires_grad_("trg" in grad_of)
        out = fn(src, trg)
        out.backward()
        return out.detach(), src.grad, trg.grad

    want = grads(step)
    got = grads(torch.compile(step, fullgraph=True, backend="aot_eager"))
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tclip", [20.0, None])
def test_triton_op_registrations(tclip):
    """Schema, fake implementation and autograd formula of amdim_kernels::triton_nce_fwd agree
    with the kernels (torch.library.opcheck)."""
    import amdim_kernels.triton_nce.backend  # noqa: F401 (registers the ops)

    case = make_case(6, 4, 3, 8, pos="random", device=DEVICE)
    src, trg = case.src.requires_grad_(), case.trg.requires_grad_()
    torch.library.opcheck(torch.ops.amdim_kernels.triton_nce_fwd.default,
                          (src, trg, case.pos_idx, tclip, 0.3, 0.05, "fused", "", 8, [], []))


# ---- GPU: realistic sizes and the tensor-core paths (skipped without a GPU) ----

GPU_SHAPES = [  # (N, M, L, D)
    (128, 256, 49, 256),
    (200, 200, 25, 1024),
    (129, 67, 49, 520),
    (1024, 1024, 49, 2048),
]


@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(), dict(tclip=None, reduction="none")], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_triton_gpu_large(shape, dtype, options):
    n, m, l, d = shape
    pos = "arange" if n == m else "random"
    case = make_case(n, m, l, d, pos=pos, dtype=dtype, device="cuda", spread=3.0, **options)
    run_case(case, dtype, truth=float64_truth(case))


@pytest.mark.gpu
@pytest.mark.parametrize("loads", ["tma", "pointers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(129, 67, 49, 520), (1024, 1024, 49, 2048)], ids=str)
def test_triton_gpu_operand_loads(shape, dtype, loads):
    """The fused K-loop with either operand loads (TMA is the default from sm_90 on)."""
    import amdim_kernels

    n, m, l, d = shape
    case = make_case(n, m, l, d, pos="arange" if n == m else "random", dtype=dtype, device="cuda", spread=3.0)
    with amdim_kernels.settings(triton_scores="fused", triton_loads=loads):
        run_case(case, dtype, truth=float64_truth(case))


@pytest.fixture
def tf32_settings():
    """Restores torch's float32 matmul settings after the test, in the one order found to
    leave both APIs consistent (global newer setting, float32 matmul precision, matmul's
    newer setting): restoring the newer settings alone leaves the legacy flag unreadable."""
    matmul = torch.backends.cuda.matmul
    saved = torch.backends.fp32_precision, torch.get_float32_matmul_precision(), matmul.fp32_precision
    yield
    torch.backends.fp32_precision = saved[0]
    torch.set_float32_matmul_precision(saved[1])
    matmul.fp32_precision = saved[2]
    assert not matmul.allow_tf32 or saved[1] != "highest"  # readable again, and as it was


# Ways to switch TF32 on or off for float32 matmuls (torch's legacy and newer APIs), and
# whether each lets cuBLAS use TF32.
TF32_SWITCHES = [
    ("torch.backends.cuda.matmul.allow_tf32 = True", True),
    ("torch.backends.cuda.matmul.allow_tf32 = False", False),
    ("torch.set_float32_matmul_precision('high')", True),
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True),
    ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", False),
    ("torch.backends.fp32_precision = 'tf32'", True),
]


@pytest.mark.parametrize("switch, tf32", TF32_SWITCHES, ids=[code for code, _ in TF32_SWITCHES])
def test_triton_reads_every_tf32_switch(switch, tf32, tf32_settings):
    """Every way torch offers to set TF32 is read right, and none makes the float32 call
    fail: once the newer API has set TF32, reading the legacy allow_tf32 raises."""
    from amdim_kernels.triton_nce import config

    exec(switch)
    assert config.tf32_allowed() == tf32
    run_case(make_case(5, 5, 3, 17, device=DEVICE), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("api", ["legacy", "newer"])
def test_triton_gpu_tf32_follows_torch_switch(api, tf32_settings):
    case = make_case(256, 256, 25, 512, device="cuda")
    truth = float64_truth(case)
    for tf32, err in ((True, 1e-3), (False, 1e-5)):
        if api == "legacy":
            torch.backends.cuda.matmul.allow_tf32 = tf32
        else:
            torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
        got = outputs_and_grads(nce_loss, case, backend="triton")
        assert rel_err(got[0], truth[0]) < err


@pytest.mark.parametrize("options", [dict(), dict(tclip=None, reduction="none")], ids=str)
@pytest.mark.parametrize("shape", [(40, 40, 25, 24, "arange"), (13, 6, 25, 20, "random"), (1, 5, 3, 33, "random")], ids=str)
def test_triton_both_score_strategies(shape, options, strategy):
    n, m, l, d, pos = shape
    run_case(make_case(n, m, l, d, pos=pos, device=DEVICE, trg_layout="feature_map", **options), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("capture", [assert_cuda_graph_replay_matches_eager, assert_captured_graph_matches_eager],
                         ids=["reduce-overhead", "by-hand"])
def test_triton_cuda_graph_capture(capture):
    """fwd+bwd replays as CUDA graphs, captured by torch.compile(mode="reduce-overhead") or
    by hand with torch.cuda.graph (pos_idx given)."""
    capture("triton")
