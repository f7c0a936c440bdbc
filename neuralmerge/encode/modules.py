"""Differentiable E-layers for calibration (torch).

Codes are fixed integer buffers; the codebook is a ``torch.nn.Parameter`` that several layers
(of several models) may share. Decoding is a gather, so the gradient that reaches a codebook
row is the sum over every weight slot that uses it (NeuralMerger eq. 11).

Conventions (docs/format.md): a codebook is ``[K, r]`` with the codewords of all segments
stacked; segment ``v`` of a layer uses rows ``offsets[v] .. offsets[v] + C_v``. Conv codes are
``[p, kh, kw, rho]``, FC codes ``[n_out, rho]``; decoded vectors are cut back to ``depth``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .int8_table import econv_int8, elinear_int8


def decode_weight(codebook: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor, depth: int) -> torch.Tensor:
    """Gather codewords: codes ``[..., rho]`` -> weights ``[..., depth]`` (float32)."""
    idx = codes.long() + offsets.long()
    # index_select, not codebook[idx]: the latter's backward (index_put_ with accumulation) sums
    # in an order that varies between runs on several threads, so calibration was not
    # reproducible; index_select's backward (index_add_) is, and ran 2.4x faster on a 2-core test.
    vec = codebook.float().index_select(0, idx.reshape(-1)).reshape(*idx.shape, codebook.shape[1])  # [..., rho, r]
    return vec.reshape(*vec.shape[:-2], -1)[..., :depth]


class _ELayer(nn.Module):
    """What every E-layer holds: a (shared) codebook, fixed codes and offsets, the depth, a bias.

    ``int8_peak`` switches the forward pass to the native runtime's int8 table (int8_table.py):
    None computes in float (the exact path); a number is the calibrated largest |input| the
    int8 runtime will use, 0 each input's own range.
    """

    def __init__(self, codebook: nn.Parameter, codes: torch.Tensor, offsets: torch.Tensor, depth: int,
                 bias: nn.Parameter):
        super().__init__()
        self.codebook = codebook
        self.bias = bias
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("offsets", offsets.long(), persistent=False)
        self.depth = int(depth)
        self.int8_peak: float | None = None

    def decoded(self) -> torch.Tensor:
        return decode_weight(self.codebook, self.codes, self.offsets, self.depth)


class EConv2d(_ELayer):
    """Jointly-encoded 2-D convolution (ONNX ``ai.neuralmerge::EConv``).

    ``pads`` follows ONNX: ``[top, left, bottom, right]``.
    """

    def __init__(self, codebook: nn.Parameter, codes: torch.Tensor, offsets: torch.Tensor, depth: int,
                 bias: nn.Parameter, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1):
        super().__init__(codebook, codes, offsets, depth, bias)
        self.strides = tuple(int(s) for s in strides)
        self.pads = tuple(int(p) for p in pads)
        self.dilations = tuple(int(d) for d in dilations)
        self.group = int(group)

    def weight(self) -> torch.Tensor:
        """Decoded dense weight ``[p, depth, kh, kw]``."""
        return self.decoded().permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_peak is not None:
            return econv_int8(self.codebook, self.codes, self.offsets, self.depth, self.bias, x, strides=self.strides,
                              pads=self.pads, dilations=self.dilations, group=self.group, peak=self.int8_peak)
        top, left, bottom, right = self.pads
        if top == bottom and left == right:
            padding = (top, left)
        else:  # torch pads symmetrically only: pad explicitly for asymmetric ONNX pads
            x = F.pad(x, (left, right, top, bottom))
            padding = (0, 0)
        return F.conv2d(x, self.weight(), self.bias, self.strides, padding, self.dilations, self.group)


class ELinear(_ELayer):
    """Jointly-encoded fully-connected layer (ONNX ``ai.neuralmerge::EGemm``): ``y = x W^T + b``."""

    def weight(self) -> torch.Tensor:
        """Decoded dense weight ``[n_out, depth]``."""
        return self.decoded()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_peak is not None:
            rows = x.reshape(-1, x.shape[-1])
            y = elinear_int8(self.codebook, self.codes, self.offsets, self.depth, self.bias, rows, peak=self.int8_peak)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return torch.matmul(x, self.weight().t()) + self.bias
