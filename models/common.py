"""Shared building blocks for the reference model zoo."""
from __future__ import annotations

from typing import Tuple, Union

import torch.nn as nn

_Size = Union[int, Tuple[int, int]]


def scale_channels(channels: int, width_mult: float) -> int:
    """Scale a channel count by ``width_mult`` (rounded, at least 1)."""
    return max(1, int(round(channels * width_mult)))


class ConvBNReLU(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU (or ReLU6 / no activation)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _Size = 1,
        stride: _Size = 1,
        padding: _Size = 0,
        groups: int = 1,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride,
            padding=padding, groups=groups, bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels)
        if activation == "relu":
            self.act = nn.ReLU()
        elif activation == "relu6":
            self.act = nn.ReLU6()
        elif activation in ("none", None):
            self.act = nn.Identity()
        else:
            raise ValueError(f"unknown activation {activation!r}")

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))
