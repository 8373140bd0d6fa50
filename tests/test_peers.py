"""The peer libraries' adapters (benchmarks/peers.py) compute nce_loss's InfoNCE case.

The benchmark compares their times with ours, which means something only if they compute
the same loss. Each installed peer that runs here is checked against the float64 truth on
fresh random inputs, with the criterion of the backends' tests (truth.assert_matches_truth),
its extra tolerance set for what the peers do by design (see TOL).
"""
import pytest
import torch

from benchmarks.peers import PEERS, available_peers, covers, peer_loss
from truth import assert_matches_truth, make_case

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INFONCE = dict(tclip=None, reg_weight=0.0)

# Beside the reference's own error in the same dtype: float32 sums in another order; in
# half precision the peers round their logits or gradients to the input dtype (Cut
# Cross-Entropy also skips gradient entries below 2^-12 by design, its filter_eps).
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def check_peer(name, case, dtype):
    assert_matches_truth(case, dtype, fn=peer_loss(name), tol=TOL[dtype])


def test_covers_only_infonce():
    assert covers(1, None, 0.0)
    assert not covers(2, None, 0.0) and not covers(1, 20.0, 0.0) and not covers(1, None, 0.05)
    src, trg = torch.randn(4, 8), torch.randn(4, 3, 8)
    with pytest.raises(ValueError, match="L == 1"):
        peer_loss("torch_lce")(src, trg)


@pytest.mark.parametrize("name", sorted(PEERS))
@pytest.mark.parametrize("shape", [(1, 7, 256), (37, 37, 256), (20, 53, 40)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_peer_float32(name, shape, reduction):
    if name not in available_peers(DEVICE):
        pytest.skip(f"{name} is not installed or does not run on {DEVICE} here")
    n, m, d = shape
    pos = "arange" if n == m else "random"
    case = make_case(n, m, 1, d, pos=pos, spread=2.0, device=DEVICE, reduction=reduction, **INFONCE)
    check_peer(name, case, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", sorted(PEERS))
def test_peer_half_precision(name, dtype):
    if name not in available_peers(DEVICE):
        pytest.skip(f"{name} is not installed here")
    case = make_case(64, 64, 1, 256, dtype=dtype, spread=2.0, device=DEVICE, **INFONCE)
    check_peer(name, case, dtype)
