"""Small ResNeXt (bottleneck blocks with a grouped 3x3 convolution)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class ResNeXtBottleneck(nn.Module):
    def __init__(self, in_channels: int, width: int, out_channels: int,
                 stride: int = 1, groups: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1,
                               groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.downsample: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.downsample = nn.Identity()
        self.relu3 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.downsample(x))


class ResNeXtSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, groups: int = 8,
                 stem_channels: int = 32,
                 widths: Sequence[int] = (32, 64, 128),
                 out_channels: Sequence[int] = (64, 128, 256),
                 blocks_per_stage: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU()
        ch = stem_channels
        stages = []
        for i, (w, c) in enumerate(zip(widths, out_channels)):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(ResNeXtBottleneck(ch, w, c, stride, groups))
                ch = c
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def grouped_resnext_small(num_classes: int = 10, in_channels: int = 3, groups: int = 8,
                          blocks_per_stage: int = 2) -> ResNeXtSmall:
    """ResNeXt for 32x32 inputs: 3 stages of bottlenecks with grouped 3x3 convs
    (cardinality ``groups``; widths 32/64/128, outputs 64/128/256)."""
    return ResNeXtSmall(num_classes=num_classes, in_channels=in_channels, groups=groups,
                        blocks_per_stage=blocks_per_stage)


resnext_small = grouped_resnext_small
