"""Small ShuffleNetV2 (channel split / concat / channel shuffle)."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn

from .common import ConvBNReLU


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision-style channel shuffle using x.size() + view/transpose/view."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    x = x.view(batchsize, num_channels, height, width)
    return x


class ShuffleUnit(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError("stride must be 1 or 2")
        self.stride = stride
        branch = out_channels // 2
        if stride == 1 and in_channels != out_channels:
            raise ValueError("stride-1 ShuffleUnit needs in_channels == out_channels")
        if stride == 2:
            self.branch1: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1,
                          groups=in_channels, bias=False),
                nn.BatchNorm2d(in_channels),
                ConvBNReLU(in_channels, branch, 1),
            )
            b2_in = in_channels
        else:
            self.branch1 = nn.Identity()
            b2_in = branch
        self.branch2 = nn.Sequential(
            ConvBNReLU(b2_in, branch, 1),
            nn.Conv2d(branch, branch, 3, stride=stride, padding=1, groups=branch, bias=False),
            nn.BatchNorm2d(branch),
            ConvBNReLU(branch, branch, 1),
        )

    def forward(self, x):
        if self.stride == 1:  # static attribute, fx-safe
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 stage_channels: Sequence[int] = (24, 48, 96, 192),
                 stage_repeats: Sequence[int] = (2, 3, 2),
                 last_channels: int = 256) -> None:
        super().__init__()
        self.stem = ConvBNReLU(in_channels, stage_channels[0], 3, padding=1)
        ch = stage_channels[0]
        stages: List[nn.Module] = []
        for out, reps in zip(stage_channels[1:], stage_repeats):
            units = [ShuffleUnit(ch, out, 2)] + [ShuffleUnit(out, out, 1) for _ in range(reps - 1)]
            stages.append(nn.Sequential(*units))
            ch = out
        self.stages = nn.Sequential(*stages)
        self.conv_last = ConvBNReLU(ch, last_channels, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last_channels, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.stages(x)
        x = self.conv_last(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def shufflenet_small(num_classes: int = 10, in_channels: int = 3,
                     stage_channels: Sequence[int] = (24, 48, 96, 192),
                     stage_repeats: Sequence[int] = (2, 3, 2),
                     last_channels: int = 256) -> ShuffleNetSmall:
    """ShuffleNetV2 for 32x32 inputs (3 stages, stride-2 unit then chunk(2) units)."""
    return ShuffleNetSmall(num_classes=num_classes, in_channels=in_channels,
                           stage_channels=stage_channels, stage_repeats=stage_repeats,
                           last_channels=last_channels)
