"""A small fwd+bwd for compute-sanitizer (memcheck, racecheck):
- the CUDA backend through both of its score paths (cuBLAS chunks, and the fused WMMA kernels
  for 16-bit inputs) and both WMMA operand loaders (D = 72: 16-byte copies; D = 70: element
  by element);
- the Triton backend's fused kernels with TMA operands (D = 72) and with pointers (D = 70,
  whose rows are not 16-byte multiples), and its cuBLAS-scores strategy;
- float16 in each, whose backward adds the kernel that finds G's scale;
- without clipping, reduction "none" under a transposed upstream gradient, which the
  backward's row kernels read through its strides (with clipping: the mean's, broadcast);
- with clipping, both backends' three-product schedules (float32 and bfloat16), in two row
  blocks.

    compute-sanitizer --tool memcheck python -m benchmarks.sanitize_case          # every case
    compute-sanitizer --tool memcheck python -m benchmarks.sanitize_case --one    # one case a path
"""
import argparse

import torch

from amdim_kernels import nce_loss, settings

from . import arguments


def fwd_bwd(label, dtype, d, tclip, backend):
    src = (3 * torch.randn(37, d, device="cuda")).to(dtype).requires_grad_()
    trg = torch.randn(23, 25, d, device="cuda").to(dtype).requires_grad_()
    pos_idx = torch.randint(0, 23, (37,), device="cuda")
    reduction = "mean" if tclip else "none"
    loss, reg = nce_loss(src, trg, pos_idx, tclip=tclip, reduction=reduction, backend=backend)
    if reduction == "none":  # the losses' gradient reaches the op transposed: strides (1, N)
        loss = (loss.t() * torch.rand(loss.shape[1], loss.shape[0], device="cuda")).sum()
    (loss + reg).backward()
    torch.cuda.synchronize()
    print(backend, label, dtype, d, tclip, reduction, f"loss {loss.item():.5f} reg {reg.item():.5f}", "grads finite:",
          bool(src.grad.isfinite().all() and trg.grad.isfinite().all()))


def main(argv=None):
    ap = arguments.Parser(description="A small fwd+bwd of each GPU path, for compute-sanitizer.")
    ap.add_argument("--one", action="store_true",
                    help="one case per score path (bfloat16, D = 72, clipped) instead of every dtype and option")
    args = ap.parse_args(argv)
    arguments.require_gpu(ap, "benchmarks.sanitize_case")
    tclips = (20.0,) if args.one else (20.0, None)
    cuda_cases = ((torch.bfloat16, 72),) if args.one else (
        (torch.float32, 70), (torch.bfloat16, 70), (torch.bfloat16, 72), (torch.float16, 72))
    triton_cases = ((torch.bfloat16, 72),) if args.one else (
        (torch.float32, 72), (torch.bfloat16, 70), (torch.bfloat16, 72), (torch.float16, 72))
    for tclip in tclips:
        for scores in ("cublas", "mma"):
            for dtype, d in cuda_cases:
                with settings(cuda_scores=scores):
                    fwd_bwd(scores, dtype, d, tclip, "cuda")
        for strategy, loads in (("fused", "tma"), ("fused", "pointers"), ("gemm", "pointers")):
            for dtype, d in triton_cases:
                with settings(triton_scores=strategy, triton_loads=loads):
                    fwd_bwd(f"{strategy}/{loads}", dtype, d, tclip, "triton")
        if tclip is not None:  # the three-product schedule needs the reduced loss
            for backend, cases in (("cuda", cuda_cases), ("triton", triton_cases)):
                for dtype, d in cases:
                    if dtype == torch.float16:  # refused: its G's scale needs every row
                        continue
                    # a budget of 20 of the 37 rows: two blocks, of 19 and 18
                    row_bytes = (4 + torch.tensor([], dtype=dtype).element_size()) * 23 * 25
                    with settings(schedule="three-product", workspace_bytes=20 * row_bytes):
                        fwd_bwd("three-product", dtype, d, tclip, backend)


if __name__ == "__main__":
    main()
