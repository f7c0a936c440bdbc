"""Mergeable layers of a normalised ONNX graph.

A mergeable layer is a 2-D Conv or a Gemm/MatMul whose weight is a constant initializer.
Weights are returned in the canonical layouts of docs/format.md: conv ``[p, d, kh, kw]`` (OIHW),
fc ``[n_out, n_in]`` (Gemm ``alpha``/``transB`` and MatMul's ``[n_in, n_out]`` undone).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from neuralmerge.errors import NeuralMergeError


@dataclass(eq=False)  # identity: comparing fields would compare weight arrays
class Layer:
    model: int                      # index of the source model
    node: str                       # node name in the normalised source graph
    op_type: str                    # "Conv", "Gemm" or "MatMul"
    kind: str                       # "conv" or "fc"
    weight: np.ndarray              # canonical layout, float32
    bias: np.ndarray | None         # [p] / [n_out], float32 (Gemm beta folded), or None
    weight_name: str                # initializer holding the weight in the source graph
    bias_name: str | None           # initializer holding the bias (None if absent or not constant)
    attrs: dict = field(default_factory=dict)  # conv: strides, pads [t, l, b, r], dilations, group
    is_head: bool = False           # no other mergeable layer is downstream (classification head)

    @property
    def depth(self) -> int:
        """Length of one 1×1 kernel vector: C_in/group for conv, n_in for fc."""
        return int(self.weight.shape[1])

    @property
    def params(self) -> int:
        return int(self.weight.size + (0 if self.bias is None else self.bias.size))

    @property
    def shape(self) -> tuple:
        return tuple(int(s) for s in self.weight.shape)


_CONV_DEFAULTS = {"strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1}


def find_layers(model: onnx.ModelProto, model_index: int) -> list[Layer]:
    """Mergeable layers of a normalised graph, in topological order, with canonical float32 weights.

    Mergeable: 2-D Conv with a 4-D weight initializer; Gemm (``transA = 0``) or MatMul whose weight
    is a 2-D float initializer. Gemm ``alpha``/``beta`` are folded into weight/bias; ``transB = 0``
    and MatMul ``[n_in, n_out]`` weights are transposed to ``[n_out, n_in]``. A MatMul whose only
    consumer is an Add of a 1-D constant of size ``n_out`` gets that constant as its bias.
    A layer whose bias is a non-constant tensor (or not a per-output vector) is not mergeable.
    Raises ``NeuralMergeError`` if a weight or bias holds NaN/Inf.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}

    def array(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    layers = []
    for node in graph.node:  # ONNX requires graph.node to be topologically sorted
        if node.domain not in ("", "ai.onnx"):
            layer = None
        elif node.op_type == "Conv":
            layer = _conv_layer(node, model_index, array)
        elif node.op_type == "Gemm":
            layer = _gemm_layer(node, model_index, array)
        elif node.op_type == "MatMul":
            layer = _matmul_layer(node, model_index, array, consumers, graph_outputs)
        else:
            layer = None
        if layer is not None:
            _check_finite(layer)
            layers.append(layer)

    mergeable = {layer.node for layer in layers}
    reaches = _reaches_mergeable(graph, consumers, mergeable)
    for layer in layers:
        layer.is_head = not reaches[layer.node]
    return layers


def _is_float(a: np.ndarray | None) -> bool:
    return a is not None and np.issubdtype(a.dtype, np.floating)


def _conv_layer(node: onnx.NodeProto, model_index: int, array) -> Layer | None:
    weight = array(node.input[1]) if len(node.input) > 1 else None
    if not _is_float(weight) or weight.ndim != 4:
        return None
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    bias = array(bias_name) if bias_name else None
    if bias_name and (not _is_float(bias) or bias.size != weight.shape[0]):
        return None
    attrs = {k: (list(v) if isinstance(v, list) else v) for k, v in _CONV_DEFAULTS.items()}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if attr.name == "auto_pad":
            if value not in (b"NOTSET", b"VALID"):  # VALID == zero pads; SAME_* needs shapes
                raise NeuralMergeError(f"model {model_index}: Conv node '{node.name}' still has "
                                       f"auto_pad={value.decode()} (graph was not normalised)")
        elif attr.name in attrs:
            attrs[attr.name] = [int(x) for x in value] if isinstance(value, list) else int(value)
    return Layer(model=model_index, node=node.name, op_type="Conv", kind="conv",
                 weight=weight.astype(np.float32), bias=None if bias is None else bias.reshape(-1).astype(np.float32),
                 weight_name=node.input[1], bias_name=bias_name, attrs=attrs)


def _gemm_layer(node: onnx.NodeProto, model_index: int, array) -> Layer | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    weight = array(node.input[1])
    if attrs.get("transA", 0) or not _is_float(weight) or weight.ndim != 2:
        return None
    weight = weight.astype(np.float32)
    if not attrs.get("transB", 0):
        weight = weight.T
    n_out = weight.shape[0]
    weight = np.ascontiguousarray(weight * np.float32(attrs.get("alpha", 1.0)))
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    bias = None
    if bias_name:
        c = array(bias_name)
        # EGemm adds a per-output vector: C must broadcast along the batch axis only
        if not _is_float(c) or c.size not in (1, n_out) or (c.ndim == 2 and c.shape[0] != 1):
            return None
        bias = np.broadcast_to(c.reshape(-1), (n_out,)).astype(np.float32) * np.float32(attrs.get("beta", 1.0))
    return Layer(model=model_index, node=node.name, op_type="Gemm", kind="fc", weight=weight, bias=bias,
                 weight_name=node.input[1], bias_name=bias_name)


def _matmul_layer(node: onnx.NodeProto, model_index: int, array, consumers, graph_outputs) -> Layer | None:
    weight = array(node.input[1])
    if not _is_float(weight) or weight.ndim != 2:
        return None
    weight = np.ascontiguousarray(weight.astype(np.float32).T)
    bias_name, bias = None, None
    users = consumers.get(node.output[0], [])
    if len(users) == 1 and users[0].op_type == "Add" and node.output[0] not in graph_outputs:
        other = [name for name in users[0].input if name != node.output[0]]
        c = array(other[0]) if len(other) == 1 else None
        if _is_float(c) and c.ndim == 1 and c.size == weight.shape[0]:
            bias_name, bias = other[0], c.astype(np.float32)
    return Layer(model=model_index, node=node.name, op_type="MatMul", kind="fc", weight=weight, bias=bias,
                 weight_name=node.input[1], bias_name=bias_name)


def _check_finite(layer: Layer) -> None:
    for what, values in (("weight", layer.weight), ("bias", layer.bias)):
        if values is not None and not np.isfinite(values).all():
            raise NeuralMergeError(f"model {layer.model}: node '{layer.node}' has NaN/Inf in its {what}")


def _reaches_mergeable(graph: onnx.GraphProto, consumers, mergeable: set[str]) -> dict[str, bool]:
    """For every node: is a mergeable node strictly downstream of it? (reverse topological sweep)."""
    reaches: dict[str, bool] = {}
    for node in reversed(graph.node):
        reaches[node.name] = any(user.name in mergeable or reaches.get(user.name, False)
                                 for out in node.output for user in consumers.get(out, []))
    return reaches
