"""The benchmark tools run end to end on small CPU problems: the sweep's rows and files, its
handling of failing implementations, the peers' restriction to InfoNCE, and the training
throughput script. (They measure; nothing here asserts a time.)"""
import csv
import json

import pytest
import torch

from amdim_kernels import available_backends
from benchmarks import problems, run, train_throughput
from benchmarks.peers import available_peers

CPU_BACKENDS = [b for b in available_backends("cpu") if b != "triton"]  # the interpreter is too slow to time


def test_sweep_rows_and_files(tmp_path):
    amdim_case = problems.Problem("tiny AMDIM", 6, 6, 5, 16)
    infonce_case = problems.infonce(8, 24, 16)
    impls = CPU_BACKENDS + available_peers("cpu") + ["cuda"]  # cuda cannot run here: an error row
    rows = run.run([amdim_case, infonce_case], [torch.float32], impls, "cpu", str(tmp_path), "t")

    def row(problem, impl):
        (r,) = [r for r in rows if r.problem == problem.name and r.impl == impl]
        return r

    for p in (amdim_case, infonce_case):
        assert row(p, "matmul").fwd_ms > 0
        for b in CPU_BACKENDS:
            r = row(p, b)
            assert r.status == "ok" and r.fwd_ms > 0 and r.fwd_bwd_ms > 0 and r.peak_extra_mib >= 0
        assert row(p, "cuda").status.startswith("error: RuntimeError")
    for peer in available_peers("cpu"):  # InfoNCE only
        assert row(infonce_case, peer).status == "ok"
        assert not [r for r in rows if r.problem == amdim_case.name and r.impl == peer]

    (csv_path,) = tmp_path.glob("results_*_t.csv")
    with open(csv_path) as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows)
    assert {"device", "torch", "triton", "date", "status", "workspace_mib"} <= set(written[0])
    (json_path,) = tmp_path.glob("results_*_t.json")
    assert len(json.loads(json_path.read_text())) == len(rows)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="the compiled extension is not built")
def test_train_throughput_runs(tmp_path, capsys):
    out = tmp_path / "tt.csv"
    train_throughput.main(["--device", "cpu", "--batch-size", "8", "--reps", "1", "--rounds", "2",
                           "--backends", "reference", "cpp", "--out", str(out)])
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["backend"] for r in rows] == ["reference", "cpp"]
    assert all(float(r["step_ms"]) > 0 and float(r["loss_ms"]) > 0 and r["rounds"] == "2" for r in rows)
    # the same weights and batch: the first step's loss agrees across backends
    assert float(rows[0]["first_loss"]) == pytest.approx(float(rows[1]["first_loss"]), rel=1e-4)
    assert "| reference | 8 |" in capsys.readouterr().out
