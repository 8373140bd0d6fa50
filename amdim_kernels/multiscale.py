"""AMDIM's multiscale NCE objective through nce_loss, for any encoder that gives each view's
global feature r1 (B, D) and feature maps r5 (B, D, 5, 5) and r7 (B, D, 7, 7):

    from amdim_kernels import multiscale_nce
    losses = multiscale_nce((r1_a, r5_a, r7_a), (r1_b, r5_b, r7_b))
    losses.total.backward()            # losses.figures(): loss_1t5, loss_1t7, loss_5t5, reg

Six losses per step: 1->5, 1->7 and 5->5, each in both directions (view 1's sources against
view 2's targets and the reverse). A 5->5 source is one uniformly random location of r5 per
image, drawn independently per view. 1->5 and 5->5 of one direction share their targets and
are scored in one call, so a step makes four calls. With several processes the targets are
all-gathered with their gradient, so every rank scores its own sources against the whole
batch (the official DataParallel semantics), and pos_idx is offset by the rank.

    total = loss_1t5 + loss_1t7 + loss_5t5 + 0.5 * (sum of the six regularisers)

loss_k is the mean of its two directions. The losses and regularisers are gathered in one
tensor, and total is one dot product of it (see `parts`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .api import nce_loss


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


# The objective's ten scalars, in the order `parts` holds them. Each view's r1 and its 5->5
# sources share the other view's 5x5 targets, so one call scores both groups (see
# `multiscale_nce`): its per-positive losses give two means, and its regulariser is the mean
# of the two calls' regularisers. So `parts` holds
#   0-3  loss 1->5 and 5->5 of view 1 -> view 2, then of view 2 -> view 1,
#   4-5  loss 1->7 of view 1 -> view 2 and of view 2 -> view 1,
#   6-7  the 1->5 + 5->5 calls' regulariser (half the sum of the two), per direction,
#   8-9  the 1->7 regulariser per direction.
# Each figure is a fixed combination of them (loss_k: its two directions' mean; reg: the six
# regularisers' sum), and so is the objective: total = loss_1t5 + loss_1t7 + loss_5t5 + 0.5 *
# reg, one dot product with _TOTAL_WEIGHTS.
_FIGURES = ("loss_1t5", "loss_1t7", "loss_5t5", "reg")
_FIGURE_WEIGHTS = torch.tensor([[0.5, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                                [0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0],
                                [0.0, 0.5, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                                [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 1.0, 1.0]])
_TOTAL_WEIGHTS = torch.tensor([1.0, 1.0, 1.0, 0.5]) @ _FIGURE_WEIGHTS


@functools.cache
def _weights(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _FIGURE_WEIGHTS.to(device, dtype), _TOTAL_WEIGHTS.to(device, dtype)


@dataclass
class Losses:
    total: torch.Tensor
    parts: torch.Tensor  # (10,), detached: the losses and regularisers laid out as above

    def figures(self) -> dict[str, torch.Tensor]:
        """loss_1t5, loss_1t7, loss_5t5 and reg (the sum of the six regularisers), detached,
        on the device, from one launch (in float32 under any autocast)."""
        with torch.autocast(self.parts.device.type, enabled=False):
            figures = torch.mv(_weights(self.parts.device, self.parts.dtype)[0], self.parts)
        return dict(zip(_FIGURES, figures.unbind()))

    def as_dict(self) -> dict[str, torch.Tensor]:
        """total and the four figures, detached, still on the device (reading them back waits for it)."""
        return dict(total=self.total.detach(), **self.figures())


def draw_locations(b: int, n_locations: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5->5 sources: one uniform location of the 5x5 map per image of each view, from the
    CPU RNG (as the official code)."""
    return torch.randint(0, n_locations, (b,)), torch.randint(0, n_locations, (b,))


def multiscale_nce(view1, view2, *, tclip: float | None = 20.0, backend: str = "auto",
                   locations: tuple[torch.Tensor, torch.Tensor] | None = None,
                   share_targets: bool = True) -> Losses:
    """view1, view2: (r1 (B, D), r5 (B, D, 5, 5), r7 (B, D, 7, 7)) of the two views.
    locations: the 5->5 source location per image of each view (default: uniform draws from
    the CPU RNG, as the official code). share_targets: 1->5 and 5->5 of a direction in one
    call (four calls a step); False makes the six calls one by one, the same objective,
    for comparison (benchmarks.host_overhead --objective)."""
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
    if pos_idx is None:
        pos_idx = range(b)

    def nce(src, trg, pos_idx, reduction="mean"):
        return nce_loss(src, trg, pos_idx, tclip=tclip, reduction=reduction, backend=backend)

    # 1->5 and 5->5 of a direction score B sources each against the same targets: one call of
    # 2B sources reads the targets once, forward and backward, and makes their gradient in
    # one product, where two calls read them twice and autograd added two gradients. The call
    # gives each group's mean ("group_means"); its regulariser, a mean over the 2B rows, is the
    # mean of the two calls' regularisers. The objective weights the two means 0.5 each and
    # the regulariser 1: its mean over all 2B*L positives plus reg, which the cpp backend's
    # three-product schedule takes as it is (its gradients made in the forward, then scaled).
    if share_targets:
        means5_a, reg5_a = nce(torch.cat([r1_a, s5_a]), g5_b, (pos_idx, pos_idx), "group_means")
        means5_b, reg5_b = nce(torch.cat([r1_b, s5_b]), g5_a, (pos_idx, pos_idx), "group_means")
        means = torch.cat([means5_a, means5_b])  # 1->5, 5->5 per direction
    else:
        (l15_a, r15_a), (l55_a, r55_a), (l15_b, r15_b), (l55_b, r55_b) = (
            nce(src, trg, pos_idx) for src, trg in ((r1_a, g5_b), (s5_a, g5_b), (r1_b, g5_a), (s5_b, g5_a)))
        means = torch.stack([l15_a, l55_a, l15_b, l55_b])
        reg5_a, reg5_b = (r15_a + r55_a) / 2, (r15_b + r55_b) / 2
    l7_a, reg7_a = nce(r1_a, g7_b, pos_idx)
    l7_b, reg7_b = nce(r1_b, g7_a, pos_idx)
    parts = torch.cat([means] + [x.view(1) for x in (l7_a, l7_b, reg5_a, reg5_b, reg7_a, reg7_b)])
    with torch.autocast(parts.device.type, enabled=False):
        total = torch.dot(parts, _weights(parts.device, parts.dtype)[1])
    return Losses(total, parts.detach())
