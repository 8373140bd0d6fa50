"""Where the host time of one Triton fwd+bwd goes, what the backward's chunk count and
the pos_idx range check (one device sync) cost on the GPU, and how much CUDA graphs
(torch.compile(mode="reduce-overhead") around the cuda backend's fwd+bwd) take back.

    python -m benchmarks.host_overhead
    python -m benchmarks.host_overhead --split   # host time against GPU kernel time per call
    python -m benchmarks.host_overhead --trace   # which ops take that host time
    python -m benchmarks.host_overhead --objective   # the trainer's objective: four calls against six
    python -m benchmarks.host_overhead --glue    # no GPU needed
    python -m benchmarks.host_overhead --python-path    # no GPU needed
    python -m benchmarks.host_overhead --ops    # no GPU needed; also the trainer's objective

--glue times the Triton backward's own Python per chunk (views, operands, tensor
descriptors, arguments) with the Triton launches replaced by no-ops, on CPU tensors of the
single-GPU problem: the part of the host time per chunk that this project's code adds to
Triton's launcher and cuBLAS's.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import pstats
import time
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.testing import do_bench

from amdim_kernels import Settings, available_backends, environment, nce_loss, settings
from amdim_kernels.backend_settings import TRITON_LOADS
from amdim_kernels.triton_nce import config, forward, grad_rows, grad_tiles

from . import arguments, problems
from .run import impl_context


def fwd_bwd(src, trg, pos_idx, backend="triton"):
    loss, reg = nce_loss(src, trg, pos_idx, backend=backend)
    return torch.autograd.grad(loss + reg, (src, trg))


def _cuda_impls() -> list[str]:
    """The cuda backend's two score paths, where it is built (run.impl_context's names)."""
    return ["cuda:cublas", "cuda:mma"] if "cuda" in available_backends("cuda") else []


def _inputs(p: problems.Problem):
    """(src, trg, pos_idx) of the problem on the GPU, both features requiring grad; pos_idx
    only where N != M needs it, since eager checks a given pos_idx with one sync."""
    src, trg, pos_idx = p.inputs(torch.bfloat16, "cuda")
    return src.requires_grad_(), trg.requires_grad_(), pos_idx if p.n != p.m else None


def cuda_graphs() -> None:
    """fwd+bwd of backends "triton" and "cuda" (both score paths), eager vs replayed as CUDA
    graphs (torch.compile(mode="reduce-overhead")), on the small problems where launches
    dominate."""
    print("| problem | backend | eager fwd+bwd ms | reduce-overhead fwd+bwd ms |")
    print("|---|---|---|---|")
    for p in (problems.CIFAR, problems.ONE_GPU_SHARE):
        src, trg, pos_idx = _inputs(p)
        for impl in ["triton"] + _cuda_impls():

            def step(src, trg, pos_idx, backend=impl.split(":")[0]):
                return fwd_bwd(src, trg, pos_idx, backend)

            with impl_context(impl):
                eager = do_bench(lambda: step(src, trg, pos_idx), warmup=50, rep=300, return_mode="median")
                graphed = torch.compile(step, mode="reduce-overhead")
                for _ in range(3):  # compile, capture: before timing
                    graphed(src, trg, pos_idx)
                replay = do_bench(lambda: graphed(src, trg, pos_idx), warmup=50, rep=300, return_mode="median")
            print(f"| {p.name} | {impl} | {eager:.3f} | {replay:.3f} |", flush=True)


class _NoLaunch:
    """Stands in for a Triton kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def glue(p: problems.Problem = problems.SINGLE_GPU, reps: int = 200) -> None:
    """Microseconds of the Triton backward's Python per chunk (--glue), per chunk count and
    operand loads, with the G kernel's launches stubbed out."""
    src, trg, pos_idx = p.inputs(torch.bfloat16, "cpu")
    per_row = torch.zeros(p.n)  # stands in for neg_lse, R and reg_coef
    g_pos = torch.zeros(p.n, p.l)
    print(f"the Triton backward's Python per chunk, launches stubbed, {p.name}, bf16 (CPU)")
    print("| chunk parts | operand loads | us per chunk |")
    print("|---|---|---|")
    with mock.patch.object(grad_tiles, "nce_grad_tile_kernel", _NoLaunch()), \
            mock.patch.object(environment, "TRITON_INTERPRET", False):
        for parts in (8, 16):
            for loads in TRITON_LOADS:
                options = config.CallOptions.of(Settings(triton_chunks=parts, triton_loads=loads), torch.bfloat16)

                def backward_chunks():
                    chunks = grad_tiles.gradient_chunks(src, trg, pos_idx, per_row, per_row, g_pos, per_row, 20.0,
                                                        p.d ** -0.5, options)
                    return sum(1 for _ in chunks)

                count = backward_chunks()
                t0 = time.perf_counter()
                for _ in range(reps):
                    backward_chunks()
                us = 1e6 * (time.perf_counter() - t0) / (reps * count)
                print(f"| {parts} | {loads} | {us:.1f} |", flush=True)


def python_path(calls: int = 3000) -> None:
    """Microseconds per call of nce_loss + autograd.grad with backend "cpp" on a tiny CPU
    problem (--python-path), against the two C++ ops called directly and validation alone:
    what the Python path around the kernels (validation, dispatch, autograd, the small
    reductions) costs on this machine's CPU, one thread."""
    from amdim_kernels.validation import validate

    torch.set_num_threads(1)
    src, trg = torch.randn(4, 8, requires_grad=True), torch.randn(4, 2, 8, requires_grad=True)
    ops, pos_idx = torch.ops.amdim_kernels, torch.arange(4)
    loss, pos, neg_lse, sq, _, _ = ops.nce_fwd(src.detach(), trg.detach(), pos_idx, 20.0, 8 ** -0.5, 0.05, "auto")
    # as the autograd formula passes them: the mean's and reg's gradients broadcast, with their weights
    upstream = (torch.ones(()).expand(pos.shape), 1.0 / pos.numel(), torch.ones(()).expand(neg_lse.shape),
                0.05 / (src.shape[0] * trg.shape[0] * trg.shape[1]))

    def us(fn) -> float:
        for _ in range(100):
            fn()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return 1e6 * (time.perf_counter() - t0) / calls

    rows = {
        "nce_loss + autograd.grad, cpp": lambda: fwd_bwd(src, trg, None, "cpp"),
        "the two C++ ops called directly": lambda: (
            ops.nce_fwd(src.detach(), trg.detach(), pos_idx, 20.0, 8 ** -0.5, 0.05, "auto"),
            ops.nce_bwd(src.detach(), trg.detach(), pos_idx, pos, neg_lse, sq, *upstream, 20.0, 8 ** -0.5, "auto", True, True)),
        "validate": lambda: validate(src, trg, None, 20.0, 0.05, None, "mean"),
    }
    print("CPU, float32, N = M = 4, L = 2, D = 8, one thread")
    print("| call | us per call |")
    print("|---|---|")
    for name, fn in rows.items():
        print(f"| {name} | {us(fn):.1f} |", flush=True)


# ops that only allocate or make views: no work reaches a GPU
_NO_WORK = {"empty", "new_empty", "empty_like", "empty_strided", "detach", "lift_fresh"}


class _WorkOps(TorchDispatchMode):
    """Counts the dispatched ops that would launch work on a GPU (a C++ op counts once)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func.overloadpacket.__name__ in _NO_WORK):
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class _CountedLaunch:
    """Stands in for a Triton kernel: kernel[grid](...) only counts the launch."""

    def __init__(self, counter: collections.Counter, name: str):
        self.counter, self.name = counter, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.counter.update([self.name])


def work_ops(p: problems.Problem = problems.CIFAR) -> None:
    """The ops one fwd+bwd (nce_loss, loss + reg, autograd.grad) dispatches that launch work
    on a GPU (--ops), counted on the CPU: backend "cpp" with the four-product schedule (its
    C++ op once per direction; the cuda backend's dispatches the same Python path) and "triton" with its kernel launches
    stubbed and counted. Views and allocations are left out. The problem's sizes set the
    Triton chunk plan as on an H100 (132 SMs, the chunk floor)."""
    src, trg, _ = p.inputs(torch.bfloat16, "cpu")
    src, trg = src.float().requires_grad_(), trg.float().requires_grad_()
    print(f"ops per fwd+bwd that launch GPU work, {p.name} (CPU, float32)")
    print("| backend | ops | of which |")
    print("|---|---|---|")
    for backend in ("cpp", "triton"):
        launches = collections.Counter()
        with contextlib.ExitStack() as stack:
            if backend == "triton":
                for stage in (forward, grad_rows, grad_tiles):  # every kernel of every stage
                    for name in [name for name in vars(stage) if name.endswith("_kernel")]:
                        stack.enter_context(mock.patch.object(stage, name, _CountedLaunch(launches, name)))
                    if hasattr(stage, "num_sms"):
                        stack.enter_context(mock.patch.object(stage, "num_sms", lambda device: 132))
                stack.enter_context(mock.patch.object(environment, "TRITON_INTERPRET", False))
                stack.enter_context(mock.patch("amdim_kernels.registry.resolve", lambda name, device: name))
            else:  # the schedule the cuda backend runs
                stack.enter_context(settings(schedule="four-product"))
            fwd_bwd(src, trg, None, backend)
            launches.clear()
            with _WorkOps() as counted:
                fwd_bwd(src, trg, None, backend)
        ops = counted.ops + launches
        of_which = ", ".join(f"{name} {k}" for name, k in sorted(ops.items()))
        print(f"| {backend} | {sum(ops.values())} | {of_which} |", flush=True)


def _objective_step(b: int, d: int, backend: str, share_targets: bool = True, generator=None, **tensor_kw):
    """One fwd+bwd of the trainer's objective (amdim_kernels.multiscale_nce) on fresh
    features of both views, (r1, r5, r7) each as the encoder leaves them (NCHW), with fixed
    5->5 locations: a closure, so that every call repeats the same step."""
    from amdim_kernels.multiscale import multiscale_nce

    shapes = [(b, d), (b, d, 5, 5), (b, d, 7, 7)] * 2
    feats = [torch.randn(s, generator=generator).to(**tensor_kw).requires_grad_() for s in shapes]
    locations = tuple(torch.randint(0, 25, (b,), generator=generator) for _ in range(2))

    def step():
        total = multiscale_nce(tuple(feats[:3]), tuple(feats[3:]), backend=backend, locations=locations,
                               share_targets=share_targets).total
        torch.autograd.grad(total, feats)

    return step


def objective_ops(b: int = 8, d: int = 32) -> None:
    """The ops one fwd+bwd of the trainer's objective (amdim_kernels.multiscale_nce, backend
    cpp with the four-product schedule, the cuda backend's) dispatches that launch work on a
    GPU, counted as --ops counts them: the nce ops and the rest (gathers, concatenations, the
    means, the gradients' accumulation)."""
    step = _objective_step(b, d, "cpp", generator=torch.Generator().manual_seed(0))
    with settings(schedule="four-product"):
        step()
        with _WorkOps() as counted:
            step()
    nce = sum(k for name, k in counted.ops.items() if name.startswith("nce_"))
    rest = ", ".join(f"{name} {k}" for name, k in sorted(counted.ops.items()) if not name.startswith("nce_"))
    print(f"ops of one multiscale_nce fwd+bwd that launch GPU work, cpp, B = {b}, D = {d} (CPU, float32)")
    print("| nce ops | the rest | in all | the rest, by op |")
    print("|---|---|---|---|")
    print(f"| {nce} | {counted.ops.total() - nce} | {counted.ops.total()} | {rest} |", flush=True)


def trace(calls: int = 20) -> None:
    """Where the host time of fwd+bwd goes on the GPU machine (--trace): torch.profiler with
    CPU and CUDA activities over `calls` calls per backend on the CIFAR problem (bf16), the
    ops with the most host time first. Host time per call is the self CPU column / calls."""
    from torch.profiler import ProfilerActivity, profile

    src, trg, pos_idx = _inputs(problems.CIFAR)
    for impl in ["triton"] + _cuda_impls():
        with impl_context(impl):
            for _ in range(5):
                fwd_bwd(src, trg, pos_idx, impl.split(":")[0])
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    fwd_bwd(src, trg, pos_idx, impl.split(":")[0])
                torch.cuda.synchronize()
        print(f"{impl}, {calls} x fwd+bwd, {problems.CIFAR.name}, bf16")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


def _kernel_stats(fn, calls: int = 10) -> tuple[float, float]:
    """GPU kernel time per call of fn, the sum of its kernels' device times (torch.profiler),
    gaps between kernels excluded, and the number of kernels (and copies) per call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    on_gpu = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in on_gpu) / 1e3 / calls, sum(e.count for e in on_gpu) / calls


def _host_ms(fn, calls: int = 20) -> float:
    """Host time per call of fn: the wall time to enqueue calls back to back, no sync inside
    (the queue holds their ~30 launches each)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = 1e3 * (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    return host


def _graph_ms(fn) -> float:
    """do_bench's median of fn captured as one CUDA graph (torch.cuda.graph) and replayed:
    the call's kernels back to back, with no host time between them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=50, rep=200, return_mode="median")


def objective(dtype=torch.bfloat16) -> None:
    """The trainer's objective (amdim_kernels.multiscale_nce) fwd+bwd with 1->5 and 5->5
    of a direction in one call (four calls a step) against the six losses' calls one by one
    (--objective, GPU): host ms, GPU kernel ms and kernels per step, and do_bench's median,
    on one GPU's features (CIFAR's B = 200, D = 1024, and ImageNet's B = 480, D = 1536,
    r5/r7 as the encoder leaves them, NCHW)."""
    print(f"multiscale_nce fwd+bwd, {dtype}, features NCHW")
    print("| B, D | backend | calls | host ms per step | GPU kernels ms per step | kernels per step | do_bench ms |")
    print("|---|---|---|---|---|---|---|")
    for b, d in ((200, 1024), (480, 1536)):
        for impl in ["triton"] + _cuda_impls():
            for share in (False, True):
                step = _objective_step(b, d, impl.split(":")[0], share, device="cuda", dtype=dtype)
                with impl_context(impl):
                    step()
                    host = _host_ms(step)
                    kernel_ms, kernels = _kernel_stats(step)
                    bench = do_bench(step, warmup=20, rep=200, return_mode="median")
                print(f"| {b}, {d} | {impl} | {4 if share else 6} | {host:.3f} | {kernel_ms:.3f} | {kernels:.0f} | "
                      f"{bench:.3f} |", flush=True)


def split() -> None:
    """Host time against GPU kernel time per fwd+bwd (--split): where host > GPU, the GPU
    waits for the host and do_bench's median is the host's time, not the kernels'. The last
    column replays the call as one CUDA graph: what a captured training step pays."""
    impls = [("triton", 8), ("triton", 16)] + [(impl, None) for impl in _cuda_impls()]
    print("| problem | backend (chunks) | host ms per call | GPU kernels ms per call | kernels per call | do_bench ms "
          "| graph replay ms |")
    print("|---|---|---|---|---|---|---|")
    for p in (problems.SINGLE_GPU, problems.ONE_GPU_SHARE, problems.CIFAR):
        # where N != M the pos_idx check's sync makes the host wait for the GPU once a
        # call, and its time includes that wait
        src, trg, pos_idx = _inputs(p)
        for impl, parts in impls:

            def step(backend=impl.split(":")[0]):
                return fwd_bwd(src, trg, pos_idx, backend)

            with impl_context(impl), settings(triton_chunks=parts):
                for _ in range(5):
                    step()
                host, (kernel_ms, kernels) = _host_ms(step), _kernel_stats(step)
                bench = do_bench(step, warmup=50, rep=200, return_mode="median")
                graphed = _graph_ms(step)
            label = impl + (f" ({parts})" if parts else "") + (", 1 sync" if pos_idx is not None else "")
            print(f"| {p.name} | {label} | {host:.3f} | {kernel_ms:.3f} | {kernels:.0f} | {bench:.3f} | {graphed:.3f} |",
                  flush=True)


def main():
    p = problems.CIFAR
    src, trg, _ = p.inputs(torch.bfloat16, "cuda")
    src.requires_grad_()
    trg.requires_grad_()
    for _ in range(3):
        fwd_bwd(src, trg, None)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        fwd_bwd(src, trg, None)
    torch.cuda.synchronize()
    prof.disable()
    print(f"host profile, 50 x fwd+bwd, {p.name}, bf16, pos_idx=None")
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)

    print("| problem | chunk parts | pos_idx | fwd+bwd ms |")
    print("|---|---|---|---|")
    for p in (problems.SINGLE_GPU, problems.ONE_GPU_SHARE, problems.CIFAR):
        src, trg, pos_idx = p.inputs(torch.bfloat16, "cuda")
        src.requires_grad_()
        trg.requires_grad_()
        for parts in (8, 12, 16):
            for given in (False, True):
                if not given and p.n != p.m:
                    continue
                idx = pos_idx if given else None
                with settings(triton_chunks=parts):
                    ms = do_bench(lambda: fwd_bwd(src, trg, idx), warmup=50, rep=300, return_mode="median")
                print(f"| {p.name} | {parts} | {'given (1 sync)' if given else 'None'} | {ms:.3f} |", flush=True)


if __name__ == "__main__":
    ap = arguments.Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--glue", action="store_true", help="only the Triton backward's own Python per chunk (CPU)")
    ap.add_argument("--split", action="store_true", help="host time against GPU kernel time per call (GPU)")
    ap.add_argument("--python-path", action="store_true", help="the Python path around the cpp kernels (CPU)")
    ap.add_argument("--trace", action="store_true", help="profiler table of the host time per backend (GPU)")
    ap.add_argument("--ops", action="store_true", help="ops per fwd+bwd that launch GPU work (CPU)")
    ap.add_argument("--objective", action="store_true",
                    help="the trainer's objective, four calls (shared targets) against six (GPU)")
    args = ap.parse_args()
    if not (args.glue or args.python_path or args.ops):  # the modes that time GPU kernels
        arguments.require_gpu(ap, "benchmarks.host_overhead without --glue, --python-path or --ops")
    if args.glue:
        glue()
    elif args.python_path:
        python_path()
    elif args.trace:
        trace()
    elif args.ops:
        work_ops()
        objective_ops()
    elif args.split:
        split()
    elif args.objective:
        objective()
    else:
        main()
        cuda_graphs()
