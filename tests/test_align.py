"""Layer discovery (find_layers) and N-model alignment."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from neuralmerge.align import align, match_layers
from neuralmerge.errors import NeuralMergeError
from neuralmerge.graph.layers import Layer, find_layers

RNG = np.random.default_rng(0)


def conv(model: int, node: str, p: int, d: int, k: int = 3, group: int = 1) -> Layer:
    return Layer(model=model, node=node, op_type="Conv", kind="conv",
                 weight=np.zeros((p, d, k, k), np.float32), bias=None, weight_name=f"{node}.w", bias_name=None,
                 attrs={"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": group})


def fc(model: int, node: str, n_out: int, n_in: int) -> Layer:
    return Layer(model=model, node=node, op_type="Gemm", kind="fc", weight=np.zeros((n_out, n_in), np.float32),
                 bias=None, weight_name=f"{node}.w", bias_name=None)


def lenet(model: int) -> list[Layer]:
    return [conv(model, "c1", 32, 1, 5), conv(model, "c2", 64, 32, 5), fc(model, "f1", 1024, 4096)]


def members(groups) -> list[tuple[str, list[tuple[int, str]]]]:
    return [(g.name, [(m.model, m.node) for m in g.members]) for g in groups]


# --------------------------------------------------------------------------- alignment

def test_identical_architectures_align_one_to_one():
    groups = align([lenet(0), lenet(1)])
    assert members(groups) == [
        ("conv1", [(0, "c1"), (1, "c1")]),
        ("conv2", [(0, "c2"), (1, "c2")]),
        ("fc1", [(0, "f1"), (1, "f1")]),
    ]
    assert [g.kind for g in groups] == ["conv", "conv", "fc"]


def test_three_models_align_to_the_deepest():
    shallow = [conv(0, "a1", 32, 3), conv(0, "a2", 64, 32), fc(0, "af", 10, 64)]
    deep = [conv(1, "b1", 32, 3), conv(1, "b2", 64, 32), conv(1, "b3", 64, 64), fc(1, "bf", 10, 64)]
    same = [conv(2, "c1", 32, 3), conv(2, "c2", 64, 32), fc(2, "cf", 10, 64)]
    groups = align([shallow, deep, same])
    assert members(groups) == [
        ("conv1", [(0, "a1"), (1, "b1"), (2, "c1")]),
        ("conv2", [(0, "a2"), (1, "b2"), (2, "c2")]),
        ("conv3", [(1, "b3")]),
        ("fc1", [(0, "af"), (1, "bf"), (2, "cf")]),
    ]


def test_deeper_vs_shallower_leaves_middle_layer_unmatched():
    shallow = [conv(0, "s1", 64, 3), conv(0, "s2", 128, 64), conv(0, "s3", 256, 128), conv(0, "s4", 256, 256)]
    deep = [conv(1, "d1", 64, 3), conv(1, "d2", 128, 64), conv(1, "d3", 128, 128), conv(1, "d4", 256, 128),
            conv(1, "d5", 256, 256)]
    assert match_layers(deep, shallow) == [0, 1, 3, 4]
    assert members(align([shallow, deep])) == [   # model 1 is the reference: it is deeper
        ("conv1", [(0, "s1"), (1, "d1")]),
        ("conv2", [(0, "s2"), (1, "d2")]),
        ("conv3", [(1, "d3")]),
        ("conv4", [(0, "s3"), (1, "d4")]),
        ("conv5", [(0, "s4"), (1, "d5")]),
    ]


def test_depthwise_layers_are_not_forced_onto_dense_ones():
    # reference (model 0): dense convs; model 1 inserts depthwise (d=1) layers between pointwise ones
    dense = [conv(0, "c1", 64, 3), conv(0, "c2", 128, 64), conv(0, "c3", 256, 128), conv(0, "c4", 256, 256),
             conv(0, "c5", 256, 256)]
    mobile = [conv(1, "m1", 64, 3), conv(1, "dw1", 64, 1, group=64), conv(1, "m2", 128, 64),
              conv(1, "dw2", 128, 1, group=128), conv(1, "m3", 256, 128)]
    partner = match_layers(dense, mobile)
    assert partner[1] is None and partner[3] is None          # depthwise layers stay alone
    assert partner[0] == 0 and partner[2] == 1 and partner[4] == 2
    groups = align([dense, mobile])
    assert members(groups) == [
        ("conv1", [(0, "c1"), (1, "m1")]),
        ("conv2", [(1, "dw1")]),
        ("conv3", [(0, "c2"), (1, "m2")]),
        ("conv4", [(1, "dw2")]),
        ("conv5", [(0, "c3"), (1, "m3")]),
        ("conv6", [(0, "c4")]),
        ("conv7", [(0, "c5")]),
    ]


def test_names_follow_reference_order_and_kinds_are_numbered_separately():
    a = [conv(0, "x1", 16, 3), fc(0, "y1", 100, 400), fc(0, "y2", 50, 100)]
    b = [conv(1, "p1", 16, 3), conv(1, "p2", 32, 16), fc(1, "q1", 100, 512), fc(1, "q2", 50, 100),
         fc(1, "q3", 10, 50)]
    groups = align([a, b])
    assert [g.name for g in groups] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert members(groups)[2:] == [("fc1", [(0, "y1"), (1, "q1")]), ("fc2", [(0, "y2"), (1, "q2")]),
                                   ("fc3", [(1, "q3")])]


def test_ties_pick_the_lowest_index_as_reference_and_empty_models_are_fine():
    a = [conv(0, "a1", 8, 3), conv(0, "a2", 8, 8)]
    b = [conv(1, "b1", 8, 3), conv(1, "b2", 8, 8)]
    groups = align([a, b, []])
    assert [[m.model for m in g.members] for g in groups] == [[0, 1], [0, 1]]
    assert align([[], []]) == [] and align([]) == []


def test_unmatched_layer_before_any_match_comes_first():
    ref = [conv(0, "r1", 64, 64), conv(0, "r2", 128, 64), conv(0, "r3", 128, 128)]
    other = [conv(1, "stem", 64, 1, k=7), conv(1, "o1", 64, 64)]
    assert members(align([ref, other])) == [
        ("conv1", [(1, "stem")]), ("conv2", [(0, "r1"), (1, "o1")]), ("conv3", [(0, "r2")]), ("conv4", [(0, "r3")])]


def test_heads_are_excluded_via_is_head():
    models = [find_layers(_lenet_onnx(seed), i) for i, seed in enumerate((1, 2))]
    assert [[layer.is_head for layer in layers] for layers in models] == [[False, False, False, True]] * 2
    groups = align([[layer for layer in layers if not layer.is_head] for layers in models])
    assert [g.name for g in groups] == ["conv1", "conv2", "fc1"]
    assert all(len(g.members) == 2 for g in groups)


def _model(nodes, inits, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _f32(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _lenet_onnx(seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = {n: rng.standard_normal(s).astype(np.float32) for n, s in
         [("w1", (4, 1, 5, 5)), ("b1", (4,)), ("w2", (8, 4, 5, 5)), ("w3", (16, 8 * 8 * 8)), ("b3", (16,)),
          ("w4", (16, 10)), ("b4", (10,)), ("shape", (2,))]}
    w["shape"] = np.array([1, -1], np.int64)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[2, 2, 2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], name="conv2", pads=[2, 2, 2, 2]),
        helper.make_node("MaxPool", ["c2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p2", "shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["f1"], name="fc1", transB=1),
        helper.make_node("Relu", ["f1"], ["r3"], name="relu3"),
        helper.make_node("MatMul", ["r3", "w4"], ["mm"], name="fc2"),
        helper.make_node("Add", ["mm", "b4"], ["y"], name="fc2_bias"),
    ]
    return _model(nodes, w, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 32, 32])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])


def test_find_layers_on_a_lenet_graph():
    model = _lenet_onnx(0)
    layers = find_layers(model, 3)
    assert [(l.node, l.op_type, l.kind, l.shape, l.model) for l in layers] == [
        ("conv1", "Conv", "conv", (4, 1, 5, 5), 3), ("conv2", "Conv", "conv", (8, 4, 5, 5), 3),
        ("fc1", "Gemm", "fc", (16, 512), 3), ("fc2", "MatMul", "fc", (10, 16), 3)]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(layers[3].weight, inits["w4"].T)        # MatMul [n_in, n_out] transposed
    assert layers[3].bias_name == "b4"
    np.testing.assert_array_equal(layers[3].bias, inits["b4"])
    assert layers[1].bias is None and layers[1].bias_name is None
    assert layers[0].attrs == {"strides": [1, 1], "pads": [2, 2, 2, 2], "dilations": [1, 1], "group": 1}
    assert all(l.weight.dtype == np.float32 and l.weight.flags.c_contiguous for l in layers)


def test_gemm_alpha_beta_and_transB0_are_folded():
    w, c = _f32(6, 5), _f32(5)   # transB=0: weight is [n_in, n_out]
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="g", alpha=0.5, beta=2.0)
    model = _model([node], {"w": w, "c": c}, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])])
    [layer] = find_layers(model, 0)
    np.testing.assert_allclose(layer.weight, 0.5 * w.T, rtol=0, atol=0)
    np.testing.assert_allclose(layer.bias, 2.0 * c, rtol=0, atol=0)
    assert layer.shape == (5, 6) and layer.bias_name == "c" and layer.is_head
    x = _f32(2, 6)  # the canonical layer computes what the Gemm computes
    np.testing.assert_allclose(x @ layer.weight.T + layer.bias, 0.5 * x @ w + 2.0 * c, rtol=1e-5)


def test_gemm_with_transA_is_not_mergeable():
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="g", transA=1)
    model = _model([node], {"w": _f32(6, 5)}, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])])
    assert find_layers(model, 0) == []


def test_matmul_bias_only_when_add_is_the_sole_consumer():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["b", "m"], ["y"], name="add"),
             helper.make_node("Relu", ["m"], ["z"], name="relu")]
    model = _model(nodes, {"w": _f32(6, 5), "b": _f32(5)},
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5]),
                    helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 5])])
    [layer] = find_layers(model, 0)
    assert layer.bias is None and layer.bias_name is None


def test_conv_with_group_dilation_and_stride():
    w = _f32(8, 2, 3, 3)  # group=4 over 8 input channels: depth 2
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="gconv", group=4, strides=[2, 2], dilations=[2, 1],
                            pads=[1, 0, 2, 1])
    model = _model([node], {"w": w}, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    [layer] = find_layers(model, 1)
    assert layer.depth == 2 and layer.is_head
    assert layer.attrs == {"strides": [2, 2], "pads": [1, 0, 2, 1], "dilations": [2, 1], "group": 4}
    np.testing.assert_array_equal(layer.weight, w)


def test_nan_weight_raises_naming_model_and_node():
    w = _f32(4, 3, 3, 3)
    w[1, 2, 0, 0] = np.nan
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="bad_conv")
    model = _model([node], {"w": w}, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    with pytest.raises(NeuralMergeError, match=r"model 2: node 'bad_conv' has NaN/Inf in its weight"):
        find_layers(model, 2)


def test_unresolved_auto_pad_is_refused():
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="same_conv", auto_pad="SAME_UPPER")
    model = _model([node], {"w": _f32(4, 3, 3, 3)}, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    with pytest.raises(NeuralMergeError, match="model 0: Conv node 'same_conv' still has auto_pad=SAME_UPPER"):
        find_layers(model, 0)
