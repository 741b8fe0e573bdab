"""Small DenseNet-BC (bottleneck dense layers, compressing transitions)."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv-BN-ReLU-3x3 conv on the concatenation of all inputs."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        inter = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, inter, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(inter)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(inter, growth_rate, 3, padding=1, bias=False)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.Module):
    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size)
            for i in range(num_layers)
        )
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2, stride=2)

    def forward(self, x):
        return self.pool(self.conv(self.relu(self.norm(x))))


class DenseNetSmall(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        growth_rate: int = 12,
        block_config: Sequence[int] = (4, 4, 4),
        bn_size: int = 4,
        compression: float = 0.5,
    ) -> None:
        super().__init__()
        ch = 2 * growth_rate
        self.conv0 = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        blocks: List[nn.Module] = []
        for i, n in enumerate(block_config):
            block = DenseBlock(n, ch, growth_rate, bn_size)
            blocks.append(block)
            ch = block.out_channels
            if i != len(block_config) - 1:
                out = max(1, int(ch * compression))
                blocks.append(Transition(ch, out))
                ch = out
        self.features = nn.Sequential(*blocks)
        self.norm_final = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)

    def forward(self, x):
        x = self.conv0(x)
        x = self.features(x)
        x = self.relu(self.norm_final(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def densenet_small(num_classes: int = 10, in_channels: int = 3, growth_rate: int = 12,
                   block_config: Sequence[int] = (4, 4, 4), bn_size: int = 4,
                   compression: float = 0.5) -> DenseNetSmall:
    """DenseNet-BC with 3 dense blocks of 4 layers, growth rate 12."""
    return DenseNetSmall(num_classes=num_classes, in_channels=in_channels,
                         growth_rate=growth_rate, block_config=block_config,
                         bn_size=bn_size, compression=compression)
