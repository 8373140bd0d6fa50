"""A small fwd+bwd of the CUDA backend for compute-sanitizer (memcheck, racecheck), through
both of its score paths (cuBLAS chunks, and the fused WMMA kernels for 16-bit inputs) and both
WMMA operand loaders (D = 72: 16-byte copies; D = 70: element by element):

    compute-sanitizer --tool memcheck python -m benchmarks.sanitize_case
"""
import torch

from amdim_kernels import nce_loss
from amdim_kernels.backends import cuda_scores

for scores in ("cublas", "mma"):
    for dtype, d in ((torch.float32, 70), (torch.bfloat16, 70), (torch.bfloat16, 72), (torch.float16, 72)):
        if scores == "cublas" and dtype == torch.float16:
            continue
        for tclip in (20.0, None):
            src = (3 * torch.randn(37, d, device="cuda")).to(dtype).requires_grad_()
            trg = torch.randn(23, 25, d, device="cuda").to(dtype).requires_grad_()
            pos_idx = torch.randint(0, 23, (37,), device="cuda")
            with cuda_scores(scores):
                loss, reg = nce_loss(src, trg, pos_idx, tclip=tclip, backend="cuda")
                (loss + reg).backward()
            torch.cuda.synchronize()
            print(scores, dtype, d, tclip, f"loss {loss.item():.5f} reg {reg.item():.5f}", "grads finite:",
                  bool(src.grad.isfinite().all() and trg.grad.isfinite().all()))
