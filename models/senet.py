"""Small SE-ResNet with both squeeze-excitation styles.

* ``SEConv``: excitation MLP made of 1x1 convolutions on the pooled map.
* ``SELinear``: pooled map flattened, ``nn.Linear`` MLP, then reshaped back
  to (N, C, 1, 1) either by indexing (``s[:, :, None, None]``) or by
  ``.unsqueeze(-1).unsqueeze(-1)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class SEConv(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        s = self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))
        return x * s


class SELinear(nn.Module):
    def __init__(self, channels: int, reduction: int = 4, reshape: str = "index") -> None:
        super().__init__()
        if reshape not in ("index", "unsqueeze"):
            raise ValueError(f"unknown reshape style {reshape!r}")
        hidden = max(1, channels // reduction)
        self.reshape = reshape
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, channels)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        s = torch.flatten(self.pool(x), 1)
        s = self.gate(self.fc2(self.relu(self.fc1(s))))
        if self.reshape == "index":  # static attribute, fx-safe
            s = s[:, :, None, None]
        else:
            s = s.unsqueeze(-1).unsqueeze(-1)
        return x * s


class SEBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 se: str = "conv", reduction: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if se == "conv":
            self.se: nn.Module = SEConv(planes, reduction)
        elif se == "linear":
            self.se = SELinear(planes, reduction, reshape="index")
        elif se == "linear_unsqueeze":
            self.se = SELinear(planes, reduction, reshape="unsqueeze")
        else:
            raise ValueError(f"unknown SE variant {se!r}")
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.se(out)
        return self.relu2(out + self.shortcut(x))


# One SE style per block: (stage, block) -> variant.
_SE_PATTERN = (("conv", "linear"), ("linear_unsqueeze", "conv"), ("linear", "conv"))


class SENetSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 widths: Sequence[int] = (16, 32, 64), reduction: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages = []
        in_planes = widths[0]
        for i, planes in enumerate(widths):
            blocks = []
            for j, se in enumerate(_SE_PATTERN[i]):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(SEBasicBlock(in_planes, planes, stride, se=se, reduction=reduction))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def senet_small(num_classes: int = 10, in_channels: int = 3,
                widths: Sequence[int] = (16, 32, 64), reduction: int = 4) -> SENetSmall:
    """SE-ResNet, 3 stages x 2 BasicBlocks; mixes 1x1-conv SE and Linear SE
    (both ``s[:, :, None, None]`` and ``unsqueeze`` reshapes)."""
    if len(widths) != 3:
        raise ValueError("senet_small expects exactly 3 stage widths")
    return SENetSmall(num_classes=num_classes, in_channels=in_channels,
                      widths=widths, reduction=reduction)
