"""Small CNN architectures the project trains itself (tests, demo, benchmarks, students).

Nothing here downloads weights: every model is trained from scratch on offline data.
"""
from __future__ import annotations

import torch
from torch import nn


class LeNet(nn.Module):
    """The NeuralMerger paper's LeNet (§4.1): conv 32@5×5 → pool → conv 64@5×5 → pool → fc 1024 → head.

    Convs are padded ("same"), so a 32×32 input gives 8×8×64 = 4096 features before fc1.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 64 * (image_size // 4) ** 2
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, 1024), nn.ReLU(), nn.Linear(1024, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """A bias-free "same"-padded conv followed by BatchNorm."""
    return [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels)]


class SqueezeExcite(nn.Module):
    """Channel attention: global pool → 1×1 reduce → ReLU → 1×1 expand → HardSigmoid gate."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, reduced, 1), nn.ReLU(),
                                  nn.Conv2d(reduced, channels, 1), nn.Hardsigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1×1 expand → depthwise 3×3 → squeeze-excite → 1×1 project (+ skip)."""

    def __init__(self, in_channels: int, expanded: int, out_channels: int, stride: int, use_se: bool):
        super().__init__()
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers += [*_conv_bn(in_channels, expanded, 1), nn.Hardswish()]
        layers += [*_conv_bn(expanded, expanded, 3, stride, groups=expanded), nn.Hardswish()]
        if use_se:
            layers.append(SqueezeExcite(expanded, max(8, expanded // 4)))
        layers += _conv_bn(expanded, out_channels, 1)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetStyle(nn.Module):
    """A small MobileNetV3-like network (depthwise separable convs, SE, HardSwish, residual adds)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_channels, 16, 3, 2), nn.Hardswish(),
            InvertedResidual(16, 16, 16, 1, use_se=True),
            InvertedResidual(16, 64, 24, 2, use_se=False),
            InvertedResidual(24, 72, 24, 1, use_se=True),
            InvertedResidual(24, 96, 40, 2, use_se=True),
            *_conv_bn(40, 160, 1), nn.Hardswish(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(160, 128), nn.Hardswish(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class ConvBnSiLU(nn.Module):
    """The YOLO "Conv": conv → BatchNorm → SiLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1):
        super().__init__()
        self.block = nn.Sequential(*_conv_bn(in_channels, out_channels, kernel, stride), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Bottleneck(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.cv1 = ConvBnSiLU(channels, channels, 3)
        self.cv2 = ConvBnSiLU(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8's C2f: 1×1 conv, split in two halves, chain bottlenecks on one, concat every stage."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int = 1):
        super().__init__()
        self.hidden = out_channels // 2
        self.cv1 = ConvBnSiLU(in_channels, 2 * self.hidden)
        self.blocks = nn.ModuleList(Bottleneck(self.hidden) for _ in range(blocks))
        self.cv2 = ConvBnSiLU((2 + blocks) * self.hidden, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).split(self.hidden, dim=1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


class YoloStyle(nn.Module):
    """A tiny YOLOv8-like detector: stride-8 and stride-16 features, a nearest ×2 upsample of the
    deeper one concatenated with the shallower one, and a 1×1 head.

    Returns ``[N, 5 + num_classes, H/8, W/8]`` (box 4, objectness 1, class scores per cell).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(ConvBnSiLU(in_channels, 16, 3, 2), ConvBnSiLU(16, 32, 3, 2))
        self.stage8 = nn.Sequential(ConvBnSiLU(32, 32, 3, 2), C2f(32, 32))
        self.stage16 = nn.Sequential(ConvBnSiLU(32, 64, 3, 2), C2f(64, 64))
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.neck = C2f(96, 48)
        self.head = nn.Conv2d(48, 5 + num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p8 = self.stage8(self.stem(x))
        p16 = self.stage16(p8)
        return self.head(self.neck(torch.cat([self.upsample(p16), p8], dim=1)))


class VGGStyle(nn.Module):
    """A small VGG: 3×3 conv stacks (BatchNorm optional) and max pools, two fc layers and a head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 batch_norm: bool = True, widths: tuple = (16, "M", 32, "M", 64, 64, "M")):
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for width in widths:
            if width == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                conv = nn.Conv2d(channels, width, 3, padding=1, bias=not batch_norm)
                layers += [conv, nn.BatchNorm2d(width), nn.ReLU()] if batch_norm else [conv, nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * size * size, 128), nn.ReLU(), nn.Dropout(),
            nn.Linear(128, 128), nn.ReLU(), nn.Dropout(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 conv+BN, identity or strided 1×1 conv+BN shortcut, add, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(in_channels, out_channels, 3, stride), nn.ReLU(),
                                  *_conv_bn(out_channels, out_channels, 3))
        self.shortcut = (nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride))
                         if stride != 1 or in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNetStyle(nn.Module):
    """A small ResNet: conv stem + padded 3×3 max pool, three stages of BasicBlocks, global pool, head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple = (16, 32, 64),
                 blocks_per_stage: int = 1):
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(in_channels, widths[0], 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        channels = widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, width, stride))
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.features(x))
        return self.head(features.reshape(features.shape[0], -1))  # exports as a Shape → Reshape subgraph
