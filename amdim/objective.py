"""AMDIM's multiscale NCE objective through amdim_kernels.nce_loss (SPEC.md section 2).

Six calls per step: 1->5, 1->7 and 5->5, each in both directions (view 1's sources against
view 2's targets and the reverse). A 5->5 source is one uniformly random location of r5 per
image, drawn independently per view. With several processes the targets are all-gathered
with their gradient, so every rank scores its own sources against the whole batch (the
official DataParallel semantics), and pos_idx is offset by the rank.

    total = loss_1t5 + loss_1t7 + loss_5t5 + 0.5 * (sum of the six regularisers)

loss_k is the mean of its two directions. All twelve scalars are stacked, and total is half
their sum (see `parts`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from amdim_kernels import nce_loss


def as_targets(fmap: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) feature map -> (B, H*W, D) targets, location l = h*W + w (a strided view)."""
    return fmap.flatten(2).transpose(1, 2)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; the backward gives each rank the sum over
    ranks of the gradient of its own slice. (torch.distributed.nn.functional.all_gather,
    deprecated, sent wrong gradients over gloo when they were not contiguous.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        rank, rows = dist.get_rank(), ctx.rows
        if dist.get_backend() == dist.Backend.NCCL:
            mine = torch.empty_like(grad[:rows])
            dist.reduce_scatter_tensor(mine, grad)
            return mine
        dist.all_reduce(grad)  # gloo has no reduce-scatter
        return grad[rank * rows:(rank + 1) * rows]


def gather_targets(trg: torch.Tensor) -> tuple[torch.Tensor, range | None]:
    """Targets of the whole batch and this rank's pos_idx. All-gathered with gradient (each
    rank's targets get the gradient of every rank's loss) when a process group is running.
    pos_idx is a range, which nce_loss checks on the host: no device sync per call."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return trg, None
    n = trg.shape[0]
    return _AllGatherWithGrad.apply(trg), range(dist.get_rank() * n, (dist.get_rank() + 1) * n)


# The six calls' twelve scalars, in the order `parts` holds them: the losses of 1->5, 1->7 and
# 5->5, each as (view 1 -> view 2, view 2 -> view 1), then their regularisers in that order.
# Each figure is a fixed combination of them (loss_k: its two directions' mean; reg: the six
# regularisers' sum), and so is the objective: total = loss_1t5 + loss_1t7 + loss_5t5 + 0.5 *
# reg = (the sum of all twelve) / 2. Forming it so takes one stack and one sum (and one launch
# back), where adding the figures up by name took about twenty launches a step.
_FIGURES = ("loss_1t5", "loss_1t7", "loss_5t5", "reg")
_FIGURE_WEIGHTS = torch.tensor([[0.5, 0.5] + [0.0] * 10,
                                [0.0] * 2 + [0.5, 0.5] + [0.0] * 8,
                                [0.0] * 4 + [0.5, 0.5] + [0.0] * 6,
                                [0.0] * 6 + [1.0] * 6])


@functools.cache
def _figure_weights(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _FIGURE_WEIGHTS.to(device, dtype)


@dataclass
class Losses:
    total: torch.Tensor
    parts: torch.Tensor  # (12,), detached: the six calls' losses, then their regularisers

    def figures(self) -> dict[str, torch.Tensor]:
        """loss_1t5, loss_1t7, loss_5t5 and reg (the sum of the six regularisers), detached,
        on the device, from one launch (in float32 under any autocast)."""
        with torch.autocast(self.parts.device.type, enabled=False):
            figures = torch.mv(_figure_weights(self.parts.device, self.parts.dtype), self.parts)
        return dict(zip(_FIGURES, figures.unbind()))

    def as_dict(self) -> dict[str, torch.Tensor]:
        """total and the four figures, detached, still on the device (reading them back waits for it)."""
        return dict(total=self.total.detach(), **self.figures())


def draw_locations(b: int, n_locations: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5->5 sources: one uniform location of the 5x5 map per image of each view, from the
    CPU RNG (as the official code)."""
    return torch.randint(0, n_locations, (b,)), torch.randint(0, n_locations, (b,))


def multiscale_nce(view1, view2, *, tclip: float | None = 20.0, backend: str = "auto",
                   locations: tuple[torch.Tensor, torch.Tensor] | None = None) -> Losses:
    """view1, view2: (r1 (B, D), r5 (B, D, 5, 5), r7 (B, D, 7, 7)) of the two views.
    locations: the 5->5 source location per image of each view (default: uniform draws from
    the CPU RNG, as the official code)."""
    (r1_a, r5_a, r7_a), (r1_b, r5_b, r7_b) = view1, view2
    t5_a, t5_b, t7_a, t7_b = as_targets(r5_a), as_targets(r5_b), as_targets(r7_a), as_targets(r7_b)
    b = r1_a.shape[0]
    if locations is None:
        locations = draw_locations(b, t5_a.shape[1])
    # the rows and both views' locations reach the device in one copy
    picks = torch.stack([torch.arange(b), locations[0].cpu(), locations[1].cpu()])
    rows, loc_a, loc_b = picks.to(r1_a.device).unbind()
    s5_a = t5_a[rows, loc_a]
    s5_b = t5_b[rows, loc_b]

    # each view's 5x5 targets serve two calls: gathered once (one all-gather, and one
    # reduce-scatter of their summed gradient, where a gather per call made two of each)
    (g5_a, pos_idx), (g5_b, _), (g7_a, _), (g7_b, _) = (gather_targets(t) for t in (t5_a, t5_b, t7_a, t7_b))

    def nce(src, trg):
        return nce_loss(src, trg, pos_idx, tclip=tclip, backend=backend)

    calls = [nce(r1_a, g5_b), nce(r1_b, g5_a), nce(r1_a, g7_b), nce(r1_b, g7_a), nce(s5_a, g5_b), nce(s5_b, g5_a)]
    parts = torch.stack([loss for loss, _ in calls] + [reg for _, reg in calls])
    return Losses(parts.sum() * 0.5, parts.detach())
