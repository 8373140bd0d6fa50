"""The benchmark tools run end to end on small CPU problems: the sweep's rows and files, its
handling of failing implementations, the peers' restriction to InfoNCE, and the training
throughput script, the offline compile report. (They measure; nothing here asserts a time.)"""
import csv
import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amdim_kernels import available_backends
from benchmarks import host_overhead, problems, run, train_throughput
from benchmarks.measure import peak_extra_bytes
from benchmarks.peers import available_peers

ROOT = Path(__file__).resolve().parents[1]
CPU_BACKENDS = [b for b in available_backends("cpu") if b != "triton"]  # the interpreter is too slow to time


def test_cpu_peak_counts_the_tensors_a_call_holds():
    """The CPU's peak extra memory is that of the call's tensors at their peak, outputs
    included, and nothing of what was live before: 1 MiB kept plus 3 MiB freed inside, while
    the 2 MiB made before the call do not count."""
    live_before = torch.ones(2 * 2**20, dtype=torch.uint8)

    def call():
        kept = torch.ones(2**20, dtype=torch.uint8)
        temporary = torch.ones(3 * 2**20, dtype=torch.uint8)  # freed as the call returns
        return kept.add_(temporary[0])

    assert peak_extra_bytes(call, "cpu") == 4 * 2**20
    del live_before  # live through the call


def test_sweep_rows_and_files(tmp_path):
    amdim_case = problems.Problem("tiny AMDIM", 6, 6, 5, 16)
    feature_map_case = dataclasses.replace(amdim_case, name="tiny AMDIM, feature maps", trg_layout="feature-map")
    assert feature_map_case.inputs(torch.float32, "cpu")[1].stride() == (80, 1, 5)  # (M, D, L) seen as (M, L, D)
    infonce_case = problems.infonce(8, 24, 16)
    impls = CPU_BACKENDS + available_peers("cpu") + ["cuda"]  # cuda cannot run here: an error row
    rows = run.run([amdim_case, feature_map_case, infonce_case], [torch.float32], impls, "cpu", str(tmp_path), "t")

    def row(problem, impl):
        (r,) = [r for r in rows if r.problem == problem.name and r.impl == impl]
        return r

    for p in (amdim_case, feature_map_case, infonce_case):
        assert row(p, "matmul").fwd_ms > 0
        for b in CPU_BACKENDS:
            r = row(p, b)
            assert r.status == "ok" and r.fwd_ms > 0 and r.fwd_bwd_ms > 0 and r.peak_extra_mib >= 0
            assert r.fwd_bwd_over_3mm == pytest.approx(r.fwd_bwd_ms / row(p, "matmul").fwd_bwd_ms)
        assert row(p, "cuda").status.startswith("error: ValueError")
    for peer in available_peers("cpu"):  # InfoNCE only
        assert row(infonce_case, peer).status == "ok"
        assert not [r for r in rows if r.problem == amdim_case.name and r.impl == peer]

    (csv_path,) = tmp_path.glob("results_*_t.csv")
    with open(csv_path) as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows)
    assert {"device", "torch", "triton", "date", "status", "workspace_mib", "fwd_bwd_over_3mm"} <= set(written[0])
    (json_path,) = tmp_path.glob("results_*_t.json")
    assert len(json.loads(json_path.read_text())) == len(rows)
    # the speed-up table: each measured fused backend against the reference of its problem
    summary = run.format_speedups(rows)
    for p in (amdim_case, feature_map_case, infonce_case):
        for b in CPU_BACKENDS:
            if b != "reference":
                r = row(p, b)
                speedup = row(p, "reference").fwd_bwd_ms / r.fwd_bwd_ms
                assert f"| {p.name} | float32 | {b} | {r.fwd_bwd_ms:.3f} | {speedup:.2f}x | - | " in summary
    assert "| cuda |" not in summary  # an error row has nothing to compare


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


@pytest.mark.parametrize("bad, message", [
    (["--reps", "0"], "argument --reps: needs a positive integer, got 0"),
    (["--rounds", "-1"], "argument --rounds: needs a positive integer, got -1"),
    (["--batch-size", "0"], "argument --batch-size: needs a positive integer, got 0"),
    (["--device", "tpu:x"], "--device 'tpu:x' is not a device"),
    (["--device", "cpu", "--backends", "cpp", "foo"], "--backends: 'foo' is not a backend, expected some of auto,"),
    (["--device", "cpu", "--backends", "cpp:fused"], "--backends: 'cpp:fused' is not a backend"),
    (["--device", "cpu", "--backends", "cpp:"], "--backends: 'cpp:' is not a backend"),
    (["--device", "cpu", "--backends", "cuda"], "--backends: cuda cannot run on --device cpu: "),
])
def test_train_throughput_refuses_bad_arguments(bad, message, capsys):
    """Each bad value is refused in one line naming its flag, before any model is built."""
    with pytest.raises(SystemExit) as exit_info:
        train_throughput.main(bad)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU")


@pytest.mark.parametrize("program, argv, message", [
    ("run", ["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ("run", ["--device", "cpu", "--out", "/proc/amdim-results"], "--out /proc/amdim-results: cannot write there"),
    ("plot", ["/nonexistent/results.csv", "--out", "plot.png"], "csv /nonexistent/results.csv: no such file"),
    ("tune_triton", ["--dtypes", "float64"], "argument --dtypes: invalid choice: 'float64'"),
    pytest.param("run", ["--device", "cuda"], "--device cuda: no CUDA GPU is available here", marks=NO_GPU),
    pytest.param("demo", ["--device", "cuda"], "--device cuda: no CUDA GPU is available here", marks=NO_GPU),
    pytest.param("tune_triton", [], "benchmarks.tune_triton needs a CUDA GPU", marks=NO_GPU),
    pytest.param("sanitize_case", ["--one"], "benchmarks.sanitize_case needs a CUDA GPU", marks=NO_GPU),
])
def test_benchmark_programs_refuse_bad_arguments(program, argv, message, capsys):
    """A bad value or a missing GPU is refused in one line naming it, before any work."""
    module = importlib.import_module(f"benchmarks.{program}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


COLUMNS = ("kernel", "loads", "clip", "tiles", "registers", "spill bytes", "spill instr", "shared", "instr",
           "tensor core", "LDG", "LDGSTS", "UTMALDG")


def test_triton_resources_compiles_offline():
    """benchmarks.triton_resources compiles every Triton kernel for sm_90 without a GPU (its
    own process: conftest's TRITON_INTERPRET=1 would hand it interpreter kernels) and reads
    ptxas's registers, spills and instruction counts, with both operand loads."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.triton_resources", "--problem", "cifar", "--clip", "on",
         "--tiles", "64,64,32,4,2,128", "--loads", "tma", "pointers"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=600,
    ).stdout
    lines = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "kernel" not in line]
    table = [{name: cell.strip() for name, cell in zip(COLUMNS, cells)} for cells in lines]
    tile_kernels = ["fwd plain", "fwd masked", "grad"]
    assert [(r["kernel"], r["loads"]) for r in table] == (
        [(k, "tma") for k in tile_kernels] + [(k, "pointers") for k in tile_kernels]
        + [("merge", "-"), ("factors", "-"), ("totals", "-")]
    ), out
    for r in table:
        assert 0 < int(r["registers"]) <= 255 and int(r["instr"]) > 0, out
        assert (int(r["tensor core"]) > 0) == (r["kernel"] in tile_kernels), out  # tl.dot became HGMMA
        # the K-loop's operands: boxes fetched by the copy engine, or per-thread async copies
        assert (int(r["UTMALDG"]) > 0, int(r["LDGSTS"]) > 0) == (r["loads"] == "tma", r["loads"] == "pointers"), out


def test_host_glue_per_chunk(capsys):
    """host_overhead --glue times the Triton backward's Python per chunk with the launches
    stubbed, for both operand loads; the real kernels stay in place afterwards."""
    pytest.importorskip("triton")
    from amdim_kernels.backend_settings import TRITON_LOADS
    from amdim_kernels.triton_nce import grad_tiles

    kernel = grad_tiles.nce_grad_tile_kernel
    host_overhead.glue(problems.Problem("tiny", 300, 300, 49, 64), reps=2)
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("|")[1:-1] for line in lines[lines.index("|---|---|---|") + 1:]]
    assert [(parts.strip(), loads.strip()) for parts, loads, _ in rows] == [
        (parts, loads) for parts in ("8", "16") for loads in TRITON_LOADS]
    assert all(float(us) > 0 for _, _, us in rows)
    assert grad_tiles.nce_grad_tile_kernel is kernel


def test_host_python_path(capsys):
    """host_overhead --python-path times the full cpp call, the two ops and validation."""
    if "cpp" not in available_backends("cpu"):
        pytest.skip("the compiled extension is not built")
    threads = torch.get_num_threads()
    try:
        host_overhead.python_path(calls=3)
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("|")[1:-1] for line in lines[lines.index("|---|---|") + 1:]]
    assert len(rows) == 3 and all(float(us) > 0 for _, us in rows)


def test_host_work_ops(capsys):
    """host_overhead --ops counts the GPU-work ops of one fwd+bwd per backend. Neither backend
    may have autograd fill zero gradients for the op's non-differentiable outputs, nor copy an
    expanded upstream gradient to make it contiguous; Triton's stubbed launches are counted
    and the real kernels are back afterwards."""
    from amdim_kernels.triton_nce import forward

    if "cpp" not in available_backends("cpu"):
        pytest.skip("the compiled extension is not built")
    kernel = forward.nce_fwd_kernel
    host_overhead.work_ops(problems.Problem("tiny", 6, 6, 3, 8))
    lines = capsys.readouterr().out.splitlines()
    rows = {backend.strip(): (int(total), of_which)
            for backend, total, of_which in (line.split("|")[1:-1] for line in lines[lines.index("|---|---|---|") + 1:])}
    assert set(rows) == {"cpp", "triton"}
    for total, of_which in rows.values():
        counts = {name: int(k) for name, k in (item.rsplit(" ", 1) for item in of_which.strip().split(", "))}
        assert sum(counts.values()) == total
        assert "zeros" not in counts and "clone" not in counts
    assert "nce_fwd 1" in rows["cpp"][1] and "nce_bwd 1" in rows["cpp"][1]
    assert "nce_fwd_kernel 2" in rows["triton"][1] and "nce_merge_kernel 1" in rows["triton"][1]
    assert forward.nce_fwd_kernel is kernel


def test_objective_work_ops(capsys):
    """host_overhead --ops also counts the trainer's objective: its four nce calls are 8 ops
    (a fwd and a bwd each), and nothing fills zero gradients."""
    if "cpp" not in available_backends("cpu"):
        pytest.skip("the compiled extension is not built")
    host_overhead.objective_ops(b=4, d=8)
    lines = capsys.readouterr().out.splitlines()
    nce, rest, total, by_op = lines[lines.index("|---|---|---|---|") + 1].split("|")[1:-1]
    assert int(nce) == 8 and int(nce) + int(rest) == int(total)
    counts = {name: int(k) for name, k in (item.rsplit(" ", 1) for item in by_op.strip().split(", "))}
    assert sum(counts.values()) == int(rest) and "zeros" not in counts


def test_cpu_memory_count_prints_no_profiler_log(capfd):
    """The CPU memory count runs the profiler, whose C++ library logs its start and stop (and,
    without a GPU, a device-count error) on stderr: none of that reaches the tool's output,
    while any other message written meanwhile still does."""
    from benchmarks.measure import peak_extra_bytes

    def fn():
        os.write(2, b"a message of the call\n")
        return torch.ones(1 << 16).sum()

    assert peak_extra_bytes(fn, "cpu") >= 4 << 16
    err = capfd.readouterr().err
    assert "a message of the call" in err
    assert "profiler_start" not in err and "profiler_stop" not in err and "gpuGetDeviceCount" not in err


@pytest.mark.parametrize("impl, message", [
    ("bogus", "--impls: unknown implementation 'bogus'"),
    ("cuda:foo", "--impls: backend 'cuda' has no variant 'foo'"),
    ("cpp:gemm", "--impls: backend 'cpp' has no variant 'gemm'"),
])
def test_run_refuses_unknown_implementations(impl, message, capsys):
    """benchmarks.run names the bad --impls entry in one line, before any timing."""
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--impls", "cpp", impl])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_cpu_floor_prints_its_ratios(capsys):
    """benchmarks.cpu_floor end to end on one small size: the floor table, and the workspace
    against eager's workspace and whole peak."""
    from benchmarks import cpu_floor

    cpu_floor.main(["--sizes", "24,20,9,16", "--rounds", "1", "--no-contention"])
    out = capsys.readouterr().out
    assert "| 24, 20, 9, 16 |" in out
    assert "| 3 products ms | fresh gradients ms |" in out
    assert "/ eager's workspace | / eager's peak" in out
    for bad, message in ((["--rounds", "0"], "argument --rounds: needs a positive integer, got 0"),
                         (["--sizes", "4,4,4"], "expected N,M,L,D as four positive integers")):
        with pytest.raises(SystemExit):
            cpu_floor.main(bad)
        assert message in capsys.readouterr().err
