"""Converters for elementwise arithmetic, logic, reductions, and shape / indexing ops.

Shape tensors stay int64 tensors on the CPU; converters that need their values read them with
``ints``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from neuralmerge.graph.ops import NodeContext, Tensor, ints, present, register, torch_dtype

# ---------------------------------------------------------------- elementwise


def _elementwise(op_type: str, fn) -> None:
    register(op_type)(lambda ctx, inputs: [fn(*inputs)])


def _divide(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # C-style integer division, as onnxruntime does


for _op, _fn in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _divide,
    "Exp": torch.exp, "Log": torch.log, "Neg": torch.neg, "Abs": torch.abs, "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Sign": torch.sign,
    "Sin": torch.sin, "Cos": torch.cos, "Round": torch.round,  # ONNX Round is half-to-even, like torch
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge, "Not": torch.logical_not, "And": torch.logical_and,
    "Or": torch.logical_or, "Xor": torch.logical_xor, "Identity": lambda x: x,
}.items():
    _elementwise(_op, _fn)


@register("Pow")
def power(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    base, exponent = inputs
    return [torch.pow(base, exponent).to(base.dtype)]  # ONNX keeps the base's type


@register("Mod")
def mod(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    a, b = inputs
    return [torch.fmod(a, b) if ctx.attrs.get("fmod", 0) else torch.remainder(a, b)]


def _variadic(op_type: str, fn) -> None:
    register(op_type)(lambda ctx, inputs: [functools.reduce(fn, inputs)])


_variadic("Min", torch.minimum)
_variadic("Max", torch.maximum)
_variadic("Sum", torch.add)


@register("Mean")
def mean(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    return [functools.reduce(torch.add, inputs) / len(inputs)]


@register("Where")
def where(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    condition, x, y = inputs
    return [torch.where(condition.bool(), x, y)]


@register("Cast")
def cast(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    return [inputs[0].to(torch_dtype(ctx.attrs["to"], f"Cast node '{ctx.name}'"))]


@register("CastLike")
def cast_like(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    return [inputs[0].to(inputs[1].dtype)]


# ---------------------------------------------------------------- reductions


def _reduce(op_type: str, fn) -> None:
    def convert(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
        x = inputs[0]
        axes_in = present(inputs, 1)
        axes = ints(axes_in) if axes_in is not None else ctx.attrs.get("axes", [])
        keepdims = bool(ctx.attrs.get("keepdims", 1))
        if not axes:
            if ctx.attrs.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, dim=tuple(axes), keepdim=keepdims)]

    register(op_type)(convert)


_reduce("ReduceMean", torch.mean)
_reduce("ReduceSum", torch.sum)
_reduce("ReduceMax", torch.amax)
_reduce("ReduceMin", torch.amin)


def _argreduce(fn):
    def convert(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
        x = inputs[0]
        axis = ctx.attrs.get("axis", 0)
        keepdims = bool(ctx.attrs.get("keepdims", 1))
        if ctx.attrs.get("select_last_index", 0):
            flipped = fn(x.flip(axis), dim=axis, keepdim=keepdims)
            return [x.shape[axis] - 1 - flipped]
        return [fn(x, dim=axis, keepdim=keepdims)]

    return convert


register("ArgMax")(_argreduce(torch.argmax))
register("ArgMin")(_argreduce(torch.argmin))


# ---------------------------------------------------------------- constants and shapes


@register("Constant")
def constant(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    attrs = ctx.attrs
    if "value" in attrs:
        return [attrs["value"]]
    if "value_float" in attrs:
        return [torch.tensor(attrs["value_float"], dtype=torch.float32)]
    if "value_floats" in attrs:
        return [torch.tensor(attrs["value_floats"], dtype=torch.float32)]
    if "value_int" in attrs:
        return [torch.tensor(attrs["value_int"], dtype=torch.int64)]
    if "value_ints" in attrs:
        return [torch.tensor(attrs["value_ints"], dtype=torch.int64)]
    raise ctx.unsupported(f"value attribute {sorted(attrs)}")


@register("ConstantOfShape")
def constant_of_shape(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    value = ctx.attrs.get("value", torch.zeros(1, dtype=torch.float32))
    return [torch.full(ints(inputs[0]), value.reshape(-1)[0].item(), dtype=value.dtype)]


@register("Shape")
def shape(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    dims = list(inputs[0].shape)[ctx.attrs.get("start", 0):ctx.attrs.get("end", None)]
    return [torch.tensor(dims, dtype=torch.int64)]


@register("Size")
def size(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    return [torch.tensor(inputs[0].numel(), dtype=torch.int64)]


@register("Range")
def arange(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    start, limit, delta = inputs
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)]


@register("Reshape")
def reshape(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x, target = inputs[0], ints(inputs[1])
    if not ctx.attrs.get("allowzero", 0):  # 0 copies the input's dimension
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return [x.reshape(target)]


@register("Flatten")
def flatten(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x = inputs[0]
    axis = ctx.attrs.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


@register("Transpose")
def transpose(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x = inputs[0]
    return [x.permute(ctx.attrs.get("perm", list(reversed(range(x.dim())))))]


def _axes(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> Optional[list[int]]:
    """``axes`` from input 1 (newer opsets) or the attribute (older ones); None when absent."""
    axes_in = present(inputs, 1)
    if axes_in is not None:
        return ints(axes_in)
    return ctx.attrs.get("axes")


@register("Squeeze")
def squeeze(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x = inputs[0]
    axes = _axes(ctx, inputs)
    if axes is None:
        return [x.squeeze()]
    return [x.squeeze(tuple(a % x.dim() for a in axes))]


@register("Unsqueeze")
def unsqueeze(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x, axes = inputs[0], _axes(ctx, inputs)
    out_rank = x.dim() + len(axes)
    for axis in sorted(a % out_rank for a in axes):
        x = x.unsqueeze(axis)
    return [x]


@register("Concat")
def concat(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    return [torch.cat(inputs, dim=ctx.attrs["axis"])]


@register("Split")
def split(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x = inputs[0]
    axis = ctx.attrs.get("axis", 0)
    split_in = present(inputs, 1)
    sizes = ints(split_in) if split_in is not None else ctx.attrs.get("split")
    if not sizes:  # equal parts; the last one is smaller when the size does not divide (opset 18)
        parts = ctx.attrs.get("num_outputs", len(ctx.output_names))
        sizes = math.ceil(x.shape[axis] / parts)
    return list(torch.split(x, sizes, dim=axis))


def _slice_axis(x: Tensor, axis: int, start: int, end: int, step: int) -> Tensor:
    size = x.shape[axis]
    if step > 0:
        start = min(max(start + size if start < 0 else start, 0), size)
        end = min(max(end + size if end < 0 else end, 0), size)
        return x.narrow(axis, start, max(end - start, 0))[(slice(None),) * axis + (slice(None, None, step),)]
    # negative steps: clamp to [-1, size - 1] as the ONNX spec says, then gather the positions
    start = min(max(start + size if start < 0 else start, -1), size - 1)
    end = min(max(end + size if end < 0 else end, -1), size - 1)
    return x.index_select(axis, torch.arange(start, end, step, device=x.device))


@register("Slice")
def slice_(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x = inputs[0]
    if ctx.opset < 10:
        starts, ends = ctx.attrs["starts"], ctx.attrs["ends"]
        axes = ctx.attrs.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = ints(inputs[1]), ints(inputs[2])
        axes_in, steps_in = present(inputs, 3), present(inputs, 4)
        axes = ints(axes_in) if axes_in is not None else list(range(len(starts)))
        steps = ints(steps_in) if steps_in is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        x = _slice_axis(x, axis % x.dim(), start, end, step)
    return [x]


@register("Gather")
def gather(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x, indices = inputs
    axis = ctx.attrs.get("axis", 0) % x.dim()
    size = x.shape[axis]
    flat = indices.reshape(-1).long()
    flat = torch.where(flat < 0, flat + size, flat).to(x.device)
    picked = x.index_select(axis, flat)
    return [picked.reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1:]))]


@register("Expand")
def expand(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    x = inputs[0]
    return [x.expand(torch.broadcast_shapes(x.shape, tuple(ints(inputs[1]))))]


@register("Tile")
def tile(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    return [inputs[0].repeat(ints(inputs[1]))]
