"""amdim_kernels.settings: values checked before any work, pinned for a block and restored,
read once per call and carried from each forward to its backward; the one environment
variable read once, at import."""
import os
import subprocess
import sys
import threading

import pytest
import torch

import amdim_kernels
from amdim_kernels import Settings, TileConfig, current_settings, nce_loss, settings
from amdim_kernels.backend_settings import CUDA_SCORES_ENV
from truth import make_case


def test_defaults_are_the_measured_choices():
    s = Settings()
    assert (s.triton_scores, s.triton_loads, s.triton_chunks, dict(s.triton_tiles)) == (None, None, 8, {})
    assert s.cuda_scores in ("auto", "cublas", "mma")


@pytest.mark.parametrize("field, value, message", [
    ("triton_scores", "wgmma", r"triton_scores must be one of \(None, 'fused', 'gemm'\), got 'wgmma'"),
    ("triton_loads", "tmx", r"triton_loads must be one of \(None, 'tma', 'pointers'\)"),
    ("triton_chunks", 0, "triton_chunks must be a positive int, got 0"),
    ("triton_chunks", 2.0, "triton_chunks must be a positive int, got 2.0"),
    ("triton_chunks", True, "triton_chunks must be a positive int, got True"),
    ("triton_tiles", {"bwd": None}, r"triton_tiles takes the kernels \('fwd', 'grad'\), got \['bwd'\]"),
    ("triton_tiles", {"fwd": (1, 2, 3, 4, 5)}, r"triton_tiles\['fwd'\] must be a TileConfig, got \(1, 2, 3, 4, 5\)"),
    ("cuda_scores", "wgmma", r"cuda_scores must be one of \('auto', 'cublas', 'mma'\), got 'wgmma'"),
])
def test_bad_values_are_refused_in_one_line(field, value, message):
    with pytest.raises(ValueError, match=message) as e:
        Settings(**{field: value})
    assert "\n" not in str(e.value)
    before = current_settings()
    with pytest.raises(ValueError, match=message):
        with settings(**{field: value}):
            pytest.fail("the block ran")
    assert current_settings() is before


def test_unknown_field_is_refused():
    with pytest.raises(TypeError, match=r"unknown fields \['cuda_score'\]"):
        with settings(cuda_score="mma"):
            pass


def test_pinned_for_the_block_and_restored_nested_and_on_error():
    base = current_settings()
    with settings(triton_scores="gemm") as outer:
        assert current_settings() is outer and outer.triton_scores == "gemm"
        a, b = TileConfig(32, 64, 32, 4, 1), TileConfig(16, 32, 16, 4, 1, masked_block_j=16)
        with settings(triton_chunks=3, triton_tiles={"fwd": a}):
            inner = current_settings()
            assert (inner.triton_scores, inner.triton_chunks, dict(inner.triton_tiles)) == ("gemm", 3, {"fwd": a})
            with settings(triton_tiles={"grad": b}):  # tiles add up rather than replace
                assert dict(current_settings().triton_tiles) == {"fwd": a, "grad": b}
        assert current_settings() is outer
        with pytest.raises(RuntimeError):
            with settings(cuda_scores="cublas"):
                raise RuntimeError
        assert current_settings() is outer
    assert current_settings() is base


def test_settings_are_frozen_and_per_thread():
    s = Settings()
    with pytest.raises(Exception):
        s.triton_chunks = 2
    with pytest.raises(TypeError):
        s.triton_tiles["fwd"] = None
    seen = []
    with settings(triton_chunks=5):
        thread = threading.Thread(target=lambda: seen.append(current_settings().triton_chunks))
        thread.start()
        thread.join()
    assert seen == [Settings().triton_chunks]  # a new thread starts from the defaults


@pytest.mark.parametrize("value, ok", [("cublas", True), ("", True), ("wgmma", False)])
def test_environment_variable_is_read_at_import(value, ok):
    code = "import amdim_kernels; print(amdim_kernels.current_settings().cuda_scores)"
    env = dict(os.environ, **{CUDA_SCORES_ENV: value})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if ok:
        assert out.returncode == 0 and out.stdout.strip() == (value or "auto"), out.stderr
    else:
        assert out.returncode != 0
        assert f"environment variable {CUDA_SCORES_ENV} must be one of ('auto', 'cublas', 'mma'), got 'wgmma'" \
            in out.stderr.strip().splitlines()[-1]


def test_environment_is_not_read_per_call(monkeypatch):
    before = current_settings()
    monkeypatch.setenv(CUDA_SCORES_ENV, "wgmma")
    assert current_settings() is before


@pytest.mark.skipif("triton" not in amdim_kernels.available_backends(), reason="Triton cannot run here")
def test_the_backward_runs_with_its_forwards_settings():
    """A forward pinned to the "gemm" strategy and 1 chunk gets a backward that stages
    cuBLAS scores in one chunk, though the backward runs outside the block; the same
    forward unpinned gets the fused strategy's backward. The gradients agree."""
    from unittest import mock

    from amdim_kernels.triton_nce import grad_tiles

    case = make_case(6, 5, 4, 8, pos="random")
    calls = {}

    def run(**pinned):
        src, trg = case.src.clone().requires_grad_(), case.trg.clone().requires_grad_()
        with settings(**pinned):
            loss, reg = nce_loss(src, trg, case.pos_idx, backend="triton")
        with mock.patch.object(grad_tiles, "chunk_scores", wraps=grad_tiles.chunk_scores) as scores, \
                mock.patch.object(grad_tiles, "chunk_images", wraps=grad_tiles.chunk_images) as images:
            (loss + reg).backward()
        calls[str(pinned)] = scores.call_count, images.call_count
        return src.grad, trg.grad

    pinned = run(triton_scores="gemm", triton_chunks=1)
    fused = run(triton_scores="fused")
    assert calls["{'triton_scores': 'gemm', 'triton_chunks': 1}"] == (1, 1)
    assert calls["{'triton_scores': 'fused'}"][0] == 0
    for a, b in zip(pinned, fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
