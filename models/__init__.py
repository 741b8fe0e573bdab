"""Reference model zoo for graphgrow.

Every model is plain ``torch.nn`` with random initialisation, symbolically
traceable with ``torch.fx.symbolic_trace`` and exportable with
``torch.onnx.export(..., dynamo=False, opset_version=17)``.

``ZOO`` maps a name to a :class:`ZooEntry` (builder, input shape with batch 1,
description); :func:`example_inputs` returns seeded random inputs for a name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn

from .common import ConvBNReLU, scale_channels
from .densenet import DenseNetSmall, densenet_small
from .inception import (
    PAPER_DEEPER_AFTER, PAPER_DEEPER_KERNEL, InceptionBN, InceptionModule, ReductionModule, inception_bn,
    inception_bn_narrow,
)
from .lenet5 import LeNet, lenet
from .mobilenetv2 import MobileNetV2Small, mobilenetv2_small
from .resnet import ResNetSmall, resnet_small
from .resnext import ResNeXtSmall, grouped_resnext_small, resnext_small
from .senet import SENetSmall, senet_small
from .shufflenet import ShuffleNetSmall, channel_shuffle, shufflenet_small
from .transformer import RMSNorm, TinyLM, TinyViT, tiny_lm, tiny_vit


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], nn.Module]
    input_shape: Tuple[int, ...]
    description: str
    vocab: int = 0  # > 0: the input is token ids below it
    kind: str = "cnn"  # or "transformer"


def _entries() -> Dict[str, ZooEntry]:
    cifar = (1, 3, 32, 32)
    items = [
        ZooEntry("inception_bn", lambda: inception_bn(),
                 cifar, "BN-Inception (7 Inception + 2 reduction modules), width_mult=1.0"),
        ZooEntry("inception_bn_narrow", lambda: inception_bn(width_mult=0.55),
                 cifar, "Net2Net narrow teacher: BN-Inception with width_mult=0.55 "
                        "(~30% of conv parameters)"),
        ZooEntry("resnet_small", lambda: resnet_small(),
                 cifar, "CIFAR ResNet, 3 stages 16/32/64 x 2 BasicBlocks, projection shortcuts"),
        ZooEntry("densenet_small", lambda: densenet_small(),
                 cifar, "DenseNet-BC, growth 12, 3 dense blocks x 4 layers, transitions"),
        ZooEntry("mobilenetv2_small", lambda: mobilenetv2_small(),
                 cifar, "MobileNetV2 inverted residuals (depthwise convs, ReLU6, 5 residual adds)"),
        ZooEntry("senet_small", lambda: senet_small(),
                 cifar, "SE-ResNet with 1x1-conv SE and Linear SE (index / unsqueeze reshape)"),
        ZooEntry("lenet", lambda: lenet(),
                 (1, 1, 28, 28), "LeNet-5 for 1x28x28 input"),
        ZooEntry("shufflenet_small", lambda: shufflenet_small(),
                 cifar, "ShuffleNetV2 units: chunk(2) split, concat, size()-based channel shuffle"),
        ZooEntry("resnext_small", lambda: grouped_resnext_small(),
                 cifar, "ResNeXt bottlenecks with grouped (groups=8) 3x3 convs, residual adds"),
        ZooEntry("tiny_lm", lambda: tiny_lm(),
                 (1, 32), "decoder LM: pre-RMSNorm, rotary, GQA 4/2 heads, SwiGLU, tied embeddings", vocab=256,
                 kind="transformer"),
        ZooEntry("tiny_vit", lambda: tiny_vit(),
                 cifar, "ViT: 8x8 patches, class token, pre-LayerNorm, 4 blocks x 4 heads, fused attention",
                 kind="transformer"),
    ]
    return {e.name: e for e in items}


ZOO: Dict[str, ZooEntry] = _entries()


def example_inputs(name: str, batch: int = 2, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """Seeded random inputs for ``ZOO[name]`` with batch size ``batch``."""
    entry = ZOO[name]
    g = torch.Generator().manual_seed(seed)
    shape = (batch,) + tuple(entry.input_shape[1:])
    if entry.vocab:
        return (torch.randint(0, entry.vocab, shape, generator=g),)
    return (torch.randn(shape, generator=g),)


__all__ = [
    "ZOO", "ZooEntry", "example_inputs", "PAPER_DEEPER_AFTER", "PAPER_DEEPER_KERNEL",
    "inception_bn", "inception_bn_narrow", "resnet_small", "densenet_small",
    "mobilenetv2_small", "senet_small", "lenet", "shufflenet_small",
    "grouped_resnext_small", "resnext_small",
    "InceptionBN", "InceptionModule", "ReductionModule", "ResNetSmall", "DenseNetSmall",
    "MobileNetV2Small", "SENetSmall", "LeNet", "ShuffleNetSmall", "ResNeXtSmall",
    "ConvBNReLU", "scale_channels", "channel_shuffle", "TinyLM", "TinyViT", "RMSNorm", "tiny_lm", "tiny_vit",
]
