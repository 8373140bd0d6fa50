"""A small fwd+bwd of the CUDA backend for compute-sanitizer (memcheck, racecheck):

    compute-sanitizer --tool memcheck python -m benchmarks.sanitize_case
"""
import torch

from amdim_kernels import nce_loss

for dtype in (torch.float32, torch.bfloat16):
    for tclip in (20.0, None):
        src = (3 * torch.randn(37, 70, device="cuda")).to(dtype).requires_grad_()
        trg = torch.randn(23, 25, 70, device="cuda").to(dtype).requires_grad_()
        pos_idx = torch.randint(0, 23, (37,), device="cuda")
        loss, reg = nce_loss(src, trg, pos_idx, tclip=tclip, backend="cuda")
        (loss + reg).backward()
        torch.cuda.synchronize()
        print(dtype, tclip, f"loss {loss.item():.5f} reg {reg.item():.5f}", "grads finite:",
              bool(src.grad.isfinite().all() and trg.grad.isfinite().all()))
