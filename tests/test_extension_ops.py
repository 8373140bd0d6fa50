"""backend="cpp" (CPU) and backend="cuda" (GPU) — the op library built from csrc/ — against
the float64 truth, plus the op's registrations: fake tensors, autograd, torch.compile."""
import contextlib

import pytest
import torch

from amdim_kernels import available_backends, nce_loss, settings
from truth import (
    FAR_BELOW_TCLIP, KERNEL_OPTIONS, ODD_LAYOUTS, assert_captured_graph_matches_eager,
    assert_cuda_graph_replay_matches_eager, assert_float16_g_overflows_only_with_the_gradient,
    assert_float16_loss_scale, assert_gradients_of_each_output, assert_matches_truth,
    assert_odd_layout_matches_reference, far_below_tclip_case, far_below_tclip_tol, float64_truth, make_case,
    outputs_and_grads)

BACKENDS = [b for b, dev in (("cpp", "cpu"), ("cuda", "cuda")) if b in available_backends(dev)]
DEVICE = {"cpp": "cpu", "cuda": "cuda"}

pytestmark = pytest.mark.skipif(not BACKENDS, reason="the compiled extension is not built")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


SHAPES = [  # (N, M, L, D, pos)
    (1, 5, 3, 33, "random"),
    (7, 7, 49, 33, "arange"),
    (5, 9, 25, 40, "random"),
    (37, 37, 1, 70, "arange"),
    (4, 1, 5, 16, "random"),
    (130, 70, 25, 20, "random"),  # several row blocks and image tiles
]
@pytest.mark.parametrize("options", KERNEL_OPTIONS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_compiled_float32(backend, shape, options):
    n, m, l, d, pos = shape
    assert_matches_truth(make_case(n, m, l, d, pos=pos, device=DEVICE[backend], **options), torch.float32, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tclip, depth", FAR_BELOW_TCLIP, ids=str)
def test_compiled_scores_far_below_tclip(backend, tclip, depth, dtype):
    """Before the running maximum past kMaxShiftTclip, tclip = 100 gave a loss of 0 and NaN
    gradients here. (130, 70, 25): several tiles and, on the GPU, splits; bfloat16 takes the
    WMMA path there."""
    for _ in _each_score_path(backend):
        case = far_below_tclip_case(130, 70, 25, 20, tclip, depth, device=DEVICE[backend], dtype=dtype)
        assert_matches_truth(case, dtype, backend, tol=far_below_tclip_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(ODD_LAYOUTS))
def test_compiled_odd_layouts(backend, layout, dtype):
    """On the GPU both score paths; the WMMA path (16-bit) checks the operands' alignment
    itself and falls back to plain loads where the vector loads cannot go."""
    for _ in _each_score_path(backend):
        assert_odd_layout_matches_reference(backend, DEVICE[backend], layout, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [dict(), dict(tclip=None, reduction="none")], ids=str)
def test_compiled_half_precision(backend, dtype, options):
    case = make_case(9, 5, 25, 20, pos="random", dtype=dtype, device=DEVICE[backend], **options)
    assert_matches_truth(case, dtype, backend)


def _each_score_path(backend):
    """Yields once inside each of the backend's score paths: the cuda backend's two (its
    float16 G is made by either's kernel), or the cpp backend's one."""
    for path in ("cublas", "mma") if backend == "cuda" else (None,):
        with settings(cuda_scores=path) if path else contextlib.nullcontext():
            yield


@pytest.mark.parametrize("used", ["loss", "reg", "both"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_gradients_of_each_output(backend, reduction, used):
    for _ in _each_score_path(backend):
        assert_gradients_of_each_output(backend, DEVICE[backend], reduction, used)


@pytest.mark.parametrize("loss_scale", [2.0 ** -4, 1.0, 2.0 ** 16])
def test_compiled_float16_gradients_under_a_loss_scale(backend, loss_scale):
    """cuda: float16 G is stored times a power of two found on the device
    (nce_cuda_kernels.h's launch_nce_grad_scale); cpp computes in float32 throughout."""
    for _ in _each_score_path(backend):
        assert_float16_loss_scale(backend, loss_scale, DEVICE[backend])


def test_compiled_float16_g_overflows_only_with_the_gradient(backend):
    for _ in _each_score_path(backend):
        assert_float16_g_overflows_only_with_the_gradient(backend, DEVICE[backend])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_strided_target(backend, dtype):
    # the trainer's layout; the CPU kernel copies it location-run by location-run
    case = make_case(6, 6, 25, 19, trg_layout="feature_map", dtype=dtype, device=DEVICE[backend], reduction="none")
    assert not case.trg.is_contiguous()
    assert_matches_truth(case, dtype, backend)


@pytest.mark.parametrize("grad_of", [("src",), ("trg",)], ids=str)
def test_compiled_partial_requires_grad(backend, grad_of):
    assert_matches_truth(make_case(5, 5, 3, 17, device=DEVICE[backend]), torch.float32, backend, grad_of=grad_of)


def test_compiled_is_deterministic(backend):
    case = make_case(70, 70, 25, 24, device=DEVICE[backend], reduction="none")
    first = outputs_and_grads(nce_loss, case, backend=backend)
    second = outputs_and_grads(nce_loss, case, backend=backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(300, 130, 25, 24), (7, 2, 3, 5), (37, 1, 4, 9), (64, 9, 49, 33), (5, 40, 1, 70)],
                         ids=str)
@pytest.mark.parametrize("options", [dict(reduction="none"), dict(tclip=None), dict(tclip=50.0, reg_weight=0.0)],
                         ids=str)
def test_cpp_gives_the_same_bits_for_any_thread_count(shape, options):
    """cpp's outputs and gradients are the same bits for 1, 2 and 3 threads: the tiles' (and
    the backward's groups of tiles') work is fixed by the problem alone, every product runs
    single-threaded inside the call's parallel region, and the partials are merged in order.
    (Before, MKL split d src's product over the threads: 3e-6 apart at the first shape.)"""
    if "cpp" not in available_backends("cpu"):
        pytest.skip("cpp is not built")
    n, m, l, d = shape
    case = make_case(n, m, l, d, pos="random", **options)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(outputs_and_grads(nce_loss, case, backend="cpp"))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("tclip", [20.0, None])
def test_compiled_non_finite_input_gives_nan(backend, bad, tclip):
    case = make_case(4, 4, 3, 6, device=DEVICE[backend])
    case.trg.view(-1)[5] = bad
    loss, _ = nce_loss(case.src, case.trg, tclip=tclip, backend=backend)
    assert torch.isnan(loss)


@pytest.mark.parametrize("tclip", [20.0, None])
def test_op_registrations(backend, tclip):
    """Schema, fake (meta) implementation, autograd registration, AOT dispatch."""
    case = make_case(6, 4, 3, 8, pos="random", device=DEVICE[backend])
    src = case.src.requires_grad_()
    trg = case.trg.requires_grad_()
    torch.library.opcheck(torch.ops.amdim_kernels.nce_fwd.default, (src, trg, case.pos_idx, tclip, 0.3, 0.05, "auto"))


def test_torch_compile_has_no_graph_break(backend):
    case = make_case(8, 8, 5, 16, device=DEVICE[backend])

    def step(src, trg):
        loss, reg = nce_loss(src, trg, backend=backend)
        return loss + reg

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    src = case.src.clone().requires_grad_()
    trg = case.trg.clone().requires_grad_()
    out = compiled(src, trg)
    out.backward()
    src_ref = case.src.clone().requires_grad_()
    trg_ref = case.trg.clone().requires_grad_()
    step(src_ref, trg_ref).backward()
    torch.testing.assert_close(out, step(case.src, case.trg))
    torch.testing.assert_close(src.grad, src_ref.grad)
    torch.testing.assert_close(trg.grad, trg_ref.grad)


def test_torch_compile_with_changing_float_options(backend):
    """A second call with other tclip / reg_weight / scale values makes torch.compile treat
    them as symbolic floats; validation must still trace without a graph break."""
    case = make_case(8, 8, 5, 16, device=DEVICE[backend])

    def step(src, trg, tclip, reg_weight, scale):
        loss, reg = nce_loss(src, trg, tclip=tclip, reg_weight=reg_weight, scale=scale, backend=backend)
        return loss + reg

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for options in ((20.0, 0.05, 0.25), (5.0, 0.1, 0.5), (7.0, 0.0, 0.3)):
        torch.testing.assert_close(compiled(case.src, case.trg, *options), step(case.src, case.trg, *options))


def test_torch_compile_with_given_pos_idx(backend):
    """N != M needs pos_idx; its range check must not read values back inside a graph (it
    becomes a device-side assertion there), and a bad index still raises."""
    case = make_case(6, 9, 4, 16, pos="random", device=DEVICE[backend])

    def step(src, trg, pos_idx):
        loss, reg = nce_loss(src, trg, pos_idx, backend=backend)
        return loss + reg

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(case.src, case.trg, case.pos_idx), step(case.src, case.trg, case.pos_idx))
    if DEVICE[backend] == "cpu":  # on a GPU the failed assertion would poison the CUDA context
        bad = case.pos_idx.clone()
        bad[2] = 9
        with pytest.raises(RuntimeError, match=r"pos_idx values must lie in \[0, M\) = \[0, 9\)"):
            compiled(case.src, case.trg, bad)


@pytest.mark.parametrize("groups", [1, 2])
def test_torch_compile_with_range_pos_idx(backend, groups):
    """A range pos_idx (the data-parallel trainer's rank * N + arange(N)), or a tuple of them
    (its 1->5 and 5->5 sources in one call), traces without a graph break and gives what
    eager gives."""
    case = make_case(6, 9, 4, 16, pos="random", device=DEVICE[backend])

    def step(src, trg, first):
        n = 6 // groups
        loss, reg = nce_loss(src, trg, (range(first, first + n),) * groups, backend=backend)
        return loss + reg

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for first in (0, 3):
        torch.testing.assert_close(compiled(case.src, case.trg, first), step(case.src, case.trg, first))


def test_no_module_lookup_per_call(backend, monkeypatch):
    """torch.compile cannot trace importlib.util.find_spec on every torch version (2.11 breaks
    the graph there): nce_loss's path must not look modules up."""
    import importlib.util

    def refuse(*args, **kwargs):
        raise AssertionError("find_spec called in nce_loss's path")

    case = make_case(4, 4, 3, 8, device=DEVICE[backend])
    nce_loss(case.src, case.trg, backend=backend)  # the first call may load the extension
    monkeypatch.setattr(importlib.util, "find_spec", refuse)
    nce_loss(case.src, case.trg, backend=backend)
    nce_loss(case.src, case.trg, backend="auto")


@pytest.mark.gpu
def test_this_gpu_loads_the_cuda_kernels():
    """A CUDA build this GPU cannot load makes the cuda backend unavailable, which would skip
    every cuda test here: this one fails instead."""
    from amdim_kernels import extension_ops, registry

    if "cuda" not in registry.extension_state().built_for:
        pytest.skip("the extension was built without CUDA kernels")
    assert extension_ops.kernel_image_error(torch.cuda.current_device()) == ""
    assert "cuda" in BACKENDS


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(128, 256, 49, 256), (200, 200, 25, 1024), (129, 67, 49, 520)], ids=str)
def test_cuda_large(shape, dtype):
    if "cuda" not in BACKENDS:
        pytest.skip("the extension was built without CUDA kernels")
    n, m, l, d = shape
    case = make_case(n, m, l, d, pos="arange" if n == m else "random", dtype=dtype, device="cuda", spread=3.0)
    assert_matches_truth(case, dtype, "cuda", truth=float64_truth(case))


CAPTURES = {"reduce-overhead": assert_cuda_graph_replay_matches_eager, "by-hand": assert_captured_graph_matches_eager}


@pytest.mark.gpu
@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("scores", ["cublas", "mma"])
def test_cuda_graph_capture(scores, capture):
    """Both score paths of the cuda backend replay as CUDA graphs, captured by
    torch.compile(mode="reduce-overhead") or by hand with torch.cuda.graph (pos_idx given)."""
    if "cuda" not in BACKENDS:
        pytest.skip("backend 'cuda' is not built")
    with settings(cuda_scores=scores):
        CAPTURES[capture]("cuda")
