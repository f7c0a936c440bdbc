"""Converters for the ``ai.neuralmerge`` E-layer functions (docs/format.md).

Each call becomes an ``EConv2d`` / ``ELinear`` built once from the call's constant inputs; the
codebook and bias are the importer's Parameters themselves, so every layer coded by one codebook
shares one Parameter.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from neuralmerge.encode.modules import EConv2d, ELinear
from neuralmerge.errors import ModelLoadError
from neuralmerge.graph.ops import NEURALMERGE_DOMAIN, ConstantStore, NodeContext, Tensor, register

_INPUTS = ("X", "codebook", "codes", "offsets", "depth", "B")


def _call_inputs(ctx: NodeContext, store: ConstantStore) -> tuple[nn.Parameter, Tensor, Tensor, int, nn.Parameter]:
    if len(ctx.input_names) != len(_INPUTS) or not all(ctx.input_names):
        raise ModelLoadError(f"{ctx.op_type} node '{ctx.name}' must have the inputs {', '.join(_INPUTS)}")
    _, codebook, codes, offsets, depth, bias = ctx.input_names
    return (store.parameter(codebook), store.constant(codes), store.constant(offsets),
            int(store.constant(depth).reshape(-1)[0]), store.parameter(bias))


def _build_econv(ctx: NodeContext, store: ConstantStore) -> nn.Module:
    missing = [a for a in ("strides", "pads", "dilations", "group") if a not in ctx.attrs]
    if missing:
        raise ModelLoadError(f"EConv node '{ctx.name}' lacks the attributes {', '.join(missing)}")
    codebook, codes, offsets, depth, bias = _call_inputs(ctx, store)
    return EConv2d(codebook, codes, offsets, depth, bias, strides=ctx.attrs["strides"], pads=ctx.attrs["pads"],
                   dilations=ctx.attrs["dilations"], group=ctx.attrs["group"])


def _build_egemm(ctx: NodeContext, store: ConstantStore) -> nn.Module:
    return ELinear(*_call_inputs(ctx, store))


@register("EConv", domain=NEURALMERGE_DOMAIN, build=_build_econv)
@register("EGemm", domain=NEURALMERGE_DOMAIN, build=_build_egemm)
def e_layer(ctx: NodeContext, inputs: list[Optional[Tensor]]) -> list[Tensor]:
    return [ctx.module(inputs[0])]
