"""The ``ai.neuralmerge`` E-layer functions (docs/format.md).

Each body decodes the weight from codebook and codes with standard ops, so stock ONNX Runtime
inlines the call and constant-folds the decode into a dense Conv/Gemm weight.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

DOMAIN = "ai.neuralmerge"
VERSION = 1
CONV_ATTRS = ("strides", "pads", "dilations", "group")


def _ref_attr(name: str, attr_type: int) -> onnx.AttributeProto:
    """An attribute of a body node that forwards the function call's attribute ``name``."""
    attr = onnx.AttributeProto()
    attr.name = name
    attr.ref_attr_name = name
    attr.type = attr_type
    return attr


def _decode_nodes(flat_shape: list[int], depth_axis: int) -> list[onnx.NodeProto]:
    """codes + offsets -> gathered codewords -> flat [..., rho*r] -> cut to ``depth`` -> ``w``."""
    const = lambda name, values: helper.make_node(  # noqa: E731 - tiny local factory
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
    return [
        helper.make_node("Cast", ["codes"], ["codes64"], to=TensorProto.INT64),
        helper.make_node("Add", ["codes64", "offsets"], ["idx"]),
        helper.make_node("Cast", ["codebook"], ["codebook32"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["codebook32", "idx"], ["vec"], axis=0),
        const("flat_shape", flat_shape),
        helper.make_node("Reshape", ["vec", "flat_shape"], ["flat"]),
        const("zero", [0]),
        const("depth_axis", [depth_axis]),
        helper.make_node("Slice", ["flat", "zero", "depth", "depth_axis"], ["w"]),
    ]


def econv_function(opset: int) -> onnx.FunctionProto:
    nodes = _decode_nodes([0, 0, 0, -1], 3) + [
        helper.make_node("Transpose", ["w"], ["W"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["X", "W", "B"], ["Y"]),
    ]
    conv = nodes[-1]
    conv.attribute.extend([
        _ref_attr("strides", onnx.AttributeProto.INTS),
        _ref_attr("pads", onnx.AttributeProto.INTS),
        _ref_attr("dilations", onnx.AttributeProto.INTS),
        _ref_attr("group", onnx.AttributeProto.INT),
    ])
    return helper.make_function(
        DOMAIN, "EConv", ["X", "codebook", "codes", "offsets", "depth", "B"], ["Y"], nodes,
        [helper.make_opsetid("", opset)], attributes=list(CONV_ATTRS),
        doc_string="Jointly-encoded convolution: W[t, v*r+k, i, j] = codebook[offsets[v] + codes[t, i, j, v], k]")


def egemm_function(opset: int) -> onnx.FunctionProto:
    nodes = _decode_nodes([0, -1], 1) + [
        helper.make_node("Transpose", ["w"], ["Wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["X", "Wt"], ["XW"]),
        helper.make_node("Add", ["XW", "B"], ["Y"]),
    ]
    return helper.make_function(
        DOMAIN, "EGemm", ["X", "codebook", "codes", "offsets", "depth", "B"], ["Y"], nodes,
        [helper.make_opsetid("", opset)],
        doc_string="Jointly-encoded fully-connected layer: Y = X W^T + B, W[t, v*r+k] = codebook[offsets[v] + codes[t, v], k]")
