"""Converters for layer ops: convolution, Gemm, normalisation, activations, pooling, Resize, Pad."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from neuralmerge.graph.ops import NodeContext, Tensor, ints, present, register

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _spatial_rank_ok(ctx: NodeContext, rank: int) -> None:
    if rank not in _CONV:
        raise ctx.unsupported(f"{rank}-D spatial input (1-D to 3-D are supported)")


def _torch_pad(pairs: list[tuple[int, int]]) -> list[int]:
    """Per-axis ``(begin, end)`` pads of the trailing axes -> F.pad's last-axis-first flat list."""
    flat: list[int] = []
    for begin, end in reversed(pairs):
        flat += [begin, end]
    return flat


def _pad_pairs(ctx: NodeContext, in_sizes: list[int], kernel: list[int], strides: list[int],
               dilations: list[int]) -> list[tuple[int, int]]:
    """Per-spatial-axis ``(begin, end)`` padding from ``auto_pad`` / ``pads`` (conv and pooling)."""
    auto_pad = ctx.attrs.get("auto_pad", "NOTSET")
    n = len(in_sizes)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pairs = []
        for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            pairs.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
        return pairs
    if auto_pad == "VALID":
        return [(0, 0)] * n
    pads = ctx.attrs.get("pads", [0] * (2 * n))
    return list(zip(pads[:n], pads[n:]))


# ---------------------------------------------------------------- convolution and dense layers

def _validate_conv(ctx: NodeContext) -> None:
    if ctx.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        raise ctx.unsupported(f"auto_pad '{ctx.attrs['auto_pad']}'")


@register("Conv", validate=_validate_conv)
def conv(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x, w, b = inputs[0], inputs[1], present(inputs, 2)
    rank = x.dim() - 2
    _spatial_rank_ok(ctx, rank)
    kernel = list(w.shape[2:])
    strides = ctx.attrs.get("strides", [1] * rank)
    dilations = ctx.attrs.get("dilations", [1] * rank)
    pairs = _pad_pairs(ctx, list(x.shape[2:]), kernel, strides, dilations)
    if all(begin == end for begin, end in pairs):
        padding = [begin for begin, _ in pairs]
    else:  # torch pads symmetrically only
        x = F.pad(x, _torch_pad(pairs))
        padding = [0] * rank
    return [_CONV[rank](x, w, b, strides, padding, dilations, ctx.attrs.get("group", 1))]


@register("ConvTranspose", validate=_validate_conv)
def conv_transpose(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x, w, b = inputs[0], inputs[1], present(inputs, 2)
    rank = x.dim() - 2
    _spatial_rank_ok(ctx, rank)
    in_sizes = list(x.shape[2:])
    kernel = list(w.shape[2:])
    strides = ctx.attrs.get("strides", [1] * rank)
    dilations = ctx.attrs.get("dilations", [1] * rank)
    out_pad = ctx.attrs.get("output_padding", [0] * rank)
    # the full, unpadded transposed convolution; ONNX pads then crop it (and output_padding extends it)
    y = _CONV_T[rank](x, w, None, strides, 0, 0, ctx.attrs.get("group", 1), dilations)
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(in_sizes, strides, kernel, dilations)]
    auto_pad = ctx.attrs.get("auto_pad", "NOTSET")
    out_shape = ctx.attrs.get("output_shape")
    if out_shape is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out_shape = [i * s for i, s in zip(in_sizes, strides)]
    if out_shape is not None:
        out_shape = out_shape[-rank:]
        pairs = []
        for f, op, o in zip(full, out_pad, out_shape):
            total = f + op - o
            half = total // 2
            # ONNX spec: SAME_UPPER puts the smaller half first, everything else the larger half
            pairs.append((half, total - half) if auto_pad == "SAME_UPPER" else (total - half, half))
    else:
        pads = ctx.attrs.get("pads", [0] * (2 * rank))
        pairs = list(zip(pads[:rank], pads[rank:]))
    # negative F.pad values crop; output_padding adds bias-only rows at the end
    y = F.pad(y, _torch_pad([(-begin, op - end) for (begin, end), op in zip(pairs, out_pad)]))
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * rank))
    return [y]


@register("Gemm")
def gemm(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    a, b, c = inputs[0], inputs[1], present(inputs, 2)
    if ctx.attrs.get("transA", 0):
        a = a.t()
    if ctx.attrs.get("transB", 0):
        y = F.linear(a, b)
    else:
        y = a @ b
    alpha, beta = ctx.attrs.get("alpha", 1.0), ctx.attrs.get("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c if beta == 1.0 else c * beta)
    return [y]


@register("MatMul")
def matmul(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    return [torch.matmul(inputs[0], inputs[1])]


def _validate_batchnorm(ctx: NodeContext) -> None:
    if ctx.attrs.get("training_mode", 0):
        raise ctx.unsupported("training_mode=1 (only the inference form is supported)")


@register("BatchNormalization", validate=_validate_batchnorm)
def batch_norm(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x, scale, bias, mean, var = inputs[:5]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    # written out rather than F.batch_norm so gradients also reach the running statistics
    gain = torch.rsqrt(var + ctx.attrs.get("epsilon", 1e-5)) * scale
    shift = bias - mean * gain
    return [torch.addcmul(shift.reshape(shape), x, gain.reshape(shape))]


@register("Dropout")
def dropout(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x = inputs[0]
    return [x, torch.ones_like(x, dtype=torch.bool)]


# ---------------------------------------------------------------- activations

def _unary(op_type: str, fn) -> None:
    register(op_type)(lambda ctx, inputs: [fn(inputs[0])])


_unary("Relu", torch.relu)
_unary("Sigmoid", torch.sigmoid)
_unary("Tanh", torch.tanh)
_unary("HardSwish", F.hardswish)
_unary("Erf", torch.erf)
_unary("Softsign", F.softsign)
_unary("Mish", F.mish)


@register("LeakyRelu")
def leaky_relu(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    return [F.leaky_relu(inputs[0], ctx.attrs.get("alpha", 0.01))]


@register("PRelu")
def prelu(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x, slope = inputs
    return [torch.where(x < 0, x * slope, x)]  # ONNX broadcasts the slope numpy-style, not per channel


@register("Elu")
def elu(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    return [F.elu(inputs[0], ctx.attrs.get("alpha", 1.0))]


@register("Selu")
def selu(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x = inputs[0]
    alpha = ctx.attrs.get("alpha", 1.67326319217681884765625)
    gamma = ctx.attrs.get("gamma", 1.05070102214813232421875)
    return [gamma * torch.where(x > 0, x, alpha * torch.expm1(x))]


@register("Softplus")
def softplus(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    return [F.softplus(inputs[0])]


@register("HardSigmoid")
def hard_sigmoid(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    alpha, beta = ctx.attrs.get("alpha", 0.2), ctx.attrs.get("beta", 0.5)
    return [torch.clamp(inputs[0] * alpha + beta, 0.0, 1.0)]


@register("Gelu")
def gelu(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    return [F.gelu(inputs[0], approximate=ctx.attrs.get("approximate", "none"))]


@register("Clip")
def clip(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    if ctx.opset < 11:
        low, high = ctx.attrs.get("min"), ctx.attrs.get("max")
    else:
        low, high = present(inputs, 1), present(inputs, 2)
    if low is None and high is None:
        return [inputs[0]]
    return [torch.clamp(inputs[0], low, high)]


def _softmax_like(fn):
    def convert(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
        x = inputs[0]
        if ctx.opset >= 13:
            return [fn(x, dim=ctx.attrs.get("axis", -1))]
        # before opset 13 the input is coerced to 2-D at `axis` (default 1) and normalised per row
        axis = ctx.attrs.get("axis", 1) % max(x.dim(), 1)
        rows = math.prod(x.shape[:axis])
        return [fn(x.reshape(rows, -1), dim=1).reshape(x.shape)]

    return convert


register("Softmax")(_softmax_like(torch.softmax))
register("LogSoftmax")(_softmax_like(torch.log_softmax))


# ---------------------------------------------------------------- pooling

def _validate_pool(ctx: NodeContext) -> None:
    _validate_conv(ctx)
    if ctx.op_type == "MaxPool" and len(ctx.output_names) > 1 and ctx.output_names[1]:
        raise ctx.unsupported("the Indices output")
    if ctx.op_type == "AveragePool" and any(d != 1 for d in ctx.attrs.get("dilations", [])):
        raise ctx.unsupported("dilations other than 1")


def _pool(ctx: NodeContext, x: Tensor, average: bool) -> Tensor:
    rank = x.dim() - 2
    _spatial_rank_ok(ctx, rank)
    in_sizes = list(x.shape[2:])
    kernel = ctx.attrs["kernel_shape"]
    strides = ctx.attrs.get("strides", [1] * rank)
    dilations = ctx.attrs.get("dilations", [1] * rank)
    pairs = _pad_pairs(ctx, in_sizes, kernel, strides, dilations)
    ceil_mode = bool(ctx.attrs.get("ceil_mode", 0))
    if not ceil_mode and all(b == e and 2 * b <= (k - 1) * d + 1 for (b, e), k, d in zip(pairs, kernel, dilations)):
        padding = [b for b, _ in pairs]  # the common case torch pools natively
        if not average:
            return _MAX_POOL[rank](x, kernel, strides, padding, dilations)
        count_pads = bool(ctx.attrs.get("count_include_pad", 0))
        return _AVG_POOL[rank](x, kernel, strides, padding, count_include_pad=count_pads)
    # Otherwise pad explicitly, with room for every ceil-mode window, and pool without padding: this
    # covers asymmetric pads and pads larger than torch allows. A ceil-mode window must start inside
    # the input or its begin padding (the rule of torch and onnxruntime).
    extras = []
    for size, k, s, d, (begin, end) in zip(in_sizes, kernel, strides, dilations, pairs):
        extent = (k - 1) * d + 1
        span = size + begin + end - extent
        out = (math.ceil(span / s) if ceil_mode else span // s) + 1
        if ceil_mode and (out - 1) * s >= size + begin:
            out -= 1
        extras.append(max(0, (out - 1) * s + extent - (size + begin + end)))
    full = _torch_pad([(begin, end + extra) for (begin, end), extra in zip(pairs, extras)])
    if not average:
        return _MAX_POOL[rank](F.pad(x, full, value=-math.inf), kernel, strides, 0, dilations)
    # average = window sum / number of counted cells; count by pooling a mask of the counted cells
    mask = torch.ones((1, 1, *in_sizes), dtype=x.dtype, device=x.device)
    if ctx.attrs.get("count_include_pad", 0):
        mask = F.pad(F.pad(mask, _torch_pad(pairs), value=1.0), _torch_pad([(0, extra) for extra in extras]))
    else:
        mask = F.pad(mask, full)
    pool = _AVG_POOL[rank]
    return pool(F.pad(x, full), kernel, strides) / pool(mask, kernel, strides)


@register("MaxPool", validate=_validate_pool)
def max_pool(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    return [_pool(ctx, inputs[0], average=False)]


@register("AveragePool", validate=_validate_pool)
def average_pool(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    return [_pool(ctx, inputs[0], average=True)]


@register("GlobalAveragePool")
def global_average_pool(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x = inputs[0]
    return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]


@register("GlobalMaxPool")
def global_max_pool(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x = inputs[0]
    return [x.amax(dim=tuple(range(2, x.dim())), keepdim=True)]


# ---------------------------------------------------------------- Resize / Upsample

_COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric")
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _validate_resize(ctx: NodeContext) -> None:
    mode = ctx.attrs.get("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear"):
        raise ctx.unsupported(f"mode '{mode}'")
    coordinate_mode = ctx.attrs.get("coordinate_transformation_mode", "half_pixel")
    if coordinate_mode not in _COORDINATE_MODES:
        raise ctx.unsupported(f"coordinate_transformation_mode '{coordinate_mode}'")
    if ctx.attrs.get("nearest_mode", "round_prefer_floor") not in _NEAREST_MODES:
        raise ctx.unsupported(f"nearest_mode '{ctx.attrs['nearest_mode']}'")
    if ctx.attrs.get("antialias", 0):
        raise ctx.unsupported("antialias=1")
    if ctx.attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise ctx.unsupported(f"keep_aspect_ratio_policy '{ctx.attrs['keep_aspect_ratio_policy']}'")


def _source_coordinates(mode: str, out_len: int, in_len: int, scale: float) -> Tensor:
    """Input coordinate of every output position along one axis, in float32 as onnxruntime does."""
    out = torch.arange(out_len, dtype=torch.float32)
    scale_t = torch.tensor(scale, dtype=torch.float32)
    if mode == "asymmetric":
        return out / scale_t
    if mode == "align_corners":
        return out * ((in_len - 1) / (out_len - 1)) if out_len > 1 else torch.zeros(out_len)
    if mode == "pytorch_half_pixel" and out_len == 1:
        return torch.zeros(1)
    coords = (out + 0.5) / scale_t - 0.5
    if mode == "half_pixel_symmetric":
        adjustment = out_len / (in_len * scale)
        coords = coords + (in_len / 2) * (1 - adjustment)
    return coords


def _nearest_index(coords: Tensor, nearest_mode: str, in_len: int) -> Tensor:
    floor = torch.floor(coords)
    if nearest_mode == "floor":
        index = floor
    elif nearest_mode == "ceil":
        index = torch.ceil(coords)
    else:  # ties go to floor or ceil explicitly; torch.round would round them to even
        tie = coords == floor + 0.5
        index = torch.where(tie, floor if nearest_mode == "round_prefer_floor" else floor + 1, torch.round(coords))
    return index.long().clamp(0, in_len - 1)


def _resample_axis(x: Tensor, axis: int, out_len: int, scale: float, linear: bool, coordinate_mode: str,
                   nearest_mode: str) -> Tensor:
    in_len = x.shape[axis]
    coords = _source_coordinates(coordinate_mode, out_len, in_len, scale)
    if not linear:
        return x.index_select(axis, _nearest_index(coords, nearest_mode, in_len).to(x.device))
    coords = coords.clamp(0, in_len - 1)
    low = coords.floor().long()
    high = (low + 1).clamp(max=in_len - 1)
    shape = [1] * x.dim()
    shape[axis] = out_len
    weight = (coords - low).reshape(shape).to(device=x.device, dtype=x.dtype)
    x_low = x.index_select(axis, low.to(x.device))
    x_high = x.index_select(axis, high.to(x.device))
    return x_low + (x_high - x_low) * weight


def _resample(x: Tensor, out_sizes: list[int], scales: list[float], linear: bool, coordinate_mode: str,
              nearest_mode: str) -> Tensor:
    # interpolation is separable: resample one axis at a time
    for axis, (out_len, scale) in enumerate(zip(out_sizes, scales)):
        if out_len != x.shape[axis] or scale != 1.0:
            x = _resample_axis(x, axis, out_len, scale, linear, coordinate_mode, nearest_mode)
    return x


@register("Resize", validate=_validate_resize)
def resize(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x = inputs[0]
    rank = x.dim()
    if ctx.opset < 11:  # opset 10: Resize(X, scales)
        scales_in, sizes_in = present(inputs, 1), None
    else:
        scales_in, sizes_in = present(inputs, 2), present(inputs, 3)
    axes = [a % rank for a in ctx.attrs.get("axes", range(rank))]
    in_sizes = list(x.shape)
    out_sizes, scales = list(in_sizes), [1.0] * rank
    for i, axis in enumerate(axes):
        if sizes_in is not None:
            out_sizes[axis] = ints(sizes_in)[i]
            scales[axis] = float(torch.tensor(out_sizes[axis] / in_sizes[axis], dtype=torch.float32))
        else:
            scales[axis] = float(scales_in[i])
            out_sizes[axis] = int(math.floor(in_sizes[axis] * scales[axis]))
    coordinate_mode = ctx.attrs.get("coordinate_transformation_mode", "half_pixel")
    if ctx.opset < 11:
        coordinate_mode = "asymmetric"
    nearest_mode = ctx.attrs.get("nearest_mode", "round_prefer_floor")
    linear = ctx.attrs.get("mode", "nearest") != "nearest"
    return [_resample(x, out_sizes, scales, linear, coordinate_mode, nearest_mode)]


def _validate_upsample(ctx: NodeContext) -> None:
    if ctx.attrs.get("mode", "nearest") not in ("nearest", "linear", "bilinear"):
        raise ctx.unsupported(f"mode '{ctx.attrs['mode']}'")


@register("Upsample", validate=_validate_upsample)
def upsample(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x = inputs[0]
    scales = ctx.attrs["scales"] if "scales" in ctx.attrs else [float(s) for s in inputs[1].tolist()]
    out_sizes = [int(math.floor(n * s)) for n, s in zip(x.shape, scales)]
    linear = ctx.attrs.get("mode", "nearest") != "nearest"
    # onnxruntime's Upsample: asymmetric coordinates, nearest rounds down (up when shrinking)
    y = x
    for axis, (out_len, scale) in enumerate(zip(out_sizes, scales)):
        if out_len != x.shape[axis] or scale != 1.0:
            y = _resample_axis(y, axis, out_len, scale, linear, "asymmetric", "floor" if scale >= 1 else "ceil")
    return [y]


# ---------------------------------------------------------------- Pad

def _validate_pad(ctx: NodeContext) -> None:
    if ctx.attrs.get("mode", "constant") not in ("constant", "reflect", "edge", "wrap"):
        raise ctx.unsupported(f"mode '{ctx.attrs['mode']}'")


def _source_index(mode: str, begin: int, end: int, size: int) -> Tensor:
    """For reflect / edge / wrap padding: which input position feeds each output position."""
    index = torch.arange(-begin, size + end)
    if mode == "edge":
        return index.clamp(0, size - 1)
    if mode == "wrap":
        return index % size
    period = 2 * (size - 1)  # reflect without repeating the edge
    index = index.abs() % period if period else torch.zeros_like(index)
    return torch.where(index >= size, period - index, index)


@register("Pad", validate=_validate_pad)
def pad(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x = inputs[0]
    rank = x.dim()
    if ctx.opset < 11:
        pads, value = ctx.attrs["pads"], ctx.attrs.get("value", 0.0)
        axes = list(range(rank))
    else:
        pads = ints(inputs[1])
        constant = present(inputs, 2)
        value = 0.0 if constant is None else constant.item()
        axes_in = present(inputs, 3)
        axes = [a % rank for a in ints(axes_in)] if axes_in is not None else list(range(rank))
    pairs = [(0, 0)] * rank
    for i, axis in enumerate(axes):
        pairs[axis] = (pads[i], pads[i + len(axes)])
    mode = ctx.attrs.get("mode", "constant")
    if mode == "constant":
        return [F.pad(x, _torch_pad(pairs), value=value)]
    for axis, (begin, end) in enumerate(pairs):
        if begin or end:
            x = x.index_select(axis, _source_index(mode, begin, end, x.shape[axis]).to(x.device))
    return [x]
