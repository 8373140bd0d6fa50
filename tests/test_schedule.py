"""Backend cpp's two schedules (amdim_kernels/schedule.py): both against the float64 truth on
problems drawn fresh each run, the three-product backward's upstream check and its fallback,
what "auto" chooses, thread invariance and the workspace bound; reduction "group_means"."""
from __future__ import annotations

import collections
import os
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from amdim_kernels import available_backends, multiscale_nce, nce_loss, schedule, settings
from amdim_kernels.three_product import stored_scale
from amdim_kernels.validation import validate
from truth import assert_outputs_match, rel_err, spec_loss_f64

pytestmark = pytest.mark.skipif("cpp" not in available_backends("cpu"), reason="cpp is not built")

SCHEDULES = ("three-product", "four-product")
# One seed per run (conftest.py), so that each run draws other problems; the failing test's
# id and the seed in its message draw them again (AMDIM_TEST_SEED=<seed>).
SEED = int(os.environ["AMDIM_TEST_SEED"])
OPTIONS = [dict(), dict(tclip=None), dict(tclip=50.0), dict(reg_weight=0.0), dict(tclip=3.0, reg_weight=0.2, scale=0.5)]


class _CountOps(TorchDispatchMode):
    """Counts the extension's ops as they are dispatched."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "amdim_kernels":
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _draw(gen: torch.Generator, dtype=torch.float32, groups: int = 1):
    """An odd problem: M images of L locations, D features, the targets sometimes as a feature
    map's view; with groups > 1, a tuple of that many ranges of unequal lengths (each at most
    M); with one group, a range or a random index tensor (then N may exceed M)."""
    m = int(torch.randint(1, 23, (), generator=gen))
    l = int(torch.randint(1, 10, (), generator=gen))  # noqa: E741
    d = int(torch.randint(1, 40, (), generator=gen))
    as_tensor = groups == 1 and bool(torch.rand((), generator=gen) < 0.5)
    rows = [int(torch.randint(1, (14 if as_tensor else min(m, 13)) + 1, (), generator=gen)) for _ in range(groups)]
    n = sum(rows)
    src = (4 * torch.randn(n, d, generator=gen)).to(dtype)
    if torch.rand((), generator=gen) < 0.5:
        trg = torch.randn(m, l, d, generator=gen).to(dtype)
    else:  # the trainer's layout: (M, D, H*W) seen as (M, L, D)
        trg = torch.randn(m, d, l, generator=gen).to(dtype).transpose(1, 2)
    if as_tensor:
        return src, trg, torch.randint(0, m, (n,), generator=gen), (n,)
    starts = [int(torch.randint(0, m - b + 1, (), generator=gen)) for b in rows]
    ranges = tuple(range(start, start + b) for start, b in zip(starts, rows))
    return src, trg, ranges if groups > 1 else ranges[0], tuple(rows)


def _indices(pos_idx, n):
    if isinstance(pos_idx, torch.Tensor):
        return pos_idx
    ranges = pos_idx if isinstance(pos_idx, tuple) else (pos_idx,)
    return torch.tensor([i for r in ranges for i in r], dtype=torch.int64)


def _objective(loss, reg, reduction, groups, weights, reg_upstream):
    """sum_k weights[k] * mean_k + reg_upstream * reg, from nce_loss's outputs."""
    if reduction == "mean":
        return weights[0] * loss + reg_upstream * reg
    return (loss * torch.tensor(weights, dtype=loss.dtype)).sum() + reg_upstream * reg


def _grads(fn, src, trg, pos_idx, reduction, groups, weights, reg_upstream, grad_of, **options):
    s = src.detach().clone().requires_grad_("src" in grad_of)
    t = trg.detach().clone().requires_grad_("trg" in grad_of)
    loss, reg = fn(s, t, pos_idx, reduction, **options)
    _objective(loss, reg, reduction, groups, weights, reg_upstream).backward()
    return loss.detach(), reg.detach(), s.grad, t.grad


def _truth(src, trg, pos_idx, reduction, groups, *, tclip=20.0, reg_weight=0.05, scale=None):
    per_positive, reg = spec_loss_f64(src, trg, _indices(pos_idx, src.shape[0]), tclip, reg_weight, scale, "none")
    means = torch.stack([part.mean() for part in per_positive.split(list(groups))])
    return (means.sum() / len(groups) if reduction == "mean" and len(groups) > 1 else
            per_positive.mean() if reduction == "mean" else means), reg


def _cpp(schedule_name, workspace_bytes=None):
    def fn(src, trg, pos_idx, reduction, **options):
        with settings(schedule=schedule_name, workspace_bytes=workspace_bytes):
            return nce_loss(src, trg, pos_idx, reduction=reduction, backend="cpp", **options)
    return fn


def _reference(src, trg, pos_idx, reduction, **options):
    return nce_loss(src, trg, pos_idx, reduction=reduction, backend="reference", **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("upstream", ["matching", "other"])
@pytest.mark.parametrize("reduction, groups", [("mean", 1), ("mean", 2), ("group_means", 2), ("group_means", 3)])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("blocks", ["one", "several"])
@pytest.mark.parametrize("schedule_name", SCHEDULES)
def test_schedules_match_truth(schedule_name, blocks, options, reduction, groups, upstream, dtype, request):
    """Values and gradients of both schedules against the float64 truth, by truth.py's
    criterion: the error is at most the reference's in the same dtype plus what float32 sums
    in another order add, and for 16-bit inputs the rounding of the gradients to that dtype. "matching": an
    upstream the three-product backward scales (c * n_k / N on each group's mean, c on reg);
    "other": random weights, which it meets with the four-product backward (each checked to be
    the path taken)."""
    seed = SEED + zlib.crc32(request.node.name.encode())  # each case its own problem, the same on every worker
    gen = torch.Generator().manual_seed(seed)
    src, trg, pos_idx, group_rows = _draw(gen, dtype, groups)
    n = src.shape[0]
    c = float(torch.rand((), generator=gen)) + 0.5
    if upstream == "matching":
        weights = [c * k / n for k in group_rows] if reduction == "group_means" else [c]
        reg_upstream = c
    else:
        weights = (torch.rand(len(group_rows) if reduction == "group_means" else 1, generator=gen) + 0.5).tolist()
        reg_upstream = float(torch.rand((), generator=gen)) * 3
    grad_of = [("src", "trg"), ("src",), ("trg",)][int(torch.randint(0, 3, (), generator=gen))]
    workspace = 4 * trg.shape[0] * trg.shape[1] * max(1, n // 3) if blocks == "several" else None
    with _CountOps() as counted:
        got = _grads(_cpp(schedule_name, workspace), src, trg, pos_idx, reduction, group_rows, weights,
                     reg_upstream, grad_of, **options)
    if schedule_name == "three-product":  # the matching upstream takes the stored gradients
        # (so does any upstream of one mean where reg weighs nothing)
        scaled = upstream == "matching" or (options.get("reg_weight", 0.05) == 0.0 and len(weights) == 1)
        assert counted.ops["nce_fwd_grad"] == 1
        assert counted.ops["nce_bwd"] == (0 if scaled else 1)
    ref = _grads(_reference, src, trg, pos_idx, reduction, group_rows, weights, reg_upstream, grad_of, **options)
    truth = _grads(lambda s, t, p, r, **o: _truth(s, t, p, r, group_rows, **o), src.double(), trg.double(), pos_idx,
                   reduction, group_rows, weights, reg_upstream, grad_of, **options)
    assert_outputs_match(got, ref, truth, dtype, f"cpp {schedule_name}",
                         context=f" (seed {SEED}, src {tuple(src.shape)}, trg {tuple(trg.shape)})")


def _backward_ops(fn):
    with _CountOps() as counted:
        fn()
    return counted.ops


@pytest.mark.parametrize("reg_weight", [0.05, 0.0])
def test_three_product_backward_scales_or_recomputes(reg_weight):
    """The stored gradients serve an upstream that weights mean and reg alike (times any c),
    and, with reg_weight 0, any weight of reg (reg alone: c = 0); every other upstream, and a second backward
    through the same graph, gets nce_bwd (the four-product backward) and the same gradients
    as the four-product schedule."""
    src, trg = 3 * torch.randn(11, 8), torch.randn(11, 5, 8)
    cases = {"2 (loss + reg)": (2.0, 2.0), "loss alone": (1.0, None), "loss + 3 reg": (1.0, 3.0),
             "reg alone": (None, 1.0)}
    for name, (w_loss, w_reg) in cases.items():
        grads = {}
        for sched in SCHEDULES:
            s, t = src.clone().requires_grad_(), trg.clone().requires_grad_()
            with settings(schedule=sched):
                loss, reg = nce_loss(s, t, reg_weight=reg_weight, backend="cpp")
            total = sum(w * x for w, x in ((w_loss, loss), (w_reg, reg)) if w is not None)
            ops = _backward_ops(lambda: total.backward(retain_graph=True))
            first = s.grad.clone(), t.grad.clone()
            s.grad = t.grad = None
            again = _backward_ops(lambda: total.backward())
            torch.testing.assert_close((s.grad, t.grad), first, rtol=1e-5, atol=1e-7)
            grads[sched] = first
            if sched == "three-product":
                scaled = name == "2 (loss + reg)" or reg_weight == 0.0  # reg alone: c = 0
                assert ops["nce_bwd"] == (0 if scaled else 1), name
                assert again["nce_bwd"] == 1, f"{name}: second backward"
        torch.testing.assert_close(grads["three-product"], grads["four-product"], rtol=2e-5, atol=1e-7, msg=name)


def test_stored_scale():
    """c with upstream = c x (the stored objective's weights), else None."""
    one = torch.tensor
    assert stored_scale(None, one([2.0]), one(2.0), (5,), 0.05) == 2.0
    assert stored_scale(None, one([1.0]), None, (5,), 0.05) is None  # reg unused, and weighted
    assert stored_scale(None, one([1.0]), None, (5,), 0.0) == 1.0  # reg weighs nothing
    assert stored_scale(None, one([0.5, 0.5]), one(1.0), (4, 4), 0.05) == 1.0  # AMDIM's 1->5 + 5->5 call
    assert stored_scale(None, one([0.25, 0.75]), one(1.0), (2, 6), 0.05) == 1.0
    assert stored_scale(None, one([0.5, 0.6]), one(1.0), (4, 4), 0.05) is None
    assert stored_scale(torch.ones(8, 3), one([1.0]), one(1.0), (8,), 0.05) is None
    assert stored_scale(None, one([1.0 + 2**-23]), one(1.0), (5,), 0.05) == pytest.approx(1.0)  # within 8 ulp


def test_auto_takes_three_products_where_documented():
    src, trg = torch.randn(64, 16).requires_grad_(), torch.randn(64, 7, 16)
    auto = settings(schedule="auto")

    def rows(reduction="mean", workspace=None, s=src, t=trg):
        with settings(workspace_bytes=workspace) as now:
            return schedule.choose(validate(s, t, None, 20.0, 0.05, None, reduction), now)

    with auto:
        assert rows() == 64  # default budget: 4 MiB holds every row
        assert rows("group_means") == 64
        assert rows("none") == schedule.FOUR_PRODUCT
        assert rows(s=src.detach()) == schedule.FOUR_PRODUCT  # no gradient needed
        assert rows(t=trg.requires_grad_()) == 64
        with torch.no_grad():
            assert rows() == schedule.FOUR_PRODUCT
        assert rows(workspace=4 * 64 * 7 * 32) == 32  # the smallest block auto takes
        assert rows(workspace=4 * 64 * 7 * 40) == 32  # two even blocks, not 40 + 24
        assert rows(workspace=4 * 64 * 7 * 31) == schedule.FOUR_PRODUCT
        with settings() as now:  # the GPU backends' schedule is taken only where set
            problem = validate(src, trg, None, 20.0, 0.05, None, "mean")
            for backend in ("triton", "cuda"):
                assert schedule.choose(problem, now, backend) == schedule.FOUR_PRODUCT

    def default(n, m, backend, dtype=torch.float32):
        p = validate(torch.zeros(n, 1, dtype=dtype), torch.zeros(m, 49, 1, dtype=dtype), None, 20.0, 0.05, None, "mean")
        return schedule.default_workspace_bytes(p, backend)

    assert default(100, 100, "cpp") == 4 << 20  # the floor
    assert default(256, 256, "cpp") == 2 * 256 * 256 * 49
    assert default(512, 512, "cpp") == 2 * 512 * 512 * 49  # half the scores
    assert default(4096, 4096, "cpp") == 256 << 20  # the cap
    # the GPU backends: all rows in one block, their float32 scores and G in the inputs' dtype
    assert default(512, 512, "cuda") == 512 * 512 * 49 * 8
    assert default(1024, 1024, "triton", torch.bfloat16) == 1024 * 1024 * 49 * 6
    assert default(4096, 4096, "cuda") == 1 << 30  # the cap
    with settings(schedule="four-product"):
        assert rows() == schedule.FOUR_PRODUCT
    with settings(schedule="three-product"):
        assert rows(workspace=4 * 7 * 64 * 3) == 3  # 22 blocks of 3 (the last of 1)
        with pytest.raises(ValueError, match="needs a reduced loss"):
            rows("none")
        with pytest.raises(ValueError, match="workspace_bytes = 27 holds no row of the block"):
            rows(workspace=27)
        # the GPU backends keep G beside the scores (8 bytes a column for float32) and take
        # no float16
        p = validate(src, trg, None, 20.0, 0.05, None, "mean")
        with settings(workspace_bytes=8 * 7 * 64 * 3) as now:
            assert schedule.choose(p, now, "triton") == 3
            assert schedule.choose(p, now, "cuda") == 3
            assert schedule.choose(p, now, "cpp") == 6
        half = validate(src.half(), trg.half(), None, 20.0, 0.05, None, "mean")
        with settings() as now:
            for backend in ("triton", "cuda"):
                with pytest.raises(ValueError, match=f"on backend '{backend}' takes float32 and bfloat16 inputs"):
                    schedule.choose(half, now, backend)
            assert schedule.choose(half, now, "cpp") == 64
            # cuda's epilogue launches take all M*L columns at once, up to the grid's cap
            wide = torch.zeros(()).expand(65536, 2049, 1)  # M*L = 134283264 columns, no memory
            p_wide = validate(src[:2, :1], wide, torch.tensor([0, 1]), 20.0, 0.05, None, "mean")
            with pytest.raises(ValueError, match="on backend 'cuda' takes at most 134215680 target columns"):
                schedule.choose(p_wide, now, "cuda")


@pytest.mark.parametrize("bad, message", [(dict(schedule="three"), "schedule must be one of"),
                                          (dict(workspace_bytes=0), "workspace_bytes must be a positive int"),
                                          (dict(workspace_bytes=1.5), "workspace_bytes must be a positive int")])
def test_bad_schedule_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        with settings(**bad):
            pass


# (N, M, L, D, block rows), tiles of about 2^20 scores (nce_cpu_tiles.h): 4 tiles of 8 images,
# each its own group of d src, whose partial is kept in its tiles (8 * 9 columns >= D) or,
# where they are narrower than D (8 * 1 < 40), in a buffer; blocks of 7 rows, the last of 3.
# Then 12 tiles of 609 images in 8 groups, some of two tiles.
THREE_PRODUCT_LAYOUTS = {"partials in tiles": (45, 31, 9, 24, 7), "partials apart": (45, 31, 1, 40, 7),
                         "groups of several tiles": (48, 7300, 49, 4, 24)}


@pytest.mark.parametrize("layout", THREE_PRODUCT_LAYOUTS)
def test_three_product_same_bits_for_any_thread_count_and_call(layout):
    """Blocks, tiles and groups are fixed by the problem and the budget: the same bits for 1
    and 2 threads and for repeated calls, and the four-product schedule's values. Those are
    float32 sums over up to M*L = 357,700 columns in another order, compared norm-wise: an
    entry of d src that cancels (small against its terms) can differ by more than 1e-5 of
    itself (2e-5 seen in 40 draws)."""
    n, m, l, d, rows = THREE_PRODUCT_LAYOUTS[layout]  # noqa: E741 (the loss's name)
    src, trg = 4 * torch.randn(n, d), torch.randn(m, l, d)
    pos_idx = torch.randint(0, m, (n,))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 2):
            torch.set_num_threads(count)
            s, t = src.clone().requires_grad_(), trg.clone().requires_grad_()
            with settings(schedule="three-product", workspace_bytes=4 * m * l * rows):
                loss, reg = nce_loss(s, t, pos_idx, backend="cpp")
            (loss + reg).backward()
            results.append((loss, reg, s.grad, t.grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    s, t = src.clone().requires_grad_(), trg.clone().requires_grad_()
    with settings(schedule="four-product"):
        loss, reg = nce_loss(s, t, pos_idx, backend="cpp")
    (loss + reg).backward()
    for name, a, b in zip(("loss", "reg", "d src", "d trg"), results[0], (loss, reg, s.grad, t.grad)):
        assert rel_err(a, b.detach()) <= 1e-5, f"{name}: {rel_err(a, b.detach()):.2e} from the four-product schedule's"


def test_three_product_workspace_stays_within_its_budget():
    """The call's own tensors beyond its outputs and gradients: one row block's scores (the
    budget) plus what scales with N x D, N x L and the tiles, never the N x M*L matrix."""
    from benchmarks.measure import peak_extra_bytes

    n, m, l, d = 128, 128, 49, 32
    scores = 4 * n * m * l
    budget = scores // 16
    src, trg = torch.randn(n, d).requires_grad_(), torch.randn(m, l, d).requires_grad_()

    def call():
        with settings(schedule="three-product", workspace_bytes=budget):
            loss, reg = nce_loss(src, trg, backend="cpp")
        torch.autograd.grad(loss + reg, (src, trg))

    call()
    grads = 4 * (n * d + m * l * d)
    rows = budget // (4 * m * l)
    # d src partials (a scratch per thread: each group's partial then lies in its own tiles),
    # copies, statistics
    small = 4 * (torch.get_num_threads() * rows * d + 4 * n * d + 6 * n * l) + (256 << 10)
    workspace = peak_extra_bytes(call, "cpu") - grads
    assert workspace <= budget + small, f"{workspace} bytes for a budget of {budget}"
    assert workspace < scores / 4


def test_group_means_on_every_backend_and_its_checks():
    src, trg = 3 * torch.randn(10, 6), torch.randn(7, 4, 6)
    ranges = (range(2, 7), range(0, 5))
    want, _ = nce_loss(src, trg, ranges, reduction="none", backend="reference")
    means = want.view(2, -1).mean(1)
    for backend in available_backends("cpu"):
        for sched in SCHEDULES:
            with settings(schedule=sched):
                got, _ = nce_loss(src.requires_grad_(), trg, ranges, reduction="group_means", backend=backend)
            torch.testing.assert_close(got, means, rtol=1e-5, atol=1e-6)
    one, _ = nce_loss(src[:7], trg, reduction="group_means", backend="cpp")
    assert one.shape == (1,)
    with pytest.raises(ValueError, match="each range must hold at least one index"):
        nce_loss(src[:5], trg, (range(0, 5), range(0, 0)), reduction="group_means")


def test_trainer_objective_takes_the_stored_gradients():
    """multiscale_nce's four calls per step weight each call's group means and regulariser
    as the three-product schedule stores them: no call recomputes its scores."""
    b, d = 6, 16
    views = [(torch.randn(b, d, requires_grad=True), torch.randn(b, d, 5, 5, requires_grad=True),
              torch.randn(b, d, 7, 7, requires_grad=True)) for _ in range(2)]
    losses = multiscale_nce(*views, backend="cpp")
    ops = _backward_ops(lambda: losses.total.backward())
    assert ops["nce_bwd"] == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_fwd_grad_op_registration(need, device):
    """nce_fwd_grad's schema and fake implementation agree with its CPU and CUDA kernels."""
    _skip_unless("cpp" if device == "cpu" else "cuda", device)
    pos_idx = torch.randint(0, 6, (9,), device=device)
    # blocks of 3 rows; on a GPU also bfloat16 in blocks of 3 (d trg in float32) and in one
    # block, of all 9 rows or more (both gradients in bfloat16)
    cuda_cases = [(torch.bfloat16, 3), (torch.bfloat16, 9), (torch.bfloat16, 16)]
    for dtype, block_rows in [(torch.float32, 3)] + cuda_cases * (device == "cuda"):
        src, trg = torch.randn(9, 8, device=device, dtype=dtype), torch.randn(6, 4, 8, device=device, dtype=dtype)
        torch.library.opcheck(torch.ops.amdim_kernels.nce_fwd_grad.default,
                              (src, trg, pos_idx, 20.0, 0.3, 0.05, [4, 5], block_rows, *need))


def _epilogue_truth(a, pos_idx, m0, m1, l, tclip, neg_lse, r, reg_coef, gpos):
    """tile_statistics' and tile_gradient's outputs in float64 (nce_cpu_epilogue.h): the
    positives' s of the rows whose image is in the tile, shift, sum, sq (a non-finite score
    makes its row's sq NaN) and g."""
    a = a.double()
    s = a if tclip is None else tclip * torch.tanh(a / tclip)
    u = torch.zeros_like(a) if tclip is None else torch.tanh(a / tclip)
    positive = (torch.arange(a.shape[1]) // l + m0)[None, :] == pos_idx[:, None]
    inside = positive.any(1)
    pos = s[positive].view(-1, l)  # row by row, each row's L positives in order
    negatives = s.masked_fill(positive, float("-inf"))
    if tclip is not None and tclip <= 40.0:  # the fixed shift
        shift = torch.full((a.shape[0],), float(tclip))
    else:  # the negatives' maximum, NaN where one is NaN
        shift = torch.where(negatives.isnan().any(1), float("nan"), negatives.amax(1))
    total = torch.exp(negatives - shift.where(shift > float("-inf"), 0.0)[:, None]).sum(1)
    sq = (a * a + (a - a)).sum(1)
    dl_ds = r.double()[:, None] * torch.exp(s - neg_lse.double()[:, None])
    dl_ds[positive] = gpos.double()[inside].reshape(-1)
    g = reg_coef.double()[:, None] * a + dl_ds * (1 - u * u)
    return pos, shift, total, sq, g


def _assert_close_with_nans(x, y, tol, what):
    """Non-finite values in the same places (NaN for NaN, the same infinity), the finite ones
    close."""
    x = x.double()
    finite = y.isfinite()
    assert torch.equal(x.isnan(), y.isnan()), f"{what}: NaN in other places"
    assert torch.equal(x[~finite & ~y.isnan()], y[~finite & ~y.isnan()]), f"{what}: other infinities"
    assert rel_err(x[finite], y[finite]) <= tol, f"{what} off by {rel_err(x[finite], y[finite]):.2e}"


@pytest.mark.parametrize("tclip", [20.0, 60.0, None])
def test_every_epilogue_version_matches_float64(tclip):
    """Each compiled version of the CPU epilogue this CPU runs (build_info()["cpu_epilogue"],
    the first in use) against float64 arithmetic on one tile, positives at the edges and in
    the middle, neg_lse the rows' own: the branch-free exp and tanh keep a few float32 ulp,
    and the float32 rounding of s and of s - neg_lse (|s| up to about 60, ulp 4e-6) bounds
    the norm-wise error at 1e-5."""
    from amdim_kernels import build_info

    versions = build_info()["cpu_epilogue"]
    assert versions[-1] == "baseline"
    rows, m0, m1, l = 37, 3, 11, 7
    a = 6 * torch.randn(rows, (m1 - m0) * l)
    a[3] *= 40  # scores in the thousands: tanh saturated, exp at its clamp
    a[4, 5], a[5, 9] = float("nan"), float("inf")  # poisoned rows
    pos_idx = torch.randint(0, 14, (rows,))  # some rows' positives lie outside the tile
    pos_idx[:3] = torch.tensor([m0, m1 - 1, (m0 + m1) // 2])
    r, reg_coef, gpos = torch.rand(rows), 0.01 * torch.rand(rows), -torch.rand(rows, l)
    _, shift, total, sq, _ = _epilogue_truth(a, pos_idx, m0, m1, l, tclip, torch.zeros(rows), r, reg_coef, gpos)
    # the tile is the whole row here; a row with a non-finite score has neg_lse NaN (row_lse)
    neg_lse = torch.where(sq.isnan(), float("nan"), shift + total.log()).float()
    want = _epilogue_truth(a, pos_idx, m0, m1, l, tclip, neg_lse, r, reg_coef, gpos)
    for version in versions:
        pos, shift, total, sq, g = torch.ops.amdim_kernels.epilogue_tile(a, pos_idx, m0, m1, l, tclip, neg_lse, r,
                                                                         reg_coef, gpos, version)
        inside = (pos_idx >= m0) & (pos_idx < m1)
        got = (pos[inside], shift, total, sq, g)
        for name, x, y in zip(("positives", "shift", "sum", "sq", "g"), got, want):
            _assert_close_with_nans(x, y, 1e-5, f"{version}: {name}")
    with pytest.raises(ValueError, match="epilogue version mmx does not run here"):
        torch.ops.amdim_kernels.epilogue_tile(a, pos_idx, m0, m1, l, tclip, neg_lse, r, reg_coef, gpos, "mmx")


def _ulps(x, truth):
    """|x - truth| in units of float32's spacing at truth (float64): 2^(e - 24) for truth in
    [2^(e-1), 2^e), 2^-149 among the subnormals."""
    _, e = torch.frexp(truth.abs())
    return (x.double() - truth).abs() / torch.ldexp(torch.ones_like(truth), (e - 24).clamp(min=-149))


def test_epilogue_tanh_and_exp_keep_their_float32_accuracy():
    """The epilogue's branch-free tanh and exp, read one value at a time through epilogue_tile,
    for every version the CPU runs, against float64 on fresh random arguments. tanh: tclip 1
    and every column a positive, so the positives' s is tanh(a) itself; below 6 ulp with FMA
    (avx2, avx512), 7 without (baseline: each Horner step rounds twice). exp: no clip, every
    column a negative, neg_lse 0, r 1 and reg_coef 0, so g is exp(a); about 1 ulp on [-87, 0],
    where e^a is a normal float32."""
    from amdim_kernels import build_info

    rows, l = 512, 2048
    a = torch.empty(rows, l).uniform_(-10, 10)
    a[:64] = torch.randn(64, l).sign() * 10 ** torch.empty(64, l).uniform_(-30, 0)  # relative accuracy near 0
    b = torch.empty(rows, l).uniform_(-87, 0)
    zeros, ones = torch.zeros(rows), torch.ones(rows)
    for version in build_info()["cpu_epilogue"]:
        s, *_ = torch.ops.amdim_kernels.epilogue_tile(a, torch.zeros(rows, dtype=torch.long), 0, 1, l, 1.0, zeros, ones,
                                                      zeros, torch.zeros(rows, l), version)
        worst = _ulps(s, torch.tanh(a.double())).max().item()
        assert worst <= (7.0 if version == "baseline" else 6.0), f"{version}: tanh off by {worst:.2f} ulp"
        *_, g = torch.ops.amdim_kernels.epilogue_tile(b, torch.ones(rows, dtype=torch.long), 0, 1, l, None, zeros, ones,
                                                      zeros, torch.zeros(rows, l), version)
        worst = _ulps(g, torch.exp(b.double())).max().item()
        assert worst <= 1.5, f"{version}: exp off by {worst:.2f} ulp"


def _three_product_node(loss):
    """The ThreeProductLoss node behind nce_loss's output, which holds the stored gradients."""
    fn = loss.grad_fn
    while fn is not None and not hasattr(fn, "stored"):
        fn = fn.next_functions[0][0]
    return fn


def test_stored_gradients_are_released_by_any_backward():
    """The graph keeps no stored gradient after a backward, scaled or recomputed."""
    src, trg = torch.randn(12, 8).requires_grad_(), torch.randn(12, 5, 8).requires_grad_()
    node = _three_product_node

    for objective in (lambda lo, rg: lo + rg, lambda lo, rg: lo):  # scaled, recomputed
        with settings(schedule="three-product"):
            loss, reg = nce_loss(src, trg, backend="cpp")
        assert node(loss).stored is not None
        objective(loss, reg).backward()
        assert node(loss).stored is None


TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU through Triton's interpreter
# The GPU backends' three-product schedules: Triton's (under the interpreter without a GPU;
# on a GPU among the tests marked gpu) and the CUDA op's (a GPU only)
GPU_SCHEDULES = [pytest.param("triton", TRITON_DEVICE, id="triton",
                              marks=[pytest.mark.gpu] * (TRITON_DEVICE == "cuda")),
                 pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu)]


def _skip_unless(backend, device):
    if backend not in available_backends(device):
        pytest.skip(f"backend {backend!r} does not run on {device} here")


@pytest.mark.parametrize("backend, device", GPU_SCHEDULES)
@pytest.mark.parametrize("blocks", ["one", "several"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("upstream", ["matching", "other"])
@pytest.mark.parametrize("reduction, groups", [("mean", 1), ("group_means", 2)])
def test_gpu_three_product_matches_truth(reduction, groups, upstream, dtype, blocks, backend, device, request):
    """backends "triton" and "cuda" under settings(schedule="three-product"): the block's
    cuBLAS scores read by the forward and G kernels (triton_nce/three_product.py,
    csrc/nce_cuda_fused.cpp), in one block (the default budget: d trg from one product in the
    inputs' dtype) or several (d trg summed in float32), against the float64 truth by
    truth.py's criterion; the matching upstream takes the stored gradients."""
    _skip_unless(backend, device)
    seed = SEED + zlib.crc32(request.node.name.encode())
    gen = torch.Generator().manual_seed(seed)
    src, trg, pos_idx, group_rows = _draw(gen, dtype, groups)
    src, trg = src.to(device), trg.to(device)
    if isinstance(pos_idx, torch.Tensor):
        pos_idx = pos_idx.to(device)
    n = src.shape[0]
    if upstream == "matching":
        weights, reg_upstream = ([k / n for k in group_rows] if reduction == "group_means" else [1.0]), 1.0
    else:
        weights = (torch.rand(len(group_rows) if reduction == "group_means" else 1, generator=gen) + 0.5).tolist()
        reg_upstream = 2.5

    def three_product(s, t, p, r, **options):  # blocks of about n / 2 rows: G beside the scores
        budget = (4 + s.element_size()) * t.shape[0] * t.shape[1] * max(1, n // 2) if blocks == "several" else None
        with settings(schedule="three-product", workspace_bytes=budget):
            return nce_loss(s, t, p, reduction=r, backend=backend, **options)

    def to_cpu(outputs):
        return tuple(None if x is None else x.cpu() for x in outputs)

    # the stored gradients' dtypes: the inputs', but d trg in float32 summed over several blocks
    loss, _ = three_product(src.clone().requires_grad_(), trg.clone().requires_grad_(), pos_idx, reduction)
    several = blocks == "several" and n > 1
    assert [g.dtype for g in _three_product_node(loss).stored] == [dtype, torch.float32 if several else dtype]
    with _CountOps() as counted:
        got = to_cpu(_grads(three_product, src, trg, pos_idx, reduction, group_rows, weights, reg_upstream,
                            ("src", "trg")))
    if backend == "cuda":
        assert counted.ops["nce_fwd_grad"] == 1
        assert counted.ops["nce_bwd"] == (0 if upstream == "matching" else 1)
    ref = to_cpu(_grads(_reference, src, trg, pos_idx, reduction, group_rows, weights, reg_upstream, ("src", "trg")))
    cpu_idx = pos_idx.cpu() if isinstance(pos_idx, torch.Tensor) else pos_idx
    truth = _grads(lambda s, t, p, r, **o: _truth(s, t, p, r, group_rows, **o), src.double().cpu(),
                   trg.double().cpu(), cpu_idx, reduction, group_rows, weights, reg_upstream, ("src", "trg"))
    assert_outputs_match(got, ref, truth, dtype, f"{backend} three-product",
                         context=f" (seed {SEED}, src {tuple(src.shape)}, trg {tuple(trg.shape)})")


@pytest.mark.parametrize("backend, device", GPU_SCHEDULES)
def test_gpu_three_product_refuses_float16(backend, device):
    _skip_unless(backend, device)
    src = torch.randn(4, 8, device=device, dtype=torch.float16).requires_grad_()
    with settings(schedule="three-product"), pytest.raises(ValueError, match="takes float32 and bfloat16 inputs"):
        nce_loss(src, torch.randn(4, 3, 8, device=device, dtype=torch.float16), backend=backend)
