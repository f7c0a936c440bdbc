"""The native runtime's wider op set (Pad, Resize, reductions, pointwise math, Split, Slice, 2x2 pooling) against onnxruntime.

Every case is one hand-built node run by ``neuralmerge.runtime.Session`` and by stock onnxruntime;
bad attributes and constants must be refused at load with a one-line ModelError naming the problem.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from neuralmerge.runtime import ModelError, Session, pack_model

RNG = np.random.default_rng(0)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def node_model(node: onnx.NodeProto, feeds: dict, inits: dict, opset: int,
               output_shapes: list | None = None) -> onnx.ModelProto:
    """A one-node model: ``feeds`` are graph inputs, ``inits`` initializers (IR 8 for onnxruntime)."""
    outputs = [o for o in node.output if o]
    shapes = output_shapes or [None] * len(outputs)
    graph = helper.make_graph(
        [node], "op", [helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape) for n, a in feeds.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, s) for o, s in zip(outputs, shapes)],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()])
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", opset)])


def check(node: onnx.NodeProto, feeds: dict, inits: dict | None = None, opset: int = 17, rtol: float = 1e-5) -> dict:
    """Runs ``node`` on both runtimes and asserts the outputs agree; returns ours."""
    model = node_model(node, feeds, inits or {}, opset)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in model.graph.output], session.run(None, feeds)))
    for output in model.graph.output:  # the packer needs every output's rank
        for d in want[output.name].shape:
            output.type.tensor_type.shape.dim.add().dim_value = d
    got = Session(pack_model(model)).run(feeds)
    assert got.keys() == want.keys()
    for name, array in want.items():
        assert got[name].shape == array.shape, name
        np.testing.assert_allclose(got[name], array, rtol=rtol, atol=rtol * max(np.abs(array).max(initial=0), 1e-3),
                                   err_msg=name)
    return got


def refused(node: onnx.NodeProto, feeds: dict, inits: dict | None = None, opset: int = 17, *words: str) -> str:
    """Asserts that loading the one-node model is a one-line ModelError containing ``words``."""
    model = node_model(node, feeds, inits or {}, opset, output_shapes=[[1]] * len([o for o in node.output if o]))
    with pytest.raises(ModelError) as info:
        Session(pack_model(model))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def ints(values) -> np.ndarray:
    return np.array(values, np.int64)


# ---- A chain of the new ops through the planner (arena reuse, in-place ops, tasks) --------

def test_chain_of_new_ops_follows_the_batch_and_threads():
    """Relu -> Sum -> PRelu -> SE gate (ReduceMean, Sigmoid, Mul) -> Resize -> Pad -> Split -> Max -> Slice."""
    c = 4
    inits = {"bias": rand(c, 1, 1), "slope": RNG.uniform(0, 0.3, (c, 1, 1)).astype(np.float32),
             "axes": ints([2, 3]), "scales": np.array([1, 1, 2, 2], np.float32), "pads": ints([0, 0, 1, 2, 0, 0, 2, 1]),
             "starts": ints([1]), "ends": ints([-1]), "slice_axes": ints([3]), "steps": ints([2])}
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sum", ["r", "bias"], ["s"]),
             helper.make_node("PRelu", ["s", "slope"], ["p"]),
             helper.make_node("ReduceMean", ["p", "axes"], ["m"], keepdims=1),
             helper.make_node("Sigmoid", ["m"], ["g"]), helper.make_node("Mul", ["p", "g"], ["e"]),
             helper.make_node("Resize", ["e", "", "scales"], ["u"], mode="linear"),
             helper.make_node("Pad", ["u", "pads"], ["d"], mode="reflect"),
             helper.make_node("Split", ["d"], ["a", "b"], axis=1, num_outputs=2),
             helper.make_node("Max", ["a", "b"], ["t"]),
             helper.make_node("Slice", ["t", "starts", "ends", "slice_axes", "steps"], ["y"])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c // 2, 13, 7])],
                              [numpy_helper.from_array(v, n) for n, v in inits.items()])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 18)])
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    packed = pack_model(model)
    for threads in (1, 2):
        session = Session(packed, threads=threads)
        for batch in (1, 3):
            x = rand(batch, c, 5, 6)
            np.testing.assert_allclose(session.run({"x": x})["y"], reference.run(None, {"x": x})[0], rtol=1e-5,
                                       atol=1e-6)


# ---- Pad ----------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("width, pads, ceil", [(70, [0, 0, 0, 0], 0), (67, [0, 0, 0, 0], 1), (64, [1, 1, 1, 1], 0)])
def test_2x2_pooling_rows_on_the_simd_kernel(op, width, pads, ceil):
    # 2x2 windows at stride 2 run on a SIMD kernel 16 outputs at a time: rows of 32-35 outputs
    # take full vectors and a tail, padded edges the general path.
    x = rand(2, 3, 6, width)
    node = helper.make_node(op, ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], pads=pads, ceil_mode=ceil)
    check(node, {"x": x})


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("kernel, strides, pads, ceil", [
    ([3, 3], [2, 2], [0, 0, 0, 0], 0),   # ZF-Net / AlexNet pooling
    ([3, 3], [1, 1], [1, 1, 1, 1], 0),
    ([2, 3], [2, 1], [1, 0, 0, 2], 1),
    ([3, 2], [3, 2], [0, 1, 2, 1], 1),
    ([1, 4], [1, 3], [0, 0, 0, 0], 0),
])
def test_pooling_windows_inside_rows(op, kernel, strides, pads, ceil):
    # Windows wholly inside a row are reduced down their columns, then across; edge windows
    # take the general path. Rows of 41 pixels: many inner windows and both kinds of edge.
    x = rand(2, 3, 9, 41)
    attrs = {"count_include_pad": 1} if op == "AveragePool" and pads[1] else {}
    node = helper.make_node(op, ["x"], ["y"], kernel_shape=kernel, strides=strides, pads=pads, ceil_mode=ceil, **attrs)
    check(node, {"x": x})


def test_dilated_max_pooling_windows_inside_rows():
    x = rand(1, 2, 11, 37)
    check(helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 1], dilations=[2, 3],
                           pads=[1, 2, 1, 2]), {"x": x})


@pytest.mark.parametrize("include_pad", [0, 1])
@pytest.mark.parametrize("kernel, dilations, pads, ceil", [
    ([2, 2], [2, 2], [1, 1, 1, 1], 0),
    ([3, 2], [2, 3], [2, 1, 0, 1], 1),
    ([3, 3], [3, 1], [0, 0, 0, 0], 0),
])
def test_dilated_average_pooling(kernel, dilations, pads, ceil, include_pad):
    # Opset 19's dilations: edge windows count (and, with count_include_pad, pad) only the
    # cells their dilated taps land on.
    x = rand(1, 2, 11, 13)
    check(helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=kernel, dilations=dilations, pads=pads,
                           ceil_mode=ceil, count_include_pad=include_pad), {"x": x}, opset=19)


def test_constant_nodes_are_folded_when_packing():
    # torch's exporter writes Constant nodes (ZeroPad2d, view); packing folds them with the
    # model's opset (onnx's reference evaluator refuses a bare graph).
    x = rand(1, 3)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones((1, 3), np.float32))),
         helper.make_node("Add", ["x", "c"], ["y"])], "constant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    np.testing.assert_array_equal(Session(pack_model(model)).run({"x": x})["y"], x + 1)


def test_transpose_of_a_scalar():
    # A reduction to a scalar, transposed (a no-op), then reshaped back to rank 1.
    x = rand(1, 3, 4, 5)
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Transpose", ["s"], ["t"]),
         helper.make_node("Reshape", ["t", "one"], ["y"])], "scalar",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [numpy_helper.from_array(ints([1]), "one")])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    np.testing.assert_allclose(Session(pack_model(model)).run({"x": x})["y"], [x.sum()], rtol=1e-5)


def test_reshape_allowzero():
    # torch's dynamo exporter writes allowzero=1 on every view: without a 0 in the target it is
    # an ordinary Reshape; with one it asks for an empty tensor, which is refused.
    x = rand(2, 3, 4)
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)
    check(node, {"x": x}, {"shape": ints([2, -1])}, opset=14)
    check(node, {"x": x}, {"shape": ints([4, 3, 2])}, opset=14)
    refused(node, {"x": x}, {"shape": ints([0, -1])}, 14, "allowzero=1", "empty tensor")


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
@pytest.mark.parametrize("pads", [[0, 0, 1, 2, 0, 0, 2, 1], [0, 1, 0, 0, 0, 0, 2, 3], [0, 0, -1, 1, 0, 0, 2, -2]])
def test_pad_modes_opset_13(mode, pads):
    x = rand(2, 3, 4, 5)
    inits = {"pads": ints(pads), "value": np.array(1.5, np.float32)}
    node = helper.make_node("Pad", ["x", "pads", "value" if mode == "constant" else ""], ["y"], mode=mode)
    check(node, {"x": x}, inits, opset=13)


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_pad_any_rank_opset_11_default_value(rank):
    x = rand(*([3] * rank))
    pads = [(d % 3) for d in range(rank)] + [((d + 1) % 3) for d in range(rank)]
    check(helper.make_node("Pad", ["x", "pads"], ["y"]), {"x": x}, {"pads": ints(pads)}, opset=11)
    check(helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect"), {"x": x}, {"pads": ints(pads)}, opset=11)


def test_pad_axes_input_opset_18():
    x = rand(2, 3, 4, 5)
    node = helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"], mode="edge")
    check(node, {"x": x}, {"pads": ints([1, 2, 0, 3]), "axes": ints([-1, 1])}, opset=18)


def test_pad_attribute_before_opset_11():
    node = helper.make_node("Pad", ["x"], ["y"], pads=[0, 1, 1, 0, 2, 0], value=-2.0)
    check(node, {"x": rand(2, 3, 4)}, opset=10)


def test_pad_bad_attributes_and_constants():
    x = {"x": rand(1, 2, 3, 3)}
    refused(helper.make_node("Pad", ["x", "pads"], ["y"], mode="wrap"), x, {"pads": ints([0] * 8)}, 19, "mode 'wrap'")
    refused(helper.make_node("Pad", ["x", "pads"], ["y"]), x, {"pads": ints([1] * 6)}, 13, "pads has 6 values, expected 8")
    refused(helper.make_node("Pad", ["x", "pads"], ["y"]), x, {"pads": ints([0, 0, -4, 0, 0, 0, 0, 0])}, 13,
            "invalid for a dimension of 3")
    refused(helper.make_node("Pad", ["x", "pads"], ["y"]), x, {"pads": ints([0, 0, -2, 0, 0, 0, -2, 0])}, 13,
            "crop more than")
    refused(helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect"), x, {"pads": ints([0, 0, 3, 0, 0, 0, 0, 0])},
            13, "reflect pads", "smaller than the dimension 3")
    refused(helper.make_node("Pad", ["x", "pads"], ["y"]), x, {"pads": ints([0, 0, 1 << 40, 0, 0, 0, 0, 0])}, 13,
            "invalid")
    # 2^21 x 2^11 x 2^11 elements: more than the runtime allows per tensor, and the message names the node
    refused(helper.make_node("Pad", ["x", "pads"], ["y"], name="big"), x, {"pads": ints([0, 1 << 21, 1 << 10, 1 << 10,
                                                                                     0, 0, 1 << 10, 1 << 10])}, 13,
            "op 'Pad' (node 'big'): a computed tensor has more than")


# ---- Resize / Upsample --------------------------------------------------------------------

COORDINATES = ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "tf_half_pixel_for_nearest"]


@pytest.mark.parametrize("nearest_mode", ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
@pytest.mark.parametrize("coordinates", COORDINATES)
@pytest.mark.parametrize("scales", [[1, 1, 2, 2], [1, 1, 1.5, 0.5], [1, 1, 0.6, 3]])
def test_resize_nearest_scales(coordinates, nearest_mode, scales):
    node = helper.make_node("Resize", ["x", "roi", "scales"], ["y"], mode="nearest", nearest_mode=nearest_mode,
                            coordinate_transformation_mode=coordinates)
    inits = {"roi": np.zeros(0, np.float32), "scales": np.array(scales, np.float32)}
    x = rand(1, 2, 5, 6)
    if coordinates != "tf_half_pixel_for_nearest":
        check(node, {"x": x}, inits, opset=13)
        return
    # Dropped in opset 13 and implemented by neither onnxruntime nor onnx's reference evaluator:
    # the spec's formula, source = (i + 0.5) / scale in float32, rounded by nearest_mode, clamped.
    rounding = {"round_prefer_floor": lambda v: np.ceil(v - 0.5), "round_prefer_ceil": lambda v: np.floor(v + 0.5),
                "floor": np.floor, "ceil": np.ceil}[nearest_mode]
    rows, cols = (np.clip(rounding((np.arange(int(n * f), dtype=np.float32) + np.float32(0.5)) / np.float32(f)), 0, n - 1).astype(int)
                  for n, f in zip(x.shape[2:], scales[2:]))
    got = Session(pack_model(node_model(node, {"x": x}, inits, 11, [list(x.shape[:2]) + [len(rows), len(cols)]])))
    np.testing.assert_array_equal(got.run({"x": x})["y"], x[:, :, rows][:, :, :, cols])


@pytest.mark.parametrize("coordinates", COORDINATES[:4] + ["half_pixel_symmetric"])
@pytest.mark.parametrize("sizes", [[2, 3, 10, 12], [2, 3, 3, 4], [2, 3, 1, 7]])
def test_resize_linear_sizes(coordinates, sizes):
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear",
                            coordinate_transformation_mode=coordinates)
    check(node, {"x": rand(2, 3, 5, 6)}, {"sizes": ints(sizes)}, opset=19)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_opset_11_empty_roi_and_scales(mode):
    x = {"x": rand(1, 2, 4, 4)}
    empty = np.zeros(0, np.float32)
    check(helper.make_node("Resize", ["x", "roi", "scales"], ["y"], mode=mode), x,
          {"roi": empty, "scales": np.array([1, 1, 2, 3], np.float32)}, opset=11)
    check(helper.make_node("Resize", ["x", "roi", "scales", "sizes"], ["y"], mode=mode), x,
          {"roi": empty, "scales": empty, "sizes": ints([1, 2, 7, 3])}, opset=11)


def test_resize_axes_attribute_opset_18():
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear", axes=[2, 3])
    check(node, {"x": rand(1, 2, 4, 5)}, {"scales": np.array([2.0, 0.8], np.float32)}, opset=18)
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="nearest", axes=[-1])
    check(node, {"x": rand(1, 2, 4, 5)}, {"sizes": ints([9])}, opset=18)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_legacy_resize_10_and_upsample_9(mode):
    scales = {"scales": np.array([1, 1, 2, 1.5], np.float32)}
    check(helper.make_node("Resize", ["x", "scales"], ["y"], mode=mode), {"x": rand(1, 2, 3, 4)}, scales, opset=10)
    check(helper.make_node("Upsample", ["x", "scales"], ["y"], mode=mode), {"x": rand(1, 2, 3, 4)}, scales, opset=9)


def test_resize_sizes_from_shape_arithmetic_follow_the_batch():
    """The export of F.interpolate(x, size=(7, 9)): sizes = Concat(Shape(x)[:2], [7, 9])."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Slice", ["shape", "zero", "two"], ["nc"]),
             helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
             helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear")]
    graph = helper.make_graph(nodes, "interp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 7, 9])],
                              [numpy_helper.from_array(ints(v), n) for n, v in
                               [("zero", [0]), ("two", [2]), ("hw", [7, 9])]])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 13)])
    session = Session(pack_model(model))
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = rand(batch, 2, 4, 4)
        np.testing.assert_allclose(session.run({"x": x})["y"], reference.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_resize_bad_attributes_and_constants():
    x = {"x": rand(1, 2, 4, 4)}
    scales = {"scales": np.array([1, 1, 2, 2], np.float32)}
    resize = lambda **attrs: helper.make_node("Resize", ["x", "", "scales"], ["y"], **attrs)  # noqa: E731
    refused(resize(mode="cubic"), x, scales, 13, "mode 'cubic'")
    refused(resize(mode="linear", antialias=1), x, scales, 18, "antialias=1")
    refused(resize(coordinate_transformation_mode="tf_crop_and_resize"), x, scales, 13, "tf_crop_and_resize")
    refused(resize(nearest_mode="nearest"), x, scales, 13, "nearest_mode 'nearest'")
    refused(resize(coordinate_transformation_mode="tf_half_pixel_for_nearest"), x, scales, 13,
            "'tf_half_pixel_for_nearest' is not supported in opset 13")
    refused(resize(keep_aspect_ratio_policy="not_larger"), x, scales, 18, "keep_aspect_ratio_policy")
    refused(resize(), x, {"scales": np.array([1, 2, 2, 2], np.float32)}, 13, "only H and W")
    refused(resize(), x, {"scales": np.array([1, 1, 0, 2], np.float32)}, 13, "scale 0", "positive")
    refused(resize(), x, {"scales": np.array([1, 1, 0.1, 2], np.float32)}, 13, "empty or too large")
    refused(resize(), x, {"scales": np.array([1, 1, 1e30, 2], np.float32)}, 13, "empty or too large")
    refused(resize(), x, {"scales": np.array([1, 1, 2], np.float32)}, 13, "scales has 3 values for 4 axes")
    sized = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"])
    refused(sized, x, {"sizes": ints([1, 2, 0, 4])}, 13, "size 0 is empty or too large")
    refused(sized, x, {"sizes": ints([1, 2, 4, 1 << 40])}, 13, "size 1099511627776 is empty or too large")
    both = helper.make_node("Resize", ["x", "", "scales", "sizes"], ["y"])
    refused(both, x, {**scales, "sizes": ints([1, 2, 8, 8])}, 13, "exactly one of scales and sizes")


# ---- Reductions ---------------------------------------------------------------------------

REDUCTIONS = ["ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum"]


@pytest.mark.parametrize("op", REDUCTIONS)
@pytest.mark.parametrize("axes, keepdims", [([2, 3], 1), ([2, 3], 0), ([1], 1), ([0, 2], 0), ([-1], 0), (None, 1)])
@pytest.mark.parametrize("opset", [13, 18])
def test_reductions(op, axes, keepdims, opset):
    x = {"x": rand(2, 3, 4, 5)}
    axes_as_input = opset >= (13 if op == "ReduceSum" else 18)
    if axes is None:
        node = helper.make_node(op, ["x"], ["y"], keepdims=keepdims)
        check(node, x, opset=opset)
    elif axes_as_input:
        check(helper.make_node(op, ["x", "axes"], ["y"], keepdims=keepdims), x, {"axes": ints(axes)}, opset=opset)
    else:
        check(helper.make_node(op, ["x"], ["y"], axes=axes, keepdims=keepdims), x, opset=opset)


@pytest.mark.parametrize("op", REDUCTIONS)
def test_reduction_to_a_scalar(op):
    """keepdims=0 over every axis gives a scalar (graph outputs need rank >= 1: add a [1] zero)."""
    nodes = [helper.make_node(op, ["x"], ["s"], keepdims=0), helper.make_node("Add", ["s", "zero"], ["y"])]
    graph = helper.make_graph(nodes, "scalar", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              [numpy_helper.from_array(np.zeros(1, np.float32), "zero")])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 18)])
    x = rand(2, 3, 4)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(Session(pack_model(model)).run({"x": x})["y"], want, rtol=1e-5)


@pytest.mark.parametrize("op", REDUCTIONS)
def test_reduction_noop_with_empty_axes(op):
    x = {"x": rand(2, 3, 4)}
    got = check(helper.make_node(op, ["x"], ["y"], noop_with_empty_axes=1), x, opset=18)
    np.testing.assert_array_equal(got["y"], x["x"])


def test_reduction_bad_axes():
    x = {"x": rand(2, 3, 4)}
    refused(helper.make_node("ReduceMean", ["x"], ["y"], axes=[1, -2]), x, None, 13, "axis -2 is repeated")
    refused(helper.make_node("ReduceMax", ["x"], ["y"], axes=[3]), x, None, 13, "axis 3 is out of range")
    refused(helper.make_node("ReduceSum", ["x"], ["y"], axes=[1]), x, None, 13, "axes must be an input")
    refused(helper.make_node("ReduceMin", ["x", "axes"], ["y"]), x, {"axes": ints([-4])}, 18, "out of range")


# ---- Pointwise, PRelu, variadic -----------------------------------------------------------

UNARY = [("Exp", {}), ("Abs", {}), ("Neg", {}), ("Erf", {}), ("Softplus", {}), ("Elu", {"alpha": 0.7}),
         ("Selu", {}), ("Selu", {"alpha": 1.2, "gamma": 0.9}), ("Mish", {}), ("Floor", {}), ("Ceil", {}),
         ("Round", {}), ("Reciprocal", {})]


@pytest.mark.parametrize("op, attrs", UNARY)
def test_unary(op, attrs):
    x = np.concatenate([rand(60) * 4, [-2.5, -0.5, 0.5, 1.5, 2.5, 0.0, 30.0, -30.0]]).astype(np.float32)
    if op == "Reciprocal":
        x[x == 0] = 1.0
    check(helper.make_node(op, ["x"], ["y"], **attrs), {"x": x.reshape(4, 17)}, opset=18)


@pytest.mark.parametrize("op", ["Log", "Sqrt"])
def test_unary_of_positive_inputs(op):
    check(helper.make_node(op, ["x"], ["y"]), {"x": np.abs(rand(3, 7)) + 0.01}, opset=13)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_opset_20(approximate):
    check(helper.make_node("Gelu", ["x"], ["y"], approximate=approximate), {"x": rand(3, 11) * 3}, opset=20)


@pytest.mark.parametrize("slope_shape", [(3, 1, 1), (1,), (5,), (1, 3, 4, 5)])
def test_prelu_slope_broadcast(slope_shape):
    check(helper.make_node("PRelu", ["x", "slope"], ["y"]), {"x": rand(2, 3, 4, 5)},
          {"slope": RNG.uniform(0, 0.5, slope_shape).astype(np.float32)}, opset=16)


@pytest.mark.parametrize("op", ["Sum", "Max", "Min", "Mean"])
@pytest.mark.parametrize("shapes", [[(2, 3)], [(2, 3, 4), (2, 3, 4)], [(1, 3, 1), (2, 1, 4), (4,)], [(4,), (2, 3, 4)]])
def test_variadic_broadcasting(op, shapes):
    feeds = {f"x{i}": rand(*s) for i, s in enumerate(shapes)}
    check(helper.make_node(op, list(feeds), ["y"]), feeds, opset=13)


def test_pointwise_bad_attributes():
    x = {"x": rand(2, 3, 4)}
    refused(helper.make_node("Gelu", ["x"], ["y"], approximate="fast"), x, None, 20, "approximate 'fast'")
    refused(helper.make_node("PRelu", ["x", "slope"], ["y"]), x, {"slope": rand(3)}, 16, "do not broadcast")
    refused(helper.make_node("PRelu", ["x", "slope"], ["y"]), x, {"slope": rand(2, 1, 1, 1)}, 16,
            "does not broadcast to the input")
    refused(helper.make_node("Sum", ["x", "z"], ["y"]), x, {"z": rand(5)}, 13, "do not broadcast")


# ---- Split and Slice ----------------------------------------------------------------------

def test_split_attribute_input_and_num_outputs():
    x = {"x": rand(2, 7, 3)}
    check(helper.make_node("Split", ["x"], ["a", "b"], axis=1, split=[3, 4]), x, opset=11)
    check(helper.make_node("Split", ["x", "split"], ["a", "b", "c"], axis=-2), x, {"split": ints([2, 0, 5])}, opset=13)
    check(helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3), x, opset=18)
    check(helper.make_node("Split", ["x"], ["a", "b"], axis=0), x, opset=13)


def test_split_bad_sizes():
    x = {"x": rand(2, 7, 3)}
    refused(helper.make_node("Split", ["x", "split"], ["a", "b"], axis=1), x, {"split": ints([3, 3])}, 13,
            "do not add up to the dimension 7")
    refused(helper.make_node("Split", ["x"], ["a", "b"], axis=1), x, None, 13, "into 2 equal parts")
    refused(helper.make_node("Split", ["x"], ["a", "b"], axis=1, num_outputs=3), x, None, 18,
            "num_outputs 3 does not match the 2 outputs")
    refused(helper.make_node("Split", ["x"], ["a", "b"], axis=3), x, None, 13, "axis 3 is out of range")


@pytest.mark.parametrize("starts, ends, axes, steps", [
    ([1], [3], [1], [1]),
    ([0, -1, 1], [2, -6, 100], [0, 2, 3], [1, -2, 2]),
    ([-100, 5], [100, -100], [-1, 1], [3, -1]),
    ([2], [1], [2], [1]),  # empty
])
def test_float_slice(starts, ends, axes, steps):
    inits = {"starts": ints(starts), "ends": ints(ends), "axes": ints(axes), "steps": ints(steps)}
    check(helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"]), {"x": rand(2, 3, 5, 6)}, inits,
          opset=13)


def test_float_slice_attributes_before_opset_10():
    node = helper.make_node("Slice", ["x"], ["y"], starts=[1, 0], ends=[3, -1], axes=[1, 2])
    check(node, {"x": rand(2, 4, 5)}, opset=9)


def test_slice_bad_steps_and_axes():
    x = {"x": rand(2, 3)}
    slice_node = helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"])
    refused(slice_node, x, {"starts": ints([0]), "ends": ints([2]), "axes": ints([0]), "steps": ints([0])}, 13,
            "invalid step 0")
    refused(slice_node, x, {"starts": ints([0, 0]), "ends": ints([2, 2]), "axes": ints([0, -2]),
                            "steps": ints([1, 1])}, 13, "is repeated")
    refused(slice_node, x, {"starts": ints([0]), "ends": ints([2, 3]), "axes": ints([0]), "steps": ints([1])}, 13,
            "different lengths")
