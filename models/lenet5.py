"""LeNet-5 style network."""
from __future__ import annotations

import torch
import torch.nn as nn


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        spatial = ((input_size - 4) // 2 - 4) // 2
        if spatial < 1:
            raise ValueError(f"input_size {input_size} too small for LeNet")
        self.fc1 = nn.Linear(16 * spatial * spatial, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


def lenet(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> LeNet:
    """LeNet-5 for 1x28x28 (default) or e.g. ``lenet(in_channels=3, input_size=32)``."""
    return LeNet(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
