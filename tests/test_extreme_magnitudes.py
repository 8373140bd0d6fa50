"""Scores of any magnitude float32 holds, on every backend.

A problem whose scores are finite gives finite answers that match the float64 truth, from
features of 1e-15 to those whose dot products reach 1e36 (a score's square, or a row's sum
of squares, may overflow float32 there: that must not poison anything). A score that is not
finite (a NaN or Inf in an input, or a dot product past float32's range) poisons exactly
its row: the row's L losses, reg, and every entry of the row's gradient are NaN, so d src is
NaN in that row and d trg is NaN everywhere; every other row's losses and d src are finite
and exact.

The finite problems are drawn by hypothesis (which shrinks a failing one to its smallest);
each draw's torch seed is part of the example, so a failure prints what replays it.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from amdim_kernels import nce_loss
from amdim_kernels import settings as settings_of
from truth import EXTRA_TOL, NAMES, Case, backends_here, outputs_and_grads, rel_err, truth_of

FLT_MAX = torch.finfo(torch.float32).max
BACKENDS = backends_here()


@st.composite
def finite_problems(draw, device: str):
    """A small problem whose features have magnitudes 10^e_src and 10^e_trg, its scores
    anywhere in float32's range: every product of two features and every dot product is
    below FLT_MAX / 10 (the backends form <src, trg> before or after the scale, in any
    order), and so is every output of the float64 truth."""
    n, m, l, d = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 16))
    e_src, e_trg = draw(st.integers(-15, 18)), draw(st.integers(-15, 18))
    assume(e_src + e_trg <= 34)
    scale = draw(st.sampled_from([None, 1.0, 1e-6]))
    tclip = draw(st.sampled_from([20.0, None, 50.0]))
    reg_weight = draw(st.sampled_from([0.05, 0.0]))
    reduction = draw(st.sampled_from(["mean", "none"]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(n, d, generator=gen, dtype=torch.float64) * 10.0 ** e_src
    trg = torch.randn(m, l, d, generator=gen, dtype=torch.float64) * 10.0 ** e_trg
    pos_idx = torch.randint(0, m, (n,), generator=gen)
    case = Case(src.float().to(device), trg.float().to(device), pos_idx.to(device), tclip, reg_weight, scale,
                reduction)
    return case


def _norm(x) -> float:
    return x.double().cpu().norm().item()


def _err(x, truth) -> float:
    return _norm(x.double().cpu() - truth.double().cpu())


def _all_finite_below(tensors, bound: float) -> bool:
    return all(bool((t.abs() < bound).all()) for t in tensors if t is not None)


@pytest.mark.parametrize("backend, device", BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.filter_too_much,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_finite_scores_of_any_magnitude_give_finite_exact_answers(backend, device, data):
    case = data.draw(finite_problems(device))
    truth = truth_of(case)
    # the truth's loss and gradients within float32's range, with room for rounding; reg may
    # pass it (mean(a^2) of scores past 1e19), and is checked apart
    assume(_all_finite_below((truth[0], truth[2], truth[3]), FLT_MAX / 16))
    # a reduced loss runs each backend's three-product schedule too (the GPU backends take it
    # only where set)
    schedule = data.draw(st.sampled_from(["auto", "three-product"] if case.reduction == "mean" else ["auto"]))
    with settings_of(schedule=schedule):
        got = outputs_and_grads(nce_loss, case, backend=backend)
    ref = outputs_and_grads(nce_loss, case, backend="reference")
    # Absolute floors where an output is about 0 (a saturated softmax or clip: the float64
    # truth itself may round it to 0): for the losses float32's rounding of a log-sum-exp of
    # order 1; for a gradient, float32's rounding of its largest possible term, an upstream
    # weight (at most 1.5, plus reg's) times scale times the other operand's largest entry.
    scale = case.scale if case.scale is not None else case.src.shape[1] ** -0.5
    floors = {0: 1e-6, 2: 1e-6 * scale * case.trg.abs().max().item(), 3: 1e-6 * scale * case.src.abs().max().item()}
    for k in (0, 2, 3):
        assert torch.isfinite(got[k]).all(), f"{NAMES[k]}: {backend} gave non-finite entries"
        # the float32 reference's error, plus float32's rounding in another order
        e_got, e_ref = _err(got[k], truth[k]), _err(ref[k], truth[k])
        allowed = e_ref + 10 * EXTRA_TOL[torch.float32] * _norm(truth[k]) + floors[k] * got[k].numel() ** 0.5
        assert e_got <= allowed, f"{NAMES[k]}: {backend} error {e_got:.3g} vs reference {e_ref:.3g}"
    reg, reg64 = got[1].double().item(), truth[1].item()
    assert not math.isnan(reg), "reg is NaN where every score is finite"
    if reg64 < FLT_MAX / 1e3:
        # float32's sums of squares (a^2 in float32, then summed) overflow past scores of about
        # 1.8e19 and flush below about 1e-19: the reference rounds the same, so the
        # criterion is its error
        assert rel_err(got[1], truth[1]) <= rel_err(ref[1], truth[1]) + 10 * EXTRA_TOL[torch.float32]
    # past that, reg itself, or the sum of squares before the mean, passes FLT_MAX: +inf is
    # then the float32 answer, and a backend summing in float64 may give the finite one
    assert reg == math.inf or rel_err(got[1], truth[1]) <= 1e-4


@pytest.mark.parametrize("backend, device", backends_here(fused_only=True))
@pytest.mark.parametrize("schedule", ["four-product", "three-product"])
def test_reg_weight_0_gives_reg_0_where_sums_of_squares_overflow(backend, device, schedule):
    """Scores of about 1e20: their squares pass float32's range, their soft-clipped losses do
    not. reg_weight 0 must then give reg 0 (not 0 * inf = NaN) and finite gradients, in
    each schedule."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    src = (1e10 * torch.randn(4, 8, generator=gen)).to(device).requires_grad_()
    trg = (1e10 * torch.randn(5, 3, 8, generator=gen)).to(device).requires_grad_()
    pos_idx = torch.tensor([0, 4, 2, 2], device=device)
    with settings_of(schedule=schedule):
        loss, reg = nce_loss(src, trg, pos_idx, tclip=20.0, reg_weight=0.0, backend=backend)
    assert reg.item() == 0.0, f"{backend}, {schedule}: reg {reg.item()}"
    assert torch.isfinite(loss).all()
    dsrc, dtrg = torch.autograd.grad(loss + reg, (src, trg))
    assert torch.isfinite(dsrc).all() and torch.isfinite(dtrg).all()


# (label, dtypes, how one problem is poisoned): `rows` lists the poisoned rows
POISONS = {
    "src NaN": ((torch.float32, torch.bfloat16, torch.float16), lambda src, trg: src.__setitem__((1, 2), math.nan)),
    "src +inf": ((torch.float32, torch.bfloat16, torch.float16), lambda src, trg: src.__setitem__((3, 0), math.inf)),
    "src -inf": ((torch.float32, torch.float16), lambda src, trg: src.__setitem__((0, 1), -math.inf)),
    "trg inf": ((torch.float32, torch.bfloat16), lambda src, trg: trg.__setitem__((2, 1, 3), math.inf)),
    # every product of row 1's features with a target's overflows float32: each of its scores
    # is infinite (or NaN) in any order of summation, and before or after the scale
    "overflow": ((torch.float32, torch.bfloat16), None),
}


def _poisoned_case(kind: str, dtype, device: str, tclip, reduction: str):
    n, m, l, d = 5, 6, 3, 8
    src = torch.randn(n, d, dtype=torch.float64)
    trg = torch.randn(m, l, d, dtype=torch.float64)
    if kind == "overflow":
        trg = trg.sign() * (1.0 + trg.abs()) * 1e10  # |features| >= 1e10 ...
        src *= 1e-10
        src[1] = src[1].sign() * (1.0 + src[1].abs()) * 1e30  # ... times >= 1e30: past 3.4e38
        rows = [1]
    else:
        POISONS[kind][1](src, trg)
        rows = list(range(n)) if kind.startswith("trg") else [int(torch.isfinite(src).all(1).logical_not().nonzero())]
    src, trg = src.to(dtype), trg.to(dtype)
    pos_idx = torch.tensor([0, 2, 5, 2, 1])
    return Case(src.to(device), trg.to(device), pos_idx.to(device), tclip, 0.05, None, reduction), rows


POISON_PARAMS = [pytest.param(kind, dtype, id=f"{kind}-{str(dtype)[6:]}")
                 for kind, (dtypes, _) in POISONS.items() for dtype in dtypes]


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("kind, dtype", POISON_PARAMS)
@pytest.mark.parametrize("tclip, reduction", [(20.0, "none"), (None, "mean"), (50.0, "none")])
def test_a_non_finite_score_poisons_exactly_its_row(backend, device, kind, dtype, tclip, reduction):
    case, rows = _poisoned_case(kind, dtype, device, tclip, reduction)
    loss, reg, dsrc, dtrg = outputs_and_grads(nce_loss, case, backend=backend)
    truth = truth_of(case)
    bad = torch.zeros(case.src.shape[0], dtype=torch.bool)
    bad[rows] = True
    loss, dsrc, dtrg = loss.cpu(), dsrc.cpu(), dtrg.cpu()
    assert reg.isnan(), "reg"
    assert dtrg.isnan().all(), "d trg: every column is touched by the poisoned rows"
    assert dsrc[bad].isnan().all(), "d src of the poisoned rows"
    clean = ~bad
    if clean.any():
        assert torch.isfinite(dsrc[clean]).all(), "d src of the clean rows"
        tol = 1e-5 if dtype == torch.float32 else EXTRA_TOL[dtype]
        assert rel_err(dsrc[clean], truth[2][clean]) <= tol, "d src of the clean rows"
    if reduction == "mean":
        assert loss.isnan()
    else:
        assert loss[bad].isnan().all()
        assert torch.isfinite(loss[clean]).all()
        if clean.any():
            assert rel_err(loss[clean], truth[0][clean]) <= 1e-5
