"""The AMDIM encoder and its phi heads, as in the official amdim-public code.

The encoder maps an image to three feature maps: f1 (global, 1x1, n_rkhs channels, batch
normed), f5 (5x5) and f7 (7x7). The phi heads turn them into r1 = f1, r5 = phi5(f5) and
r7 = phi7(f7), all n_rkhs wide, whose dot products the NCE loss scores.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def maybe_batchnorm(channels: int, use_bn: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if use_bn else nn.Identity()


class Conv3x3(nn.Sequential):
    """conv (optional reflect/zero padding) -> optional BN -> ReLU. Without BN the conv has a bias."""

    def __init__(self, n_in: int, n_out: int, k: int, stride: int, pad: int, use_bn: bool,
                 pad_mode: str = "zeros"):
        super().__init__(
            nn.Conv2d(n_in, n_out, k, stride, pad, bias=not use_bn, padding_mode=pad_mode),
            maybe_batchnorm(n_out, use_bn),
            nn.ReLU(inplace=True),
        )


class ConvResNxN(nn.Module):
    """Residual block: conv1x1(ReLU(BN?(conv_kxk,stride(x)))) + avg_pool_k,stride(x) zero-padded
    in channels; no ReLU after the sum. The 1x1 conv starts at zero (fixup-style), so each
    block starts as its shortcut. (Published configs only widen; a narrowing block, as in
    small test models with n_rkhs < the encoder's width, keeps the first n_out channels.)"""

    def __init__(self, n_in: int, n_out: int, k: int, stride: int, use_bn: bool, init_scale: float = 1.0):
        super().__init__()
        self.n_in, self.n_out, self.k, self.stride = n_in, n_out, k, stride
        self.conv1 = nn.Conv2d(n_in, n_out, k, stride, 0, bias=False)
        self.bn1 = maybe_batchnorm(n_out, use_bn)
        self.conv2 = nn.Conv2d(n_out, n_out, 1, 1, 0, bias=False)
        nn.init.kaiming_uniform_(self.conv1.weight, a=math.sqrt(5))
        self.conv1.weight.data.mul_(init_scale)
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv2(F.relu(self.bn1(self.conv1(x))))
        short = F.avg_pool2d(x, self.k, self.stride) if (self.k, self.stride) != (1, 1) else x
        if self.n_out > self.n_in:
            short = F.pad(short, (0, 0, 0, 0, 0, self.n_out - self.n_in))
        elif self.n_out < self.n_in:
            short = short[:, : self.n_out]
        return branch + short


def conv_res_block(n_in: int, n_out: int, k: int, stride: int, depth: int, use_bn: bool) -> nn.Sequential:
    """ConvResNxN(n_in, n_out, k, stride) then depth - 1 ConvResNxN(n_out, n_out, 1, 1)."""
    layers = [ConvResNxN(n_in, n_out, k, stride, use_bn)]
    layers += [ConvResNxN(n_out, n_out, 1, 1, use_bn) for _ in range(depth - 1)]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """AMDIM's encoder for 32, 64 or 128 px inputs; forward returns (f1, f5, f7)."""

    SIZES = (32, 64, 128)

    def __init__(self, image_size: int = 32, ndf: int = 128, n_rkhs: int = 1024, n_depth: int = 3,
                 use_bn: bool = False, in_channels: int = 3):
        super().__init__()
        if image_size not in self.SIZES:
            raise ValueError(f"image_size must be one of {self.SIZES}, got {image_size}")
        self.image_size = image_size
        if image_size == 32:
            stem = [
                Conv3x3(in_channels, ndf, 3, 1, 0, use_bn=False),  # 32 -> 30
                ConvResNxN(ndf, ndf, 1, 1, use_bn),
                conv_res_block(ndf, 2 * ndf, 4, 2, n_depth, use_bn),  # 30 -> 14
                conv_res_block(2 * ndf, 4 * ndf, 2, 2, n_depth, use_bn),  # 14 -> 7
            ]
            width = 4 * ndf
        else:
            if image_size == 128:
                stem = [Conv3x3(in_channels, ndf, 5, 2, 2, use_bn=False, pad_mode="reflect"),  # 128 -> 64
                        Conv3x3(ndf, ndf, 3, 1, 0, use_bn)]  # 64 -> 62
            else:
                stem = [Conv3x3(in_channels, ndf, 3, 1, 0, use_bn=False)]  # 64 -> 62
            stem += [
                conv_res_block(ndf, 2 * ndf, 4, 2, n_depth, use_bn),  # 62 -> 30
                conv_res_block(2 * ndf, 4 * ndf, 4, 2, n_depth, use_bn),  # 30 -> 14
                conv_res_block(4 * ndf, 8 * ndf, 2, 2, n_depth, use_bn),  # 14 -> 7
            ]
            width = 8 * ndf
        self.to_f7 = nn.Sequential(*stem, maybe_batchnorm(width, use_bn))
        self.to_f5 = conv_res_block(width, width, 3, 1, n_depth, use_bn)  # 7 -> 5
        self.to_f1 = nn.Sequential(
            conv_res_block(width, width, 3, 1, n_depth, use_bn),  # 5 -> 3
            ConvResNxN(width, n_rkhs, 3, 1, use_bn),  # 3 -> 1
            nn.BatchNorm2d(n_rkhs),  # always on
        )
        self.feature_width = width

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f7 = self.to_f7(x)
        f5 = self.to_f5(f7)
        f1 = self.to_f1(f5)
        return f1, f5, f7


class PhiHead(nn.Module):
    """AMDIM's 'fake RKHS' embedding: BN(conv_b(ReLU(BN?(conv_a(x)))) + shortcut(x)), 1x1
    convs. conv_b starts at zero and, where n_out >= n_in, the shortcut near the identity, so
    r starts as ~x."""

    def __init__(self, n_in: int, n_out: int, use_bn: bool):
        super().__init__()
        self.conv_a = nn.Conv2d(n_in, n_out, 1, bias=False)
        self.bn_hidden = maybe_batchnorm(n_out, use_bn)
        self.conv_b = nn.Conv2d(n_out, n_out, 1, bias=False)
        self.shortcut = nn.Conv2d(n_in, n_out, 1, bias=True)
        self.bn_out = nn.BatchNorm2d(n_out)
        nn.init.kaiming_uniform_(self.conv_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.conv_b.weight)
        if n_out >= n_in:  # near the identity where it exists; else Conv2d's default, as the official code
            nn.init.uniform_(self.shortcut.weight, -0.01, 0.01)
            with torch.no_grad():
                idx = torch.arange(n_in)
                self.shortcut.weight[idx, idx, 0, 0] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_out(self.conv_b(F.relu(self.bn_hidden(self.conv_a(x)))) + self.shortcut(x))


class AMDIM(nn.Module):
    """Encoder + phi heads: forward(x) -> (r1 (B, D), r5 (B, D, 5, 5), r7 (B, D, 7, 7))."""

    def __init__(self, image_size: int = 32, ndf: int = 128, n_rkhs: int = 1024, n_depth: int = 3,
                 use_bn: bool = False, in_channels: int = 3):
        super().__init__()
        self.encoder = Encoder(image_size, ndf, n_rkhs, n_depth, use_bn, in_channels)
        width = self.encoder.feature_width
        self.phi5 = PhiHead(width, n_rkhs, use_bn)
        self.phi7 = PhiHead(width, n_rkhs, use_bn)
        self.n_rkhs = n_rkhs

    def global_feature(self, x: torch.Tensor) -> torch.Tensor:
        """r1 (B, D) alone: the encoder's f1, without the phi heads (a third of the forward)."""
        return self.encoder(x)[0].flatten(1)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(r1, r5, r7) of one batch, in one pass."""
        f1, f5, f7 = self.encoder(x)
        return f1.flatten(1), self.phi5(f5), self.phi7(f7)

    def forward(self, x: torch.Tensor, n_views: int | None = None):
        """(r1, r5, r7) of x; with n_views, x holds that many views of one batch, one after
        the other, and each view is encoded in its own pass, so that every BatchNorm
        normalises over one view's images (the official model's two encoder calls: an
        image's positive never shares its batch statistics). Returns then one (r1, r5, r7)
        per view. One forward call, so DistributedDataParallel and torch.compile see one."""
        if n_views is None:
            return self.features(x)
        return tuple(self.features(view) for view in x.chunk(n_views))
