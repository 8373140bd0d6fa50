"""The package's public surface: NCELoss computes what nce_loss computes and refuses what it
refuses, at construction; the multiscale objective and the version are importable."""
import os
import random
import re

import pytest
import torch

import amdim_kernels
from amdim_kernels import NCELoss, available_backends, multiscale_nce, nce_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_module_is_the_functional(backend):
    rng = random.Random(torch.seed())
    n, m, l, d = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 7), rng.randint(1, 40)
    options = dict(tclip=rng.choice([None, 20.0, 50.0]), reg_weight=rng.choice([0.0, 0.05]),
                   scale=rng.choice([None, 0.3]), reduction=rng.choice(["mean", "none"]))
    src = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    trg = torch.randn(m, l, d, dtype=torch.float64, requires_grad=True)
    pos_idx = torch.randint(0, m, (n,))
    criterion = NCELoss(**options, backend=backend)
    got = criterion(src.float(), trg.float(), pos_idx)
    want = nce_loss(src.float(), trg.float(), pos_idx, **options, backend=backend)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    seed = [torch.randn_like(t) for t in got]

    def grads(outputs):  # reg has no graph on `reference` with reg_weight 0
        total = sum((o * s).sum() for o, s in zip(outputs, seed) if o.requires_grad)
        return torch.autograd.grad(total, (src, trg))

    again = nce_loss(src.float(), trg.float(), pos_idx, **options, backend=backend)
    for g, w in zip(grads(got), grads(again)):
        assert torch.equal(g, w)


@pytest.mark.parametrize("options, error, message", [
    (dict(tclip="20"), TypeError, "tclip must be"),
    (dict(tclip=-1.0), ValueError, "tclip must be a positive finite number or None, got -1.0"),
    (dict(reg_weight=float("nan")), ValueError, "reg_weight must be a finite number >= 0"),
    (dict(scale=True), TypeError, "scale must be"),
    (dict(reduction="sum"), ValueError, "reduction must be one of"),
    (dict(backend="fast"), ValueError, "backend must be one of ('auto', 'reference', 'triton', 'cuda', 'cpp'), got 'fast'"),
])
def test_module_refuses_bad_options_at_construction(options, error, message):
    with pytest.raises(error, match=re.escape(message)):
        NCELoss(**options)
    if "backend" not in options:  # the functional says the same
        with pytest.raises(error, match=re.escape(message)):
            nce_loss(torch.randn(2, 3), torch.randn(2, 4, 3), **options)


def test_module_repr_names_its_options():
    assert repr(NCELoss(tclip=None, reduction="none")) == \
        "NCELoss(tclip=None, reg_weight=0.05, scale=None, reduction='none', backend='auto')"


def test_public_names_and_version():
    for name in amdim_kernels.__all__:
        assert hasattr(amdim_kernels, name), name
    assert multiscale_nce is amdim_kernels.multiscale.multiscale_nce
    with open(os.path.join(ROOT, "setup.py")) as f:  # one version: the package's and the build's
        assert re.search(r'version="([^"]+)"', f.read()).group(1) == amdim_kernels.__version__
