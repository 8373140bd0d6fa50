"""An independent float64 statement of the loss of docs/loss.md#definition, and helpers to compare with it.

Written differently from amdim_kernels/reference.py on purpose: one row at a time, the
denominator built by concatenating the positive with the row's negatives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def spec_loss_f64(src, trg, pos_idx, tclip, reg_weight, scale, reduction):
    src, trg = src.double(), trg.double()
    n, d = src.shape
    m, l, _ = trg.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    rows, sq_total = [], 0.0
    for i in range(n):
        a = scale * (trg @ src[i])  # (M, L)
        sq_total = sq_total + (a * a).sum()
        s = a if tclip is None else tclip * torch.tanh(a / tclip)
        p = int(pos_idx[i])
        negatives = torch.cat([s[:p], s[p + 1:]]).reshape(-1)
        row = []
        for loc in range(l):
            logits = torch.cat([s[p, loc].reshape(1), negatives])
            row.append(torch.logsumexp(logits, 0) - logits[0])  # -nce[i, loc]
        rows.append(torch.stack(row))
    per_positive = torch.stack(rows)
    reg = reg_weight * sq_total / (n * m * l)
    loss = per_positive.mean() if reduction == "mean" else per_positive
    return loss, reg


@dataclass
class Case:
    src: torch.Tensor
    trg: torch.Tensor
    pos_idx: torch.Tensor | None
    tclip: float | None = 20.0
    reg_weight: float = 0.05
    scale: float | None = None
    reduction: str = "mean"

    def kwargs(self):
        return dict(tclip=self.tclip, reg_weight=self.reg_weight, scale=self.scale, reduction=self.reduction)


def backends_here(fused_only: bool = False) -> list:
    """(backend, device) for every backend that runs on this machine, the CPU's first, each as
    a pytest.param marked `gpu` on a CUDA device; fused_only leaves the reference out."""
    import pytest

    from amdim_kernels import available_backends

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [pytest.param(backend, device, marks=[pytest.mark.gpu] if device == "cuda" else [])
            for device in devices for backend in available_backends(device)
            if not (fused_only and backend == "reference")]


def make_case(n, m, l, d, *, dtype=torch.float32, device="cpu", pos="arange", spread=4.0,
              trg_layout="contiguous", src_layout="contiguous", **options) -> Case:
    """Fresh random inputs; `spread` scales src so that scores reach the tanh's bend.
    src_layout "transposed": src (N, D) with stride N along D (as the trainer's 5->5 sources,
    one location picked out of each feature map, have stride H*W)."""
    if src_layout == "contiguous":
        src = (spread * torch.randn(n, d, device=device)).to(dtype)
    else:
        src = (spread * torch.randn(d, n, device=device)).to(dtype).t()
    if trg_layout == "contiguous":
        trg = torch.randn(m, l, d, device=device).to(dtype)
    else:  # what the trainer passes: a (M, D, H*W) feature map seen as (M, L, D)
        trg = torch.randn(m, d, l, device=device).to(dtype).transpose(1, 2)
    if pos == "arange":
        assert n == m
        pos_idx = None
    elif pos == "random":  # repeats allowed
        pos_idx = torch.randint(0, m, (n,), device=device)
    else:
        pos_idx = pos.to(device)
    return Case(src, trg, pos_idx, **options)


# (tclip, depth) of far_below_tclip_case: a shift by tclip is exact up to tclip = 40 (each
# term exp(s - tclip) >= exp(-80), a normal float32); past it the kernels take a running
# maximum, and the clip must not lose a to rounding (tclip = 1e30: s = a).
FAR_BELOW_TCLIP = [(20.0, 18.0), (40.0, 38.0), (100.0, 90.0), (1e30, 30.0)]


def far_below_tclip_tol(dtype) -> float:
    """The extra error allowed there (every output). float32: 1e-4, as the GPU kernels form G
    at a score s from s - tclip, up to 2 tclip = 80 in magnitude, where the reference forms s
    - neg_lse: about twice its rounding, which d src's cancellation multiplies (Triton: 4e-5
    against the reference's 3e-5 at tclip 100, under the interpreter). 16-bit: EXTRA_TOL, G's
    own rounding. A lost row is off by 1."""
    return 1e-4 if dtype == torch.float32 else EXTRA_TOL[dtype]


def far_below_tclip_case(n, m, l, d, tclip, depth, *, pos="random", device="cpu", dtype=torch.float32) -> Case:
    """Every score about -depth, positives included: a row's terms exp(s - tclip) are then all
    about exp(-depth - tclip), which float32 flushes to 0 past exp(-104) (GPUs past
    exp(-87)). A constant shift by tclip would lose the whole row there: a loss of 0 where
    the truth is about log(1 + (M - 1) L), and NaN gradients. src rows about ones(D),
    targets about -depth / sqrt(D) ones(D), so that a = <src, trg> / sqrt(D) is about
    -depth (+-3).

    The case is ill-conditioned for d src: each row's G sums to about 0 against targets that
    share one large direction, so d src is a small difference of large terms, and even the
    float32 reference is off by up to 3e-5 (measured). Its tests take far_below_tclip_tol."""
    case = make_case(n, m, l, d, pos=pos, device=device, spread=0.3, tclip=tclip, reduction="none")
    case.src = (case.src + 1.0).to(dtype)
    case.trg = (3.0 * case.trg - depth / math.sqrt(d)).to(dtype)
    return case


# inputs whose memory is laid out as no test problem's: (src shape, trg shape, their views)
ODD_LAYOUTS = {
    "trg expanded over M": ((4, 64), (1, 3, 64), lambda s, t: (s, t.expand(5, 3, 64))),
    "trg expanded over L": ((4, 64), (5, 1, 64), lambda s, t: (s, t.expand(5, 3, 64))),
    "src expanded over N": ((1, 64), (5, 3, 64), lambda s, t: (s.expand(4, 64), t)),
    "slices off alignment": ((5, 65), (7, 3, 65), lambda s, t: (s[1:, 1:], t[1:6, :, 1:])),
}


def assert_odd_layout_matches_reference(backend: str, device: str, layout: str, dtype=torch.float32):
    """Expanded (stride 0) and misaligned views (ODD_LAYOUTS): the reference's loss and
    gradients, on the same rounded inputs, to 1e-5 relative (float32 sums in another order)
    plus EXTRA_TOL for the gradients. The gradients are those of the views the backends are
    handed, (N, D) and (M, L, D): what their kernels compute. Autograd then sums an expanded
    view's gradient into the tensor it views, in the input dtype; over M images whose
    gradients largely cancel (each row's softmax gradient sums to about 0), that bfloat16
    sum differs between any two backends by more than EXTRA_TOL, with nothing of ours in it."""
    from amdim_kernels import nce_loss

    src_shape, trg_shape, views = ODD_LAYOUTS[layout]
    base = (torch.randn(src_shape, device=device).to(dtype), torch.randn(trg_shape, device=device).to(dtype))
    pos_idx = torch.tensor([0, 4, 2, 2], device=device)
    out = {}
    for name in ("reference", backend):
        viewed = views(*(b.clone().requires_grad_() for b in base))
        loss, reg = nce_loss(*viewed, pos_idx, backend=name)
        out[name] = (loss, reg, *torch.autograd.grad(loss + reg, viewed))
    for k, (got, want) in enumerate(zip(out[backend], out["reference"])):
        tol = LOSS_EXTRA_TOL + (EXTRA_TOL[dtype] if k >= 2 else 0.0)
        assert got.dtype == want.dtype and got.shape == want.shape, NAMES[k]
        assert rel_err(got, want) <= tol, f"{NAMES[k]}: {backend} off the reference by {rel_err(got, want):.3g}"


def upstream_weight(shape) -> torch.Tensor:
    """The random weight per positive that the tested gradients are of (the same draw every
    time, on the CPU)."""
    gen = torch.Generator().manual_seed(1234)
    return torch.rand(shape, generator=gen) + 0.5


def outputs_and_grads(fn, case: Case, backend=None, grad_of=("src", "trg")):
    """(loss, reg, d src, d trg) of fn on the case; the gradient of loss.sum() + reg,
    with a random weight per positive for reduction='none'."""
    src = case.src.detach().clone().requires_grad_("src" in grad_of)
    trg = case.trg.detach().clone().requires_grad_("trg" in grad_of)
    kwargs = case.kwargs() if backend is None else dict(case.kwargs(), backend=backend)
    loss, reg = fn(src, trg, case.pos_idx, **kwargs)
    total = (loss * upstream_weight(loss.shape).to(loss.device, loss.dtype)).sum() + 3.0 * reg
    total.backward()
    return loss.detach(), reg.detach(), src.grad, trg.grad


def rel_err(x, truth):
    x, truth = x.double().cpu(), truth.double().cpu()
    return ((x - truth).norm() / truth.norm().clamp_min(1e-30)).item()


def truth_of(case: Case):
    """spec_loss_f64's outputs and float64 gradients on the case's (already rounded) inputs."""
    pos_idx = case.pos_idx if case.pos_idx is not None else torch.arange(case.src.shape[0])
    case64 = Case(case.src.double().cpu(), case.trg.double().cpu(), pos_idx.cpu(), **case.kwargs())
    return outputs_and_grads(spec_loss_f64, case64)


# Options every fused backend is tested under (beside the defaults): no clipping, no
# regulariser, per-positive losses, and everything off its default at once.
KERNEL_OPTIONS = [dict(), dict(tclip=None), dict(reg_weight=0.0), dict(reduction="none"),
                  dict(tclip=3.0, reg_weight=0.2, scale=0.5, reduction="none")]

# Criterion (as Cut Cross-Entropy's tests): a backend's error against the float64 truth is no
# larger than the reference's error in the same dtype plus a tolerance for what the backend
# rounds differently: float32 sums in another order (loss, reg), and for the gradients the
# GPU backends' G tiles, which have the inputs' dtype (2^-8 relative for bfloat16, 2^-11 for
# float16).
EXTRA_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
LOSS_EXTRA_TOL = 1e-5
NAMES = ("loss", "reg", "d src", "d trg")


def assert_matches_truth(case: Case, dtype, backend: str | None = None, grad_of=("src", "trg"), truth=None,
                         fn=None, tol: float | None = None):
    """nce_loss with `backend` (or `fn`, called as nce_loss is, without a backend) against the
    truth, by the criterion above; `tol` replaces the extra tolerances for every output."""
    from amdim_kernels import nce_loss

    truth = truth or truth_of(case)
    truth = tuple(t if k < 2 or NAMES[k][2:] in grad_of else None for k, t in enumerate(truth))
    ref = outputs_and_grads(nce_loss, case, backend="reference", grad_of=grad_of)
    got = outputs_and_grads(fn or nce_loss, case, backend=backend, grad_of=grad_of)
    assert_outputs_match(got, ref, truth, dtype, backend or fn.__qualname__, tol)


def assert_outputs_match(got, ref, truth, dtype, who: str, tol: float | None = None, context: str = ""):
    """(loss, reg, d src, d trg) of an implementation (`got`) against the float64 `truth` by
    the criterion above, `ref` being the reference's in the same dtype; a gradient whose
    truth is None must be None (its input needs none)."""
    for k, name in enumerate(NAMES):
        t, r, g = truth[k], ref[k], got[k]
        if t is None:
            assert g is None, f"{name}: gradient computed for an input that needs none"
            continue
        assert g.shape == t.shape and g.dtype == r.dtype, name
        assert not torch.isnan(g).any(), name
        if t.abs().max() == 0:
            assert g.abs().max() == 0, name
            continue
        extra = tol if tol is not None else LOSS_EXTRA_TOL if k < 2 else EXTRA_TOL[dtype]
        e_got, e_ref = rel_err(g, t), rel_err(r, t)
        assert e_got <= e_ref + extra, f"{name}: {who} error {e_got:.3g} vs reference {e_ref:.3g}{context}"


def assert_gradients_of_each_output(backend: str, device: str, reduction: str, used: str):
    """The gradients through `loss` alone, `reg` alone, or both, match the reference's. The
    ops form both outputs themselves and read their upstream gradients as autograd hands them
    over: none for an output left unused, the mean's as one value broadcast, and here, for
    reduction "none", a transposed (N, L) gradient (the backward of loss.t())."""
    from amdim_kernels import nce_loss

    case = make_case(9, 7, 5, 12, pos="random", device=device, reduction=reduction)
    weight = torch.rand(9, 5, device=device) + 0.5
    grads = {}
    for name in ("reference", backend):
        src, trg = case.src.clone().requires_grad_(), case.trg.clone().requires_grad_()
        loss, reg = nce_loss(src, trg, case.pos_idx, backend=name, **case.kwargs())
        of_loss = 3.0 * loss if reduction == "mean" else (loss.t() * weight.t()).sum()
        total = {"loss": of_loss, "reg": 5.0 * reg, "both": of_loss + 5.0 * reg}[used]
        grads[name] = torch.autograd.grad(total, (src, trg))
    for got, want, what in zip(grads[backend], grads["reference"], ("d src", "d trg")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item(), msg=what)


def scaled_loss(factor):
    """nce_loss with its outputs times `factor`, as a loss scaler scales them."""
    from amdim_kernels import nce_loss

    def fn(*args, **kwargs):
        loss, reg = nce_loss(*args, **kwargs)
        return loss * factor, reg * factor

    return fn


def assert_float16_loss_scale(backend: str, loss_scale: float, device: str):
    """float16 gradients under a loss scaler's factor keep float16's accuracy: the factor
    neither overflows the backward's G nor, when small, flushes its entries to zero."""
    from amdim_kernels import nce_loss

    case = make_case(40, 40, 25, 24, dtype=torch.float16, device=device)
    truth = truth_of(case)
    ref = outputs_and_grads(nce_loss, case, backend="reference")
    got = outputs_and_grads(scaled_loss(loss_scale), case, backend=backend)
    for k in (2, 3):
        assert torch.isfinite(got[k]).all(), NAMES[k]
        e_got, e_ref = rel_err(got[k].double() / loss_scale, truth[k]), rel_err(ref[k], truth[k])
        assert e_got <= e_ref + EXTRA_TOL[torch.float16], f"{NAMES[k]}: {backend} error {e_got:.3g} vs {e_ref:.3g}"


def assert_float16_g_overflows_only_with_the_gradient(backend: str, device: str):
    """A loss scale of 2^22 puts G far past float16's 65504 while d trg still fits: d trg
    comes out finite and accurate (an unscaled float16 G's infinities make it NaN)."""
    case = make_case(2, 5, 3, 16, pos="random", dtype=torch.float16, device=device, spread=2.0 ** -4)
    truth = truth_of(case)
    got = outputs_and_grads(scaled_loss(2.0 ** 22), case, backend=backend, grad_of=("trg",))
    assert torch.isfinite(got[3]).all()
    assert rel_err(got[3].double() / 2.0 ** 22, truth[3]) <= 1e-3


def float64_truth(case: Case):
    """The reference in float64 on the case's device, for sizes where spec_loss_f64's per-row
    loop is too slow; test_reference.py checks the reference against spec_loss_f64."""
    from amdim_kernels import nce_loss_reference

    src = case.src.double()
    pos_idx = case.pos_idx if case.pos_idx is not None else torch.arange(src.shape[0], device=src.device)
    c64 = Case(src, case.trg.double(), pos_idx, **case.kwargs())
    scale = case.scale or src.shape[1] ** -0.5
    return outputs_and_grads(
        lambda s, t, p, **kw: nce_loss_reference(s, t, p, kw["tclip"], kw["reg_weight"], scale, kw["reduction"]), c64
    )


def assert_cuda_graph_replay_matches_eager(backend: str):
    """fwd+bwd of `backend` under torch.compile(mode="reduce-overhead"), captured and replayed
    as CUDA graphs, gives eager's gradients: the backend neither syncs with the host nor
    allocates outside the graph's pool."""
    from amdim_kernels import nce_loss

    case = make_case(64, 64, 25, 64, dtype=torch.bfloat16, device="cuda")

    def step(src, trg):
        loss, reg = nce_loss(src, trg, backend=backend)
        return torch.autograd.grad(loss + reg, (src, trg))

    want = step(case.src.clone().requires_grad_(), case.trg.clone().requires_grad_())
    compiled = torch.compile(step, mode="reduce-overhead")
    for _ in range(3):  # warm-up, capture, replay; a replay overwrites the last one's outputs
        got = [g.clone() for g in compiled(case.src.clone().requires_grad_(), case.trg.clone().requires_grad_())]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def assert_captured_graph_matches_eager(backend: str):
    """fwd+bwd of `backend` captured by hand as one CUDA graph (torch.cuda.graph), with a
    given pos_idx and N != M, then replayed on new values copied into the same inputs, gives
    what eager gives on those values: nothing in the call reads back to the host while
    capturing (pos_idx's range check runs on the device then) and every buffer comes from
    the graph's pool."""
    from amdim_kernels import nce_loss

    shape = (48, 64, 25, 64)
    first, second = (make_case(*shape, pos="random", dtype=torch.bfloat16, device="cuda") for _ in range(2))
    src, trg = first.src.clone().requires_grad_(), first.trg.clone().requires_grad_()
    pos_idx = first.pos_idx.clone()

    def step(src, trg, pos_idx):
        loss, reg = nce_loss(src, trg, pos_idx, backend=backend)
        return (loss + reg, *torch.autograd.grad(loss + reg, (src, trg)))

    # warm-up on a side stream, as torch.cuda.graph asks: Triton compiles, the allocator fills
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(src, trg, pos_idx)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(src, trg, pos_idx)
    with torch.no_grad():
        src.copy_(second.src)
        trg.copy_(second.trg)
        pos_idx.copy_(second.pos_idx)
    graph.replay()
    want = step(second.src.clone().requires_grad_(), second.trg.clone().requires_grad_(), second.pos_idx)
    for got, w in zip(captured, want):
        torch.testing.assert_close(got, w)
