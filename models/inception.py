"""BN-Inception (Inception-v2 style) network sized for 32x32 inputs.

Follows the architecture used as the teacher/student in Net2Net
(Chen, Goodfellow & Shlens, 2016): Inception modules with four branches
(1x1; 1x1->3x3; 1x1->3x3->3x3; pool->1x1 projection) concatenated along the
channel axis, BatchNorm after every convolution, and stride-2 reduction
modules (no 1x1 / pool-projection branches, max-pool passthrough).

``width_mult`` scales every convolution's output channel count; with
``width_mult=0.55`` (~sqrt(0.3)) most conv layers keep ~30 % of their
parameters, which is the paper's "narrow teacher".

``factorized=True`` replaces each 3x3 convolution of the double-3x3 branch by
a 3x1 conv-BN-ReLU followed by a 1x3 conv-BN-ReLU.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn

from .common import ConvBNReLU, scale_channels


def _conv3x3(in_ch: int, out_ch: int, stride: int, factorized: bool) -> nn.Module:
    if not factorized:
        return ConvBNReLU(in_ch, out_ch, 3, stride=stride, padding=1)
    # Vertical then horizontal; the stride is split between the two convs.
    return nn.Sequential(
        ConvBNReLU(in_ch, out_ch, (3, 1), stride=(stride, 1), padding=(1, 0)),
        ConvBNReLU(out_ch, out_ch, (1, 3), stride=(1, stride), padding=(0, 1)),
    )


class InceptionModule(nn.Module):
    """Four-branch Inception-BN module (stride 1)."""

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        dbl3x3red: int,
        dbl3x3: int,
        pool_proj: int,
        pool: str = "avg",
        factorized: bool = False,
    ) -> None:
        super().__init__()
        self.branch1x1 = ConvBNReLU(in_channels, ch1x1, 1)
        self.branch3x3 = nn.Sequential(
            ConvBNReLU(in_channels, ch3x3red, 1),
            ConvBNReLU(ch3x3red, ch3x3, 3, padding=1),
        )
        self.branch_dbl3x3 = nn.Sequential(
            ConvBNReLU(in_channels, dbl3x3red, 1),
            _conv3x3(dbl3x3red, dbl3x3, 1, factorized),
            _conv3x3(dbl3x3, dbl3x3, 1, factorized),
        )
        if pool == "avg":
            pool_layer: nn.Module = nn.AvgPool2d(3, stride=1, padding=1)
        elif pool == "max":
            pool_layer = nn.MaxPool2d(3, stride=1, padding=1)
        else:
            raise ValueError(f"unknown pool type {pool!r}")
        self.branch_pool = nn.Sequential(pool_layer, ConvBNReLU(in_channels, pool_proj, 1))
        self.out_channels = ch1x1 + ch3x3 + dbl3x3 + pool_proj

    def forward(self, x):
        b1 = self.branch1x1(x)
        b2 = self.branch3x3(x)
        b3 = self.branch_dbl3x3(x)
        b4 = self.branch_pool(x)
        return torch.cat([b1, b2, b3, b4], 1)


class ReductionModule(nn.Module):
    """Stride-2 Inception-BN module: 1x1->3x3/2, 1x1->3x3->3x3/2, maxpool/2."""

    def __init__(
        self,
        in_channels: int,
        ch3x3red: int,
        ch3x3: int,
        dbl3x3red: int,
        dbl3x3: int,
        factorized: bool = False,
    ) -> None:
        super().__init__()
        self.branch3x3 = nn.Sequential(
            ConvBNReLU(in_channels, ch3x3red, 1),
            ConvBNReLU(ch3x3red, ch3x3, 3, stride=2, padding=1),
        )
        self.branch_dbl3x3 = nn.Sequential(
            ConvBNReLU(in_channels, dbl3x3red, 1),
            _conv3x3(dbl3x3red, dbl3x3, 1, factorized),
            _conv3x3(dbl3x3, dbl3x3, 2, factorized),
        )
        self.branch_pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.out_channels = ch3x3 + dbl3x3 + in_channels

    def forward(self, x):
        b1 = self.branch3x3(x)
        b2 = self.branch_dbl3x3(x)
        b3 = self.branch_pool(x)
        return torch.cat([b1, b2, b3], 1)


# Net2DeeperNet's configuration from the paper, for ``inception_bn(factorized=True)``: after the last
# vertical-horizontal pair of every module's double branch, two more identity pairs.
PAPER_DEEPER_AFTER = r"blocks\.\d+\.branch_dbl3x3\.2"
PAPER_DEEPER_KERNEL = "3x1+1x3+3x1+1x3"

# Channel configuration at width_mult=1.0.
# Inception: (ch1x1, ch3x3red, ch3x3, dbl3x3red, dbl3x3, pool_proj, pool)
# Reduction: (ch3x3red, ch3x3, dbl3x3red, dbl3x3)
_STEM = (32, 64)
_CONFIG: Sequence = (
    ("3a", "inc", (32, 32, 48, 32, 48, 32, "avg")),   # 32x32, out 160
    ("3b", "inc", (48, 48, 64, 48, 64, 32, "avg")),   # out 208
    ("3c", "red", (64, 96, 48, 64)),                  # -> 16x16, out 368
    ("4a", "inc", (96, 48, 64, 48, 64, 64, "avg")),   # out 288
    ("4b", "inc", (96, 64, 96, 64, 96, 64, "avg")),   # out 352
    ("4c", "inc", (96, 64, 96, 64, 96, 64, "max")),   # out 352
    ("4d", "red", (96, 128, 96, 128)),                # -> 8x8, out 608
    ("5a", "inc", (128, 96, 128, 96, 128, 64, "avg")),  # out 448
    ("5b", "inc", (128, 96, 128, 96, 128, 64, "max")),  # out 448
)


class InceptionBN(nn.Module):
    def __init__(
        self,
        width_mult: float = 1.0,
        num_classes: int = 10,
        in_channels: int = 3,
        factorized: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.width_mult = width_mult
        self.factorized = factorized

        def w(c: int) -> int:
            return scale_channels(c, width_mult)

        s1, s2 = (w(c) for c in _STEM)
        self.stem = nn.Sequential(
            ConvBNReLU(in_channels, s1, 3, padding=1),
            ConvBNReLU(s1, s2, 3, padding=1),
        )
        ch = s2
        blocks: List[nn.Module] = []
        self.block_names: List[str] = []
        for name, kind, cfg in _CONFIG:
            if kind == "inc":
                c1, r3, c3, rd, cd, pp, pool = cfg
                m: nn.Module = InceptionModule(
                    ch, w(c1), w(r3), w(c3), w(rd), w(cd), w(pp), pool=pool,
                    factorized=factorized,
                )
            else:
                r3, c3, rd, cd = cfg
                m = ReductionModule(ch, w(r3), w(c3), w(rd), w(cd), factorized=factorized)
            blocks.append(m)
            self.block_names.append(name)
            ch = m.out_channels
        self.blocks = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(ch, num_classes)
        self.num_features = ch

    def forward(self, x):
        x = self.stem(x)
        x = self.blocks(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        return self.fc(x)


def inception_bn(
    width_mult: float = 1.0,
    num_classes: int = 10,
    in_channels: int = 3,
    factorized: bool = False,
    dropout: float = 0.0,
) -> InceptionBN:
    """BN-Inception for 3x32x32 inputs (7 Inception + 2 reduction modules)."""
    return InceptionBN(
        width_mult=width_mult, num_classes=num_classes, in_channels=in_channels,
        factorized=factorized, dropout=dropout,
    )


def inception_bn_narrow(num_classes: int = 10, in_channels: int = 3,
                        factorized: bool = False) -> InceptionBN:
    """Net2Net's narrow teacher: ``inception_bn(width_mult=0.55)``."""
    return inception_bn(width_mult=0.55, num_classes=num_classes,
                        in_channels=in_channels, factorized=factorized)
