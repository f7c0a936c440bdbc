"""A deliberately heterogeneous pair of small CNNs for exactness tests of the merge.

Model A: 3×40×40 input, 7×7 stride-2 conv, 5×5 conv, a residual 3×3 block (Add), a 1×1 conv,
global pooling and two fc layers. Model B: 1×28×28 input, 3×3 and 5×5 convs with depths that
r = 8 does not divide (6, 13), max pooling, two fc layers. Different input names and sizes.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class HeteroA(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 7, stride=2, padding=3)
        self.conv2 = nn.Conv2d(12, 20, 5, padding=2)
        self.res1 = nn.Conv2d(20, 20, 3, padding=1)
        self.res2 = nn.Conv2d(20, 20, 3, padding=1)
        self.proj = nn.Conv2d(20, 10, 1)
        self.fc1 = nn.Linear(10, 24)
        self.head = nn.Linear(24, 7)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(x + self.res2(torch.relu(self.res1(x))))
        x = torch.relu(self.proj(x)).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc1(x)))


class HeteroB(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 13, 5, padding=2)
        self.fc1 = nn.Linear(13 * 7 * 7, 30)
        self.head = nn.Linear(30, 5)

    def forward(self, img):
        x = torch.max_pool2d(torch.relu(self.conv1(img)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(torch.relu(self.fc1(x.flatten(1))))


def export(model: nn.Module, path: Path, shape: tuple, input_name: str, output_name: str, opset: int = 17) -> Path:
    model.eval()
    torch.onnx.export(model, torch.randn(*shape), str(path), input_names=[input_name], output_names=[output_name],
                      opset_version=opset, dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                      dynamo=False)
    return path


def hetero_pair(tmp_path: Path, seed: int = 0) -> tuple[Path, Path]:
    torch.manual_seed(seed)
    a = export(HeteroA(), tmp_path / "a.onnx", (1, 3, 40, 40), "image", "scores")
    b = export(HeteroB(), tmp_path / "b.onnx", (1, 1, 28, 28), "img", "logits", opset=13)
    return a, b
