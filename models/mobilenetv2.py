"""Small MobileNetV2 (inverted residuals with linear bottlenecks)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from .common import ConvBNReLU


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(in_channels, hidden, 1, activation="relu6"))
        layers += [
            ConvBNReLU(hidden, hidden, 3, stride=stride, padding=1, groups=hidden,
                       activation="relu6"),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:  # static (set at construction), fx-safe
            return x + self.conv(x)
        return self.conv(x)


# (expand_ratio t, out channels c, repeats n, first stride s)
_DEFAULT_CFG: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),   # expansion-1 block, 16 -> 16: residual add
    (6, 24, 2, 1),   # second block residual
    (6, 32, 3, 2),   # two residual blocks
    (6, 64, 2, 2),   # one residual block
    (6, 96, 1, 1),
)


class MobileNetV2Small(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, stem_channels: int = 16,
                 cfg: Sequence[Tuple[int, int, int, int]] = _DEFAULT_CFG,
                 last_channels: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        layers: List[nn.Module] = [ConvBNReLU(in_channels, stem_channels, 3, padding=1,
                                              activation="relu6")]
        ch = stem_channels
        for t, c, n, s in cfg:
            for i in range(n):
                layers.append(InvertedResidual(ch, c, s if i == 0 else 1, t))
                ch = c
        layers.append(ConvBNReLU(ch, last_channels, 1, activation="relu6"))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(last_channels, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(self.dropout(x))


def mobilenetv2_small(num_classes: int = 10, in_channels: int = 3, stem_channels: int = 16,
                      last_channels: int = 256, dropout: float = 0.0) -> MobileNetV2Small:
    """MobileNetV2 for 32x32 inputs: 9 inverted-residual blocks, 5 residual adds."""
    return MobileNetV2Small(num_classes=num_classes, in_channels=in_channels,
                            stem_channels=stem_channels, last_channels=last_channels,
                            dropout=dropout)
