"""amdim_kernels.nce_loss_reference against the independent float64 statement of the loss (docs/loss.md)."""
import pytest
import torch

from amdim_kernels import nce_loss, nce_loss_reference
from truth import make_case, outputs_and_grads, rel_err, truth_of

# ||err|| / ||truth|| bounds. Loss and reg are float32 math on exactly-upcast inputs in every
# dtype: float32 rounding. Gradients are rounded once to the input dtype at the end:
# about 2^-11 (float16) or 2^-8 (bfloat16) per element.
LOSS_TOL = 2e-5
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

SHAPES = [  # (N, M, L, D, pos)
    (1, 1, 1, 1, "arange"),
    (1, 5, 3, 8, "random"),
    (6, 1, 4, 3, "random"),  # M = 1: no negatives, every loss is 0
    (8, 8, 49, 17, "arange"),
    (5, 5, 25, 33, "arange"),
    (9, 4, 1, 31, "random"),  # N != M, repeated pos_idx, L = 1
    (12, 12, 1, 64, "arange"),
]
OPTIONS = [
    dict(),
    dict(tclip=None),
    dict(reg_weight=0.0),
    dict(reduction="none"),
    dict(tclip=5.0, reg_weight=0.5, scale=0.3, reduction="none"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_matches_spec(shape, options, dtype):
    n, m, l, d, pos = shape
    case = make_case(n, m, l, d, dtype=dtype, pos=pos, **options)
    truth = truth_of(case)
    got = outputs_and_grads(nce_loss, case, backend="reference")
    assert got[0].dtype == got[1].dtype == torch.float32
    assert got[0].shape == truth[0].shape
    assert got[2].dtype == got[3].dtype == dtype
    for name, x, t in zip(("loss", "reg"), got[:2], truth[:2]):
        assert rel_err(x, t) < LOSS_TOL, name
    for name, x, t in zip(("d src", "d trg"), got[2:], truth[2:]):
        if t.abs().max() == 0:  # M = 1 and no regulariser: nothing to learn
            assert x.abs().max() == 0, name
        else:
            # below the dtype's normal range results lie on a grid of its smallest subnormal
            # (float16: 2^-24 = 6e-8), which bounds the absolute error from below: half of it
            # per element beside the relative tolerance
            floor = 0.5 * torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps * t.numel() ** 0.5
            err = (x.double().cpu() - t.double().cpu()).norm().item()
            assert err < GRAD_TOL[dtype] * t.double().norm().item() + floor, (name, rel_err(x, t))


def test_no_negatives_gives_zero_loss():
    case = make_case(3, 1, 7, 5, pos="random")
    loss, _ = nce_loss(case.src, case.trg, case.pos_idx, backend="reference", reduction="none")
    assert torch.equal(loss, torch.zeros(3, 7))


@pytest.mark.parametrize("tclip", [20.0, None])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reference_gradcheck_float64(tclip, reduction):
    src = (3 * torch.randn(4, 5, dtype=torch.float64)).requires_grad_()
    trg = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    pos_idx = torch.tensor([0, 2, 2, 1])

    def f(s, t):
        return nce_loss_reference(s, t, pos_idx, tclip, 0.05, 0.4, reduction)

    assert torch.autograd.gradcheck(f, (src, trg))
    assert torch.autograd.gradgradcheck(f, (src, trg))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["src", "trg"])
@pytest.mark.parametrize("tclip", [20.0, None])
def test_non_finite_input_gives_nan(bad, where, tclip):
    case = make_case(4, 4, 3, 6)
    (case.src if where == "src" else case.trg).view(-1)[5] = bad
    loss, _ = nce_loss(case.src, case.trg, tclip=tclip, backend="reference")
    assert torch.isnan(loss)


@pytest.mark.parametrize("reduction, shape", [("mean", ()), ("none", (6, 3))])
def test_meta_tensors_give_the_output_shapes(reduction, shape):
    """The reference runs on meta tensors (shapes and dtypes, no data): for sizing a problem
    without memory, and for tracers that need no kernel."""
    src = torch.empty(6, 8, device="meta", dtype=torch.bfloat16)
    trg = torch.empty(9, 3, 8, device="meta", dtype=torch.bfloat16)
    loss, reg = nce_loss(src, trg, range(6), reduction=reduction, backend="reference")
    assert (loss.device.type, loss.shape, loss.dtype) == ("meta", shape, torch.float32)
    assert (reg.device.type, reg.shape, reg.dtype) == ("meta", (), torch.float32)
