"""Graph normalisation: what a merge does to each source model before finding its layers."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from neuralmerge.errors import ModelLoadError
from neuralmerge.graph.normalize import normalize


def same_conv_model(strides: list[int], auto_pad: str, dilations=(1, 1), kernel=(3, 2)) -> onnx.ModelProto:
    """A Resize to the input's own size, computed from its shape (as exported U-Nets do), then a
    Conv with auto_pad: shape inference cannot tell the Conv's input size."""
    w = np.random.default_rng(0).standard_normal((4, 2, *kernel)).astype(np.float32)
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Slice", ["shape", "two", "four"], ["hw"]),
             helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
             helper.make_node("Resize", ["x", "", "", "sizes"], ["r"], mode="nearest"),
             helper.make_node("Conv", ["r", "w"], ["y"], name="same", auto_pad=auto_pad, strides=strides,
                              dilations=list(dilations))]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([4], np.int64), "four"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "nc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def conv_attributes(model: onnx.ModelProto) -> set[str]:
    return {a.name for a in next(n for n in model.graph.node if n.op_type == "Conv").attribute}


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("dilations", [(1, 1), (2, 3)])
def test_stride_1_same_padding_needs_no_input_size(auto_pad, dilations):
    # At stride 1, SAME pads (k - 1) * dilation in total whatever the size, so a Conv whose input
    # size shape inference cannot tell still normalises, to pads that give onnxruntime's answer.
    model = same_conv_model([1, 1], auto_pad, dilations)
    fixed = normalize(model)
    assert "pads" in conv_attributes(fixed) and "auto_pad" not in conv_attributes(fixed)
    x = np.random.default_rng(1).standard_normal((1, 2, 5, 7)).astype(np.float32)
    # onnx's reference evaluator: onnxruntime refuses SAME with dilations.
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    got = ort.InferenceSession(fixed.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_strided_same_padding_without_a_size_is_a_clear_error():
    with pytest.raises(ModelLoadError, match=r"Conv 'same' uses auto_pad=SAME_UPPER with stride 2, which needs "
                                             r"its input's spatial size"):
        normalize(same_conv_model([2, 1], "SAME_UPPER"))


@pytest.mark.parametrize("op,x_shape,w_shape,attrs,words", [
    ("Conv", [1, 3, 8, 8], (8, 4, 3, 3), {}, "Conv 'layer' expects 4 input channels (weight 8x4x3x3) but its input 'x' has 3"),
    ("Conv", [1, 6, 8, 8], (8, 2, 3, 3), {"group": 2}, "expects 4 input channels"),
    ("Gemm", [1, 10], (5, 12), {"transB": 1}, "Gemm 'layer' expects 12 input features (weight 5x12) but its input 'x' has 10"),
    ("MatMul", [1, 10], (12, 5), {}, "MatMul 'layer' expects 12 input features"),
])
def test_a_weight_that_does_not_fit_its_input_is_refused(op, x_shape, w_shape, attrs, words):
    # onnx's checker passes such a model and onnxruntime fails only when it runs it.
    w = np.zeros(w_shape, np.float32)
    graph = helper.make_graph([helper.make_node(op, ["x", "w"], ["y"], name="layer", **attrs)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelLoadError) as info:
        normalize(model, label="bad.onnx")
    assert str(info.value).startswith("bad.onnx: ") and words in str(info.value)


def test_an_input_with_an_empty_dimension_is_named_as_such():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 0, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelLoadError, match=r"input 'x' of m.onnx declares dimension 2 as 0 \(an empty tensor\)"):
        normalize(model, label="m.onnx")
