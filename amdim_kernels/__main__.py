"""`python -m amdim_kernels`: what this install has, and a self-check of every backend that can
run here against the reference (values and gradients). Exits 1 if a check fails.

    python -m amdim_kernels            # versions, the extension, backends, self-check
    python -m amdim_kernels --no-check # without the self-check
"""
from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import __version__, nce_loss, registry
from .backend_settings import current_settings

# (N, M, L, D, pos_idx kind, options): odd sizes, a random pos_idx, both reductions, no clip
PROBLEMS = (
    (6, 6, 5, 16, "none", dict()),
    (7, 5, 3, 13, "random", dict(tclip=None, reduction="none")),
    (9, 4, 25, 24, "random", dict(tclip=10.0, reg_weight=0.0)),
)
# (dtype, relative error bound for loss/reg, for the gradients): float32 math after the
# products; 16-bit gradients are rounded once to their dtype (2^-11, 2^-8)
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-3, 5e-3), torch.bfloat16: (1e-3, 3e-2)}


def _inputs(n, m, l, d, pos, dtype, device, generator):
    src = torch.randn(n, d, generator=generator).to(device=device, dtype=dtype)
    trg = torch.randn(m, l, d, generator=generator).to(device=device, dtype=dtype)
    pos_idx = None if pos == "none" else torch.randint(0, m, (n,), generator=generator).to(device)
    return src, trg, pos_idx


def _outputs_and_grads(backend, src, trg, pos_idx, options, generator):
    """loss, reg and the gradients of two objectives: loss.sum() + reg, and loss with random
    weights + reg (on the CPU, cpp's three-product backward scales its stored gradients for
    the first and recomputes for the second)."""
    out = []
    for weighted in (False, True):
        s, t = src.clone().requires_grad_(), trg.clone().requires_grad_()
        loss, reg = nce_loss(s, t, pos_idx, backend=backend, **options)
        weights = torch.rand(loss.shape, generator=generator).to(loss.device) if weighted else 1.0
        torch.autograd.backward((loss * weights).sum() + reg)
        out += ([loss.detach(), reg.detach()] if not weighted else []) + [s.grad.float(), t.grad.float()]
    return out


def _rel_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float((x.double() - truth.double()).norm() / truth.double().norm().clamp_min(1e-30))


def check(backend: str, device: str) -> list[str]:
    """Failures of `backend` against the reference on PROBLEMS in each dtype it takes."""
    dtypes = (torch.float32,) if device == "cpu" else (torch.float32, torch.float16, torch.bfloat16)
    failures = []
    for dtype in dtypes:
        value_tol, grad_tol = TOLERANCES[dtype]
        for n, m, l, d, pos, options in PROBLEMS:
            seed = torch.Generator().manual_seed(n * 1000 + m)
            src, trg, pos_idx = _inputs(n, m, l, d, pos, dtype, device, seed)
            got = _outputs_and_grads(backend, src, trg, pos_idx, options, torch.Generator().manual_seed(1))
            want = _outputs_and_grads("reference", src, trg, pos_idx, options, torch.Generator().manual_seed(1))
            names = ("loss", "reg", "d src", "d trg", "d src (weighted)", "d trg (weighted)")
            for name, a, b, tol in zip(names, got, want, (value_tol, value_tol) + (grad_tol,) * 4):
                err = _rel_err(a, b)
                if not err <= tol:
                    failures.append(f"{dtype}, N={n} M={m} L={l} D={d} {options}: {name} off by {err:.2e} "
                                    f"(bound {tol:g})")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m amdim_kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-check", action="store_true", help="print what this install has, without the self-check")
    args = ap.parse_args(argv)
    info = registry.build_info()
    ext = info["extension"]
    print(f"amdim_kernels {__version__}, Python {platform.python_version()}, torch {info['torch']} "
          f"(CUDA {info['torch_cuda']}), triton {info['triton']}")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    print(f"devices: cpu{''.join(', ' + g for g in gpus)}")
    kernels = ", ".join(info["extension_built_for"]) or "none"
    if info["cpu_epilogue"]:
        kernels += f" (CPU epilogue: {info['cpu_epilogue'][0]})"
    print(f"compiled extension: {ext['origin']}, kernels for: {kernels}"
          + (f", at {ext['path']}" if ext["path"] else "") + (f" ({ext['note']})" if ext["note"] else ""))
    print(f"settings: {current_settings()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    runnable = []
    print("backends:")
    for device in devices:
        for name in registry.BACKENDS:
            reason = registry.unavailable_reason(name, torch.device(device))
            auto = " (auto)" if info["auto"][device] == name else ""
            print(f"  {device:4} {name:9} " + ("available" + auto if reason is None else f"unavailable: {reason}"))
            if reason is None and name != "reference":
                runnable.append((name, device))
    if args.no_check:
        return 0
    print("self-check against the reference (values and gradients, float32" +
          (", float16, bfloat16 on the GPU" if len(devices) > 1 else "") + "):")
    failed = False
    for name, device in runnable:
        failures = check(name, device)
        failed |= bool(failures)
        print(f"  {device:4} {name:9} " + ("pass" if not failures else f"FAIL ({len(failures)} cases)"))
        for failure in failures[:5]:
            print(f"      {failure}")
    if not runnable:
        print("  no fused backend can run here: nothing to check beyond the reference")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
