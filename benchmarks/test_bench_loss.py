"""pytest-benchmark suite: nce_loss forward, backward and forward+backward per backend.

    pytest benchmarks            # (make bench) sizes that fit the device
    pytest benchmarks --benchmark-json out.json

On a GPU every timed call ends with torch.cuda.synchronize(). Timings are reported, never
asserted; the sweep with memory, FLOP rates and plots is `python -m benchmarks.run`.
"""
import pytest
import torch

from amdim_kernels import available_backends, nce_loss

from . import problems
from .run import impl_context

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in available_backends(DEVICE) if not (b == "triton" and DEVICE == "cpu")]
if "cuda" in BACKENDS:  # the CUDA backend's fused WMMA path too (AMDIM_KERNELS_CUDA_SCORES=mma)
    BACKENDS.append("cuda:mma")
SIZES = [problems.CIFAR, problems.ONE_GPU_SHARE, problems.SINGLE_GPU] if DEVICE == "cuda" else [
    problems.Problem("N=M=64, L=49, D=256", 64, 64, 49, 256), problems.Problem("N=M=256, L=49, D=256", 256, 256, 49, 256)]
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(autouse=True)
def _pinned(request):
    """backend "cuda:mma": the cuda backend with its WMMA score path, forward and backward."""
    backend = request.node.callspec.params.get("backend", "")
    with impl_context(backend):
        yield


@pytest.fixture(params=SIZES, ids=lambda p: p.name)
def inputs(request):
    src, trg, pos_idx = request.param.inputs(DTYPE, DEVICE)
    return src.requires_grad_(), trg.requires_grad_(), pos_idx


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward(benchmark, inputs, backend):
    src, trg, pos_idx = inputs

    def run():
        with torch.no_grad():
            out = nce_loss(src, trg, pos_idx, backend=backend.split(":")[0])
        _sync()
        return out

    loss, reg = benchmark(run)
    assert torch.isfinite(loss) and torch.isfinite(reg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward(benchmark, inputs, backend):
    src, trg, pos_idx = inputs

    def run():
        loss, reg = nce_loss(src, trg, pos_idx, backend=backend.split(":")[0])
        grads = torch.autograd.grad(loss + reg, (src, trg))
        _sync()
        return grads

    dsrc, dtrg = benchmark(run)
    assert dsrc.shape == src.shape and dtrg.shape == trg.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward(benchmark, inputs, backend):
    src, trg, pos_idx = inputs

    def setup():  # a fresh graph per round; only the backward is timed
        loss, reg = nce_loss(src, trg, pos_idx, backend=backend.split(":")[0])
        _sync()
        return (loss + reg,), {}

    def run(total):
        grads = torch.autograd.grad(total, (src, trg))
        _sync()
        return grads

    dsrc, _ = benchmark.pedantic(run, setup=setup, rounds=5 if DEVICE == "cpu" else 50)
    assert dsrc.shape == src.shape
