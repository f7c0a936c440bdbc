"""ONNX -> torch importer: parity with onnxruntime, partial runs, gradients, write-back, E-layers, errors."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.compose
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from helpers_models import ZOO, build_model, export_zoo_model, run_ort, sample_input
from neuralmerge.encode.modules import EConv2d, ELinear
from neuralmerge.errors import ModelLoadError, NeuralMergeError, UnsupportedOpError
from neuralmerge.graph.importer import OnnxModule, import_onnx

RTOL, ATOL = 1e-4, 1e-5


def _torch_outputs(module: OnnxModule, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
    with torch.no_grad():
        result = module.run({k: torch.from_numpy(v) for k, v in feeds.items()}, outputs)
    return [result[name].detach().numpy() for name in outputs]


def _assert_matches_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> OnnxModule:
    module = OnnxModule(model)
    names = [o.name for o in model.graph.output]
    expected = run_ort(model.SerializeToString(), feeds)
    for name, got, want in zip(names, _torch_outputs(module, feeds, names), expected):
        assert got.shape == want.shape, name
        assert got.dtype == want.dtype, name
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=name)
    return module


# ---------------------------------------------------------------- exported architectures

# (architecture, opset, constant folding): unfolded exports keep BatchNormalization nodes and the
# Shape -> Gather -> Unsqueeze -> Concat -> Reshape subgraph of ResNetStyle's flatten.
EXPORTS = [
    ("LeNet", 13, True),
    ("MobileNetStyle", 11, False), ("MobileNetStyle", 17, True), ("MobileNetStyle", 21, False),
    ("YoloStyle", 11, True), ("YoloStyle", 13, False), ("YoloStyle", 18, True), ("YoloStyle", 21, True),
    ("VGGStyle", 11, False), ("VGGStyle", 17, True),
    ("ResNetStyle", 11, False), ("ResNetStyle", 13, True), ("ResNetStyle", 21, False),
]


@pytest.mark.parametrize("name,opset,fold", EXPORTS,
                         ids=[f"{n}-op{o}-{'folded' if f else 'bn'}" for n, o, f in EXPORTS])
def test_exported_architecture_matches_onnxruntime(tmp_path, name, opset, fold):
    path = export_zoo_model(name, tmp_path, opset, fold_constants=fold)
    x = sample_input(name, batch=3, seed=1)  # a batch size other than the export's
    expected = run_ort(path, {"input": x.numpy()})[0]
    module = import_onnx(path)
    assert module.input_names == ["input"] and module.output_names == ["logits"]
    with torch.no_grad():
        got = module(x).numpy()
        reference = build_model(name)(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got, reference, rtol=1e-3, atol=1e-5)
    assert np.abs(expected).max() > 1e-2  # the comparison is not between near-zero outputs


def test_dynamo_export_matches_onnxruntime(tmp_path):
    path = export_zoo_model("ResNetStyle", tmp_path, 18, dynamo=True)
    x = sample_input("ResNetStyle", batch=2)
    expected = run_ort(path, {"input": x.numpy()})[0]
    with torch.no_grad():
        got = import_onnx(path)(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_architectures_are_small():
    for name in ZOO:
        if name != "LeNet":  # the paper's LeNet is 4M parameters by design
            assert sum(p.numel() for p in build_model(name).parameters()) <= 1_000_000, name


# ---------------------------------------------------------------- hand-built graphs for op coverage

def _model(nodes, inputs: dict[str, np.ndarray], initializers: dict[str, np.ndarray], outputs: dict[str, int],
           opset: int, functions=(), extra_opsets=(), output_shape=None) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for n, a in inputs.items()],
        [helper.make_tensor_value_info(n, t, output_shape) for n, t in outputs.items()],
        [numpy_helper.from_array(a, n) for n, a in initializers.items()])
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions), ir_version=9 if opset < 21 else 10)


def _single(op_type, x: np.ndarray, opset: int, extra: dict | None = None, n_out: int = 1, out_type=TensorProto.FLOAT,
            **attrs) -> tuple[onnx.ModelProto, dict]:
    """One node reading graph input ``x`` then the initializers ``extra`` in order ('' skips an input)."""
    extra = extra or {}
    names = ["x"] + [("" if v is None else k) for k, v in extra.items()]
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op_type, names, outs, name="node", **attrs)
    inits = {k: v for k, v in extra.items() if v is not None}
    return _model([node], {"x": x}, inits, {o: out_type for o in outs}, opset), {"x": x}


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _i64(*values):
    return np.array(values, dtype=np.int64)


def _f32(*values):
    return np.array(values, dtype=np.float32)


RESIZE_CASES = []
for _coord in ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric"]:
    for _scales in [(1, 1, 2.0, 1.5), (1, 1, 0.6, 0.5)]:
        RESIZE_CASES.append(dict(mode="linear", coordinate_transformation_mode=_coord, scales=_scales))
for _coord in ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"]:
    for _nearest in ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]:
        RESIZE_CASES.append(dict(mode="nearest", coordinate_transformation_mode=_coord, nearest_mode=_nearest,
                                 scales=(1, 1, 2.5, 0.75)))
RESIZE_CASES.append(dict(mode="linear", coordinate_transformation_mode="align_corners", sizes=(2, 3, 9, 5)))
RESIZE_CASES.append(dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor",
                         sizes=(2, 3, 10, 16)))


@pytest.mark.parametrize("case", RESIZE_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_resize_variants(case):
    case = dict(case)
    scales, sizes = case.pop("scales", None), case.pop("sizes", None)
    extra = {"roi": None, "scales": None if scales is None else _f32(*scales),
             "sizes": None if sizes is None else _i64(*sizes)}
    if sizes is None:
        del extra["sizes"]
    _assert_matches_ort(*_single("Resize", _rand(2, 3, 5, 8), 13, extra, **case))


def test_resize_opset10_and_opset18_axes():
    _assert_matches_ort(*_single("Resize", _rand(1, 2, 3, 4), 10, {"scales": _f32(1, 1, 2, 2)}, mode="nearest"))
    _assert_matches_ort(*_single("Resize", _rand(1, 2, 3, 4), 18, {"roi": None, "scales": _f32(2.0, 3.0)},
                                 mode="linear", axes=[2, 3]))


def test_old_upsample():
    x = _rand(1, 2, 3, 4)
    _assert_matches_ort(*_single("Upsample", x, 9, {"scales": _f32(1, 1, 2, 3)}, mode="nearest"))
    _assert_matches_ort(*_single("Upsample", x, 9, {"scales": _f32(1, 1, 2, 1.5)}, mode="linear"))
    _assert_matches_ort(*_single("Upsample", x, 7, scales=[1.0, 1.0, 2.0, 2.0], mode="nearest"))


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_modes(mode):
    x = _rand(1, 2, 4, 5)
    value = {"value": _f32(0.5)} if mode == "constant" else {}
    _assert_matches_ort(*_single("Pad", x, 13, {"pads": _i64(0, 0, 2, 1, 0, 0, 1, 3), **value}, mode=mode))
    _assert_matches_ort(*_single("Pad", x, 2, pads=[0, 0, 1, 2, 0, 0, 3, 1], mode=mode))
    _assert_matches_ort(*_single("Pad", x, 18, {"pads": _i64(1, 2, 2, 1), "value": None, "axes": _i64(-1, 2)},
                                 mode=mode))


def test_split_forms():
    x = _rand(2, 7, 3)
    _assert_matches_ort(*_single("Split", x, 11, n_out=2, axis=1, split=[3, 4]))
    _assert_matches_ort(*_single("Split", x, 13, {"split": _i64(5, 2)}, n_out=2, axis=1))
    _assert_matches_ort(*_single("Split", x, 13, n_out=2, axis=0))
    _assert_matches_ort(*_single("Split", x, 18, n_out=3, axis=1, num_outputs=3))  # 3, 3, 1


@pytest.mark.parametrize("attrs", [
    dict(strides=[2, 2]),
    dict(strides=[2, 1], pads=[1, 0, 0, 2], output_padding=[1, 0], dilations=[1, 2]),
    dict(strides=[2, 2], group=2),
    dict(strides=[2, 2], auto_pad="SAME_UPPER"),
    dict(strides=[2, 2], output_shape=[6, 8]),
])
def test_conv_transpose(attrs):
    x, w = _rand(1, 4, 3, 4), _rand(4, 3, 3, 3, seed=1)  # [C_in, C_out / group, kh, kw]
    bias = _rand(3 * attrs.get("group", 1), seed=2)
    _assert_matches_ort(*_single("ConvTranspose", x, 13, {"w": w, "b": bias}, **attrs))


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
    dict(kernel_shape=[3, 2], strides=[2, 2], pads=[0, 1, 2, 0], count_include_pad=1, ceil_mode=1),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0, ceil_mode=1),
    dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER"),
])
def test_average_pool(attrs):
    _assert_matches_ort(*_single("AveragePool", _rand(1, 2, 6, 7), 19, **attrs))


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[2, 3], strides=[2, 2], pads=[0, 2, 1, 0], dilations=[2, 1], ceil_mode=1),
    dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER"),
])
def test_max_pool(attrs):
    _assert_matches_ort(*_single("MaxPool", _rand(1, 2, 7, 8), 13, **attrs))


@pytest.mark.parametrize("op_type", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("size,attrs,out_size", [
    (6, dict(kernel_shape=[3, 3], strides=[3, 3], pads=[0, 0, 2, 2], ceil_mode=1), 2),
    (5, dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1), 3),
])
def test_ceil_mode_drops_windows_that_start_in_end_padding(op_type, size, attrs, out_size):
    # onnx shape inference says one more; onnxruntime and torch drop that window
    module = _assert_matches_ort(*_single(op_type, _rand(1, 1, size, size), 19, **attrs))
    with torch.no_grad():
        assert module(torch.zeros(1, 1, size, size)).shape[-2:] == (out_size, out_size)


@pytest.mark.parametrize("x_shape,w_shape,attrs", [
    ((1, 4, 9), (6, 2, 3), dict(strides=[2], pads=[1, 2], group=2)),
    ((1, 3, 7, 8), (4, 3, 3, 2), dict(strides=[2, 3], pads=[2, 0, 1, 1], dilations=[1, 2])),
    ((1, 3, 7, 8), (4, 3, 3, 3), dict(strides=[2, 2], auto_pad="SAME_UPPER")),
    ((1, 3, 7, 8), (4, 3, 2, 2), dict(strides=[1, 1], auto_pad="SAME_LOWER")),
    ((1, 4, 7, 8), (4, 1, 3, 3), dict(auto_pad="VALID", group=4)),
])
def test_conv_geometry(x_shape, w_shape, attrs):
    _assert_matches_ort(*_single("Conv", _rand(*x_shape), 13, {"w": _rand(*w_shape, seed=1)}, **attrs))


def test_opset_dependent_inputs():
    x = _rand(2, 1, 3, 1)
    _assert_matches_ort(*_single("Clip", x, 6, min=-0.5, max=0.3))
    _assert_matches_ort(*_single("Clip", x, 11, {"min": _f32(-0.5).reshape(()), "max": None}))
    _assert_matches_ort(*_single("Squeeze", x, 11, axes=[1, -1]))
    _assert_matches_ort(*_single("Squeeze", x, 13, {"axes": _i64(1)}))
    _assert_matches_ort(*_single("Unsqueeze", x, 11, axes=[0, -1]))
    _assert_matches_ort(*_single("Unsqueeze", x, 13, {"axes": _i64(0, 5)}))
    _assert_matches_ort(*_single("ReduceMean", x, 13, axes=[2], keepdims=0))
    _assert_matches_ort(*_single("ReduceMean", x, 18, {"axes": _i64(0, 2)}))
    _assert_matches_ort(*_single("ReduceSum", x, 13, {"axes": _i64(-2)}, keepdims=0))
    _assert_matches_ort(*_single("ReduceMax", x, 18, {"axes": None}, keepdims=0))
    _assert_matches_ort(*_single("ReduceMin", x, 13, axes=[0, 2]))
    y = _rand(2, 3, 4)
    _assert_matches_ort(*_single("Softmax", y, 11, axis=1))  # coerced to 2-D before opset 13
    _assert_matches_ort(*_single("LogSoftmax", y, 13, axis=1))
    _assert_matches_ort(*_single("Slice", y, 13, {"starts": _i64(-1, 0), "ends": _i64(-100, 9), "axes": _i64(2, 1),
                                                  "steps": _i64(-2, 2)}))
    _assert_matches_ort(*_single("Slice", y, 9, starts=[1], ends=[100], axes=[2]))


def test_elementwise_and_shape_ops():
    x, w = _rand(3, 4), _rand(4, 5, seed=1)
    a = helper.make_node
    nodes = [
        a("Gemm", ["x", "w", "c"], ["gemm"], alpha=0.5, beta=2.0),
        a("Gemm", ["x", "x"], ["gemm_t"], transA=1),
        a("Gemm", ["w", "x"], ["gemm_tt"], transA=1, transB=1),
        a("MatMul", ["x", "w"], ["mm"]),
        a("PRelu", ["x", "slope"], ["prelu"]),
        a("LeakyRelu", ["x"], ["leaky"], alpha=0.2),
        a("HardSigmoid", ["x"], ["hsig"], alpha=0.3, beta=0.4),
        a("HardSwish", ["x"], ["hswish"]),
        a("Elu", ["x"], ["elu"], alpha=0.7),
        a("Softplus", ["x"], ["softplus"]),
        a("Abs", ["x"], ["abs"]), a("Exp", ["abs"], ["exp"]), a("Log", ["exp"], ["log"]), a("Sqrt", ["abs"], ["sqrt"]),
        a("Neg", ["x"], ["neg"]), a("Erf", ["x"], ["erf"]), a("Tanh", ["x"], ["tanh"]),
        a("Reciprocal", ["exp"], ["recip"]), a("Pow", ["abs", "two"], ["pow"]),
        a("Sub", ["x", "mm_row"], ["sub"]), a("Div", ["x", "exp"], ["div"]),
        a("Min", ["x", "neg", "tanh"], ["min"]), a("Max", ["x", "neg"], ["max"]),
        a("Floor", ["x"], ["floor"]), a("Ceil", ["x"], ["ceil"]),
        a("Shape", ["x"], ["shape"]), a("Shape", ["x"], ["shape_end"], start=-1),
        a("Size", ["x"], ["size"]),
        a("ConstantOfShape", ["shape"], ["zeros"], value=numpy_helper.from_array(_f32(1.5))),
        a("Range", ["r0", "r1", "r2"], ["range"]),
        a("Expand", ["slope", "shape"], ["expand"]),
        a("Tile", ["x", "reps"], ["tile"]),
        a("Cast", ["x"], ["as_int"], to=TensorProto.INT64),
        a("Mod", ["as_int", "three"], ["mod"]), a("Mod", ["x", "two"], ["fmod"], fmod=1),
        a("Equal", ["as_int", "zero"], ["eq"]), a("Not", ["eq"], ["neq"]),
        a("Less", ["x", "neg"], ["less"]), a("Greater", ["x", "neg"], ["greater"]),
        a("Where", ["less", "x", "neg"], ["where"]),
        a("Gather", ["x", "gidx"], ["gather"], axis=1),
        a("Gather", ["shape", "zero"], ["dim0"]),
        a("Unsqueeze", ["dim0", "zero_axes"], ["dim0_1d"]),
        a("Concat", ["dim0_1d", "minus_one"], ["new_shape"], axis=0),
        a("Reshape", ["tile", "new_shape"], ["reshaped"]),
        a("Reshape", ["x", "allow"], ["reshaped_zero"], allowzero=0),
        a("Transpose", ["x"], ["transposed"], perm=[1, 0]),
        a("Flatten", ["tile"], ["flat"], axis=0), a("Flatten", ["x4"], ["flat_neg"], axis=-1),
        a("Identity", ["x"], ["ident"]), a("Dropout", ["x"], ["drop"]),
        a("Constant", [], ["const"], value_floats=[1.0, 2.0, 3.0, 4.0]),
        a("Add", ["x", "const"], ["add_const"]),
        a("Sigmoid", ["x"], ["sig"]),
        a("GlobalMaxPool", ["x4"], ["gmax"]),
        a("GlobalAveragePool", ["x4"], ["gavg"]),
        a("BatchNormalization", ["x4", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], epsilon=1e-3),
    ]
    inits = {"w": w, "c": _rand(5, seed=2), "slope": _rand(4, seed=3), "two": _f32(2.0), "mm_row": _rand(4, seed=4),
             "r0": np.array(1, np.int64), "r1": np.array(10, np.int64), "r2": np.array(3, np.int64),
             "reps": _i64(2, 1), "three": np.array(3, np.int64), "zero": np.array(0, np.int64),
             "gidx": _i64(-1, 0), "zero_axes": _i64(0), "minus_one": _i64(-1), "allow": _i64(0, 2, -1),
             "bn_s": _rand(2, seed=5), "bn_b": _rand(2, seed=6), "bn_m": _rand(2, seed=7),
             "bn_v": np.abs(_rand(2, seed=8)) + 0.5}
    ints = {"shape", "shape_end", "size", "range", "as_int", "mod", "dim0", "dim0_1d", "new_shape"}
    bools = {"eq", "neq", "less", "greater"}
    outputs = {n.output[0]: TensorProto.INT64 if n.output[0] in ints else TensorProto.BOOL
               if n.output[0] in bools else TensorProto.FLOAT for n in nodes}
    feeds = {"x": x * 3, "x4": _rand(2, 2, 3, 3, seed=9)}
    _assert_matches_ort(_model(nodes, feeds, inits, outputs, 15), feeds)


def test_less_common_ops():
    a = helper.make_node
    nodes = [
        a("Gelu", ["x"], ["gelu"]), a("Gelu", ["x"], ["gelu_tanh"], approximate="tanh"),
        a("Mish", ["x"], ["mish"]), a("Softsign", ["x"], ["softsign"]), a("Selu", ["x"], ["selu"]),
        a("Sin", ["x"], ["sin"]), a("Cos", ["x"], ["cos"]), a("Round", ["x"], ["round"]), a("Sign", ["x"], ["sign"]),
        a("Sum", ["x", "x", "x"], ["sum"]), a("Mean", ["x", "sin"], ["mean"]),
        a("ArgMax", ["x"], ["argmax"], axis=1), a("ArgMin", ["x"], ["argmin"], axis=0, keepdims=0, select_last_index=1),
        a("Less", ["x", "sin"], ["lt"]), a("LessOrEqual", ["x", "round"], ["le"]),
        a("GreaterOrEqual", ["x", "round"], ["ge"]),
        a("And", ["lt", "le"], ["and"]), a("Or", ["lt", "ge"], ["or"]), a("Xor", ["le", "ge"], ["xor"]),
        a("CastLike", ["argmax", "x"], ["castlike"]),
        a("Cast", ["x"], ["as_int"], to=TensorProto.INT32), a("Div", ["as_int", "seven"], ["int_div"]),
    ]
    ints = {"argmax": TensorProto.INT64, "argmin": TensorProto.INT64, "as_int": TensorProto.INT32,
            "int_div": TensorProto.INT32, **{n: TensorProto.BOOL for n in ("lt", "le", "ge", "and", "or", "xor")}}
    outputs = {n.output[0]: ints.get(n.output[0], TensorProto.FLOAT) for n in nodes}
    feeds = {"x": np.round(_rand(4, 5) * 8) / 4 - 0.5}  # many values on .5 ties and repeated extremes
    _assert_matches_ort(_model(nodes, feeds, {"seven": np.array(-7, np.int32)}, outputs, 20), feeds)


def test_local_function_in_other_domain_is_inlined():
    swish = helper.make_function(
        "custom", "Swish", ["X"], ["Y"],
        [helper.make_node("Sigmoid", ["X"], ["s"]), helper.make_node("Mul", ["X", "s"], ["Y"])],
        [helper.make_opsetid("", 13)])
    nodes = [helper.make_node("Swish", ["x"], ["y"], domain="custom", name="swish")]
    feeds = {"x": _rand(2, 3)}
    model = _model(nodes, feeds, {}, {"y": TensorProto.FLOAT}, 13, [swish], [("custom", 1)])
    _assert_matches_ort(model, feeds)


# ---------------------------------------------------------------- partial runs, gradients, sharing

def test_run_returns_intermediates_and_runs_only_what_they_need(tmp_path):
    first = onnx.load(export_zoo_model("VGGStyle", tmp_path, 13, seed=0))
    second = onnx.load(export_zoo_model("ResNetStyle", tmp_path, 13, seed=1))
    merged = onnx.compose.merge_models(onnx.compose.add_prefix(first, "m0."), onnx.compose.add_prefix(second, "m1."),
                                       io_map=[])
    module = OnnxModule(merged)
    assert module.input_names == ["m0.input", "m1.input"]
    assert module.output_names == ["m0.logits", "m1.logits"]
    tap = next(n.output[0] for n in merged.graph.node if n.op_type == "Relu" and n.output[0].startswith("m1."))

    x = sample_input("ResNetStyle", batch=2)
    with torch.no_grad():
        # only m1's input is fed: m0's nodes must not run
        result = module.run({"m1.input": x}, outputs=["m1.logits", tap])
    tapped = onnx.ModelProto()
    tapped.CopyFrom(second)
    tapped.graph.output.append(helper.make_tensor_value_info(tap[len("m1."):], TensorProto.FLOAT, None))
    logits, relu = run_ort(tapped.SerializeToString(), {"input": x.numpy()})
    assert set(result) == {"m1.logits", tap}
    np.testing.assert_allclose(result["m1.logits"].numpy(), logits, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(result[tap].numpy(), relu, rtol=RTOL, atol=ATOL)
    assert result[tap].shape == (2, 16, 32, 32)


def test_gradients_reach_every_initializer_parameter(tmp_path):
    module = import_onnx(export_zoo_model("ResNetStyle", tmp_path, 13, fold_constants=False))
    params = module.onnx_params
    assert all(isinstance(p, torch.nn.Parameter) for p in params.values())
    assert {p.dtype for p in params.values()} == {torch.float32}
    assert len(params) == len(list(module.parameters()))
    module(sample_input("ResNetStyle")).square().sum().backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_shared_initializer_is_one_parameter():
    feeds = {"x": _rand(2, 4)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["y"])]
    w = _rand(4, 4, seed=1)
    module = _assert_matches_ort(_model(nodes, feeds, {"w": w}, {"y": TensorProto.FLOAT}, 13), feeds)
    assert len(list(module.parameters())) == 1
    x = torch.from_numpy(feeds["x"])
    module(x).sum().backward()
    reference = torch.from_numpy(w).requires_grad_()
    (x @ reference @ reference).sum().backward()
    torch.testing.assert_close(module.onnx_params["w"].grad, reference.grad)


def test_integer_initializers_are_buffers(tmp_path):
    module = import_onnx(export_zoo_model("ResNetStyle", tmp_path, 13, fold_constants=False))
    assert all(not b.is_floating_point() for b in module.constants.buffers())
    assert len(list(module.constants.buffers())) > 0


# ---------------------------------------------------------------- write-back

def test_write_back_round_trip(tmp_path):
    path = export_zoo_model("VGGStyle", tmp_path, 13)
    original = onnx.load(path)
    module = OnnxModule(original)
    x = sample_input("VGGStyle")
    before = run_ort(path, {"input": x.numpy()})[0]
    head_bias = [n for n in original.graph.node if n.op_type == "Gemm"][-1].input[2]
    with torch.no_grad():
        module.onnx_params[head_bias].add_(1.0)
    written = module.write_back(original)
    after = run_ort(written.SerializeToString(), {"input": x.numpy()})[0]
    np.testing.assert_allclose(after, before + 1.0, rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), after, rtol=RTOL, atol=ATOL)
    assert len(original.graph.initializer) == len(written.graph.initializer)
    untouched = next(i for i in original.graph.initializer if i.name != head_bias)
    np.testing.assert_array_equal(numpy_helper.to_array(untouched),
                                  numpy_helper.to_array(next(i for i in written.graph.initializer
                                                             if i.name == untouched.name)))


def test_write_back_keeps_fp16_initializers_fp16():
    feeds = {"x": _rand(2, 3)}
    nodes = [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    w16 = _rand(3, 4, seed=1).astype(np.float16)
    model = _model(nodes, feeds, {"w16": w16}, {"y": TensorProto.FLOAT}, 13)
    module = _assert_matches_ort(model, feeds)
    param = module.onnx_params["w16"]
    assert param.dtype == torch.float32
    with torch.no_grad():
        param.mul_(2.0).add_(1e-4)  # a change below fp16 resolution must round like ORT sees it
    written = module.write_back(model)
    stored = next(i for i in written.graph.initializer if i.name == "w16")
    assert stored.data_type == TensorProto.FLOAT16
    np.testing.assert_array_equal(numpy_helper.to_array(stored), param.detach().numpy().astype(np.float16))
    expected = run_ort(written.SerializeToString(), feeds)[0]
    np.testing.assert_allclose(_torch_outputs(module, feeds, ["y"])[0], expected, rtol=RTOL, atol=ATOL)
    # Trained past float16's range, the value would be written as inf: refused, naming it.
    with torch.no_grad():
        param[0, 0] = 7e4
    with pytest.raises(NeuralMergeError, match="initializer 'w16' now holds values up to 70000, beyond float16's range"):
        module.write_back(model)


# ---------------------------------------------------------------- ai.neuralmerge E-layers (docs/format.md)

def _const_ints(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64)))


def _econv_function() -> onnx.FunctionProto:
    conv = helper.make_node("Conv", ["X", "W", "B"], ["Y"])
    conv.attribute.extend(helper.make_attribute_ref(a, t) for a, t in [
        ("strides", onnx.AttributeProto.INTS), ("pads", onnx.AttributeProto.INTS),
        ("dilations", onnx.AttributeProto.INTS), ("group", onnx.AttributeProto.INT)])
    body = [
        helper.make_node("Cast", ["codes"], ["codes64"], to=TensorProto.INT64),
        helper.make_node("Add", ["codes64", "offsets"], ["idx"]),
        helper.make_node("Cast", ["codebook"], ["book"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["book", "idx"], ["vec"], axis=0),
        _const_ints("flat_shape", [0, 0, 0, -1]),
        helper.make_node("Reshape", ["vec", "flat_shape"], ["flat"]),
        _const_ints("zero", [0]), _const_ints("axis3", [3]),
        helper.make_node("Slice", ["flat", "zero", "depth", "axis3"], ["w"]),
        helper.make_node("Transpose", ["w"], ["W"], perm=[0, 3, 1, 2]),
        conv,
    ]
    return helper.make_function("ai.neuralmerge", "EConv", ["X", "codebook", "codes", "offsets", "depth", "B"], ["Y"],
                                body, [helper.make_opsetid("", 17)], ["strides", "pads", "dilations", "group"])


def _egemm_function() -> onnx.FunctionProto:
    body = [
        helper.make_node("Cast", ["codes"], ["codes64"], to=TensorProto.INT64),
        helper.make_node("Add", ["codes64", "offsets"], ["idx"]),
        helper.make_node("Cast", ["codebook"], ["book"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["book", "idx"], ["vec"], axis=0),
        _const_ints("flat_shape", [0, -1]),
        helper.make_node("Reshape", ["vec", "flat_shape"], ["flat"]),
        _const_ints("zero", [0]), _const_ints("axis1", [1]),
        helper.make_node("Slice", ["flat", "zero", "depth", "axis1"], ["W"]),
        helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["X", "Wt"], ["XW"]),
        helper.make_node("Add", ["XW", "B"], ["Y"]),
    ]
    return helper.make_function("ai.neuralmerge", "EGemm", ["X", "codebook", "codes", "offsets", "depth", "B"], ["Y"],
                                body, [helper.make_opsetid("", 17)], [])


def _merged_e_model(codebook_dtype) -> onnx.ModelProto:
    """conv A (d=4, rho=2) and conv B (d=6, rho=3) share one r=2 codebook; an EGemm has its own r=5 one."""
    rng = np.random.default_rng(0)
    inits = {
        "nm.g0.codebook": rng.standard_normal((24, 2)).astype(codebook_dtype),  # segments own rows 0-7, 8-15, 16-23
        "m0.a.codes": rng.integers(0, 8, (6, 3, 3, 2)).astype(np.uint8), "m0.a.offsets": _i64(0, 8),
        "m0.a.depth": _i64(4), "m0.a.bias": rng.standard_normal(6).astype(np.float32),
        "m0.b.codes": rng.integers(0, 8, (5, 3, 3, 3)).astype(np.uint16), "m0.b.offsets": _i64(0, 8, 16),
        "m0.b.depth": _i64(6), "m0.b.bias": rng.standard_normal(5).astype(np.float32),
        "nm.g1.codebook": rng.standard_normal((36, 5)).astype(codebook_dtype),
        "m0.fc.codes": rng.integers(0, 4, (7, 9)).astype(np.uint8), "m0.fc.offsets": np.arange(9, dtype=np.int64) * 4,
        "m0.fc.depth": _i64(45), "m0.fc.bias": rng.standard_normal(7).astype(np.float32),
    }
    nodes = [
        helper.make_node("EConv", ["x", "nm.g0.codebook", "m0.a.codes", "m0.a.offsets", "m0.a.depth", "m0.a.bias"],
                         ["a"], name="m0.a", domain="ai.neuralmerge", strides=[1, 1], pads=[1, 1, 1, 1],
                         dilations=[1, 1], group=1),
        helper.make_node("Relu", ["a"], ["a_relu"]),
        helper.make_node("EConv", ["a_relu", "nm.g0.codebook", "m0.b.codes", "m0.b.offsets", "m0.b.depth",
                                   "m0.b.bias"], ["b"], name="m0.b", domain="ai.neuralmerge", strides=[2, 2],
                         pads=[0, 1, 1, 0], dilations=[1, 1], group=1),
        helper.make_node("Flatten", ["b"], ["flat"]),
        helper.make_node("EGemm", ["flat", "nm.g1.codebook", "m0.fc.codes", "m0.fc.offsets", "m0.fc.depth",
                                   "m0.fc.bias"], ["y"], name="m0.fc", domain="ai.neuralmerge"),
    ]
    feeds = {"x": _rand(2, 4, 6, 6)}
    model = _model(nodes, feeds, inits, {"y": TensorProto.FLOAT}, 17, [_econv_function(), _egemm_function()],
                   [("ai.neuralmerge", 1)], output_shape=[2, 7])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("codebook_dtype", [np.float32, np.float16])
def test_neuralmerge_functions_import_as_e_layers(codebook_dtype):
    model = _merged_e_model(codebook_dtype)
    feeds = {"x": _rand(2, 4, 6, 6)}
    module = _assert_matches_ort(model, feeds)
    convs = [m for m in module.modules() if isinstance(m, EConv2d)]
    linears = [m for m in module.modules() if isinstance(m, ELinear)]
    assert len(convs) == 2 and len(linears) == 1
    shared = module.onnx_params["nm.g0.codebook"]
    assert convs[0].codebook is shared and convs[1].codebook is shared
    assert linears[0].codebook is module.onnx_params["nm.g1.codebook"]
    assert convs[1].bias is module.onnx_params["m0.b.bias"]
    assert len(list(module.parameters())) == 5  # two codebooks and three biases
    # the codebook's gradient is the sum over both layers that use it
    module(torch.from_numpy(feeds["x"])).sum().backward()
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    # a trained codebook goes back into the file in its stored type
    with torch.no_grad():
        shared.mul_(0.5)
    written = module.write_back(model)
    stored = next(i for i in written.graph.initializer if i.name == "nm.g0.codebook")
    assert stored.data_type == helper.np_dtype_to_tensor_dtype(np.dtype(codebook_dtype))
    expected = run_ort(written.SerializeToString(), feeds)[0]
    np.testing.assert_allclose(_torch_outputs(module, feeds, ["y"])[0], expected, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("domain", ["", "com.example"])
def test_unsupported_op_fails_at_construction_in_one_line(domain):
    feeds = {"x": _rand(2)}
    model = _model([helper.make_node("Foo", ["x"], ["y"], name="bar", domain=domain)], feeds, {},
                   {"y": TensorProto.FLOAT}, 13, extra_opsets=[(domain, 1)] if domain else [])
    with pytest.raises(UnsupportedOpError) as info:
        OnnxModule(model)
    message = str(info.value)
    assert "'Foo'" in message and "'bar'" in message and "\n" not in message and len(message) < 200
    assert (f"'{domain}'" in message) == bool(domain)


def test_unsupported_attribute_value_fails_at_construction():
    model, _ = _single("Resize", _rand(1, 1, 2, 2), 13, {"roi": None, "scales": _f32(1, 1, 2, 2)}, mode="cubic")
    with pytest.raises(UnsupportedOpError, match=r"'Resize' \(node 'node'\): mode 'cubic'"):
        OnnxModule(model)


def test_missing_or_corrupt_file_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        import_onnx(tmp_path / "absent.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08garbage\xff\xff")
    with pytest.raises(ModelLoadError, match="cannot parse ONNX file"):
        import_onnx(corrupt)


def test_nodes_out_of_order_are_sorted(tmp_path):
    model = onnx.load(export_zoo_model("YoloStyle", tmp_path, 13, fold_constants=False))
    nodes = list(model.graph.node)
    nodes.reverse()
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    x = sample_input("YoloStyle")
    with torch.no_grad():
        np.testing.assert_allclose(OnnxModule(model)(x).numpy(), build_model("YoloStyle")(x).numpy(),
                                   rtol=1e-3, atol=1e-5)
