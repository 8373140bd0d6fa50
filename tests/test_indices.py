"""The kept index tensors of pos_idx None and of ranges (amdim_kernels/indices.py)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from amdim_kernels import available_backends, indices, nce_loss


@pytest.fixture(autouse=True)
def nothing_kept(monkeypatch):
    """Each test starts with no kept tensors, and leaves the module's as they were."""
    monkeypatch.setattr(indices, "KEPT", indices.IndexCache())


class _Aranges(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ == "arange"
        return func(*args, **(kwargs or {}))


def _features(n=6, m=6, l=3, d=8, device="cpu"):
    return torch.randn(n, d, device=device, requires_grad=True), torch.randn(m, l, d, device=device, requires_grad=True)


@pytest.mark.parametrize("pos_idx", [None, range(2, 8)], ids=["None", "range"])
def test_second_call_makes_no_indices(pos_idx):
    """The second call with pos_idx None or the same range makes no arange, and both calls'
    losses and gradients are equal bit for bit (backend cpp: no aranges of its own)."""
    if "cpp" not in available_backends("cpu"):
        pytest.skip("the compiled extension is not built")
    src, trg = _features(m=10 if pos_idx else 6)
    with _Aranges() as first:
        loss1, reg1 = nce_loss(src, trg, pos_idx, backend="cpp")
        grads1 = torch.autograd.grad(loss1 + reg1, (src, trg))
    with _Aranges() as second:
        loss2, reg2 = nce_loss(src, trg, pos_idx, backend="cpp")
        grads2 = torch.autograd.grad(loss2 + reg2, (src, trg))
    assert (first.count, second.count) == (1, 0)
    assert torch.equal(loss1, loss2) and torch.equal(reg1, reg2)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2))


def test_indices_made_in_inference_mode_serve_autograd_later():
    """A first call under inference_mode keeps a normal tensor: a later call with gradients
    can save it for backward."""
    src, trg = _features()
    with torch.inference_mode():
        nce_loss(src, trg, backend="reference")
    kept = indices.range_indices(range(6), src)
    assert not kept.is_inference()
    loss, reg = nce_loss(src, trg, backend="reference")
    torch.autograd.grad(loss + reg, (src, trg))


def test_values_and_cap(monkeypatch):
    """Kept tensors hold the range's values; past CACHE_ELEMENTS in all, fresh ones are made
    and not kept."""
    monkeypatch.setattr(indices, "KEPT", indices.IndexCache(capacity=10))
    like = torch.zeros(1)
    a = indices.range_indices(range(1, 9, 2), like)
    assert a.dtype == torch.int64 and a.tolist() == [1, 3, 5, 7]
    assert indices.range_indices(range(1, 9, 2), like) is a
    b = indices.range_indices(range(7), like)  # 4 + 7 > 10
    assert b.tolist() == list(range(7)) and indices.range_indices(range(7), like) is not b
    assert indices.KEPT.elements == 4


def test_tuples_of_ranges_are_kept_by_their_ranges():
    """A tuple of ranges keeps the ranges' values one after another, under a key of its own:
    not the key of its first range, nor of the same values split otherwise."""
    like = torch.zeros(1)
    pair = indices.range_indices((range(3), range(3)), like)
    assert pair.tolist() == [0, 1, 2, 0, 1, 2]
    assert indices.range_indices((range(3), range(3)), like) is pair
    assert indices.range_indices([range(3), range(3)], like) is pair  # a list: the same ranges
    assert indices.range_indices(range(3), like).tolist() == [0, 1, 2]
    assert indices.range_indices((range(2), range(2, 3), range(3)), like).tolist() == [0, 1, 2, 0, 1, 2]
    assert indices.KEPT.elements == 6 + 3 + 6


def test_fake_and_compiled_calls_keep_nothing():
    """Fake tensors get fake indices and nothing is kept; a compiled call keeps nothing."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.zeros(3))
        assert isinstance(indices.range_indices(range(3), fake), FakeTensor)
    assert indices.KEPT.tensors == {}

    src, trg = _features()
    compiled = torch.compile(lambda s, t: nce_loss(s, t, range(0, 6), backend="reference"), fullgraph=True)
    compiled(src, trg)
    assert indices.KEPT.tensors == {}


@pytest.mark.gpu
def test_cuda_graph_capture_keeps_nothing_new():
    """While a CUDA graph is captured, indices are made in the graph and not kept."""
    src, trg = _features(device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # captures on a side stream of its own
        indices.range_indices(range(5), src)
    assert indices.KEPT.tensors == {}
    kept = indices.range_indices(range(5), src)
    assert indices.range_indices(range(5), src) is kept and kept.tolist() == list(range(5))
