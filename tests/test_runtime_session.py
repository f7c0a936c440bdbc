"""neuralmerge.runtime.Session against stock onnxruntime on merged models, feeds, and the CLI."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import neuralmerge
import neuralmerge.cli as cli
from neuralmerge.errors import ConfigError
from neuralmerge.runtime import FeedError, ModelError, Session, pack_model
from neuralmerge.runtime.bench import interleaved_ms
from neuralmerge.runtime.cli_runtime import bench_cmd, pack_cmd, run_cmd
from neuralmerge.zoo.architectures import LeNet, MobileNetStyle, ResNetStyle, VGGStyle
from neuralmerge.zoo.train import export_onnx


def ort_outputs(model, feeds: dict) -> dict:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def assert_parity(model: onnx.ModelProto, feeds: dict, lut: str = "fp32", rtol: float = 1e-4, threads: int = 1) -> dict:
    got = Session(pack_model(model), lut=lut, threads=threads).run(feeds)
    want = ort_outputs(model, feeds)
    assert got.keys() == want.keys()
    for name in want:
        scale = np.abs(want[name]).max()
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=rtol * scale, err_msg=name)
    return got


@pytest.fixture(scope="module")
def lenet_sources(tmp_path_factory) -> tuple[Path, Path]:
    """Two untrained LeNets (10 and 20 classes, 16x16 inputs) as ONNX files."""
    tmp = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    a = export_onnx(LeNet(10, image_size=16), tmp / "a.onnx", (1, 16, 16))
    b = export_onnx(LeNet(20, image_size=16), tmp / "b.onnx", (1, 16, 16))
    return a, b


@pytest.fixture(scope="module")
def merged(tmp_path_factory, lenet_sources) -> dict[str, onnx.ModelProto]:
    """Merged models built by the real pipeline: a LeNet pair and three single-model compressions."""
    tmp = tmp_path_factory.mktemp("merged")
    out = {}  # torch's generator continues from lenet_sources' seed
    out["lenet_pair"] = neuralmerge.merge([str(p) for p in lenet_sources], quiet=True, fidelity_samples=2).model
    for name, net in [("vgg", VGGStyle(10, image_size=16)), ("resnet", ResNetStyle(10)),
                      ("mobilenet", MobileNetStyle(10))]:
        net.eval()
        path = export_onnx(net, tmp / f"{name}.onnx", (3, 16, 16))
        out[name] = neuralmerge.merge([str(path)], quiet=True, fidelity_samples=2).model
    return out


def feeds_for(model: onnx.ModelProto, batch: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d.dim_value or batch for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["lenet_pair", "vgg", "resnet", "mobilenet"])
def test_fp32_matches_onnxruntime(merged, name, threads):
    model = merged[name]
    assert any(n.op_type == "EConv" for n in model.graph.node)
    for batch in (2, 1):  # a new batch size re-plans
        assert_parity(model, feeds_for(model, batch), threads=threads)


def test_lower_precisions_stay_close(merged):
    model = merged["lenet_pair"]
    feeds = feeds_for(model, 64, seed=3)
    want = ort_outputs(model, feeds)
    for lut, bound in (("fp16", 2e-3), ("int16", 2e-3), ("int8", 0.1)):
        got = Session(pack_model(model), lut=lut).run(feeds)
        for name in want:
            rel = np.linalg.norm(got[name] - want[name]) / np.linalg.norm(want[name])
            assert rel < bound, (lut, name, rel)


def test_int8_top1_agreement_with_fp32(merged):
    model = merged["lenet_pair"]
    feeds = feeds_for(model, 200, seed=4)
    fp32 = Session(pack_model(model), lut="fp32").run(feeds)
    int8 = Session(pack_model(model), lut="int8").run(feeds)
    agreement = {k: float((fp32[k].argmax(1) == int8[k].argmax(1)).mean()) for k in fp32}
    print("int8 top-1 agreement with fp32:", agreement)
    assert min(agreement.values()) >= 0.9


def test_one_task_alone(merged):
    model = merged["lenet_pair"]
    session = Session(pack_model(model))
    assert [s.name for s in session.inputs] == ["m0.input", "m1.input"]
    assert session.outputs[1].name == "m1.logits" and session.outputs[1].shape == (None, 20)
    assert session.inputs[0].shape == (None, 1, 16, 16) and session.inputs[0].dtype == "float32"
    feeds = feeds_for(model, 3)
    alone = session.run({"m1.input": feeds["m1.input"]}, outputs=["m1.logits"])
    assert list(alone) == ["m1.logits"]
    np.testing.assert_array_equal(alone["m1.logits"], session.run(feeds)["m1.logits"])


def test_relu_is_folded_only_where_nothing_else_reads_the_layer_output(merged):
    # The session folds a Relu into the E-layer before it; with the layer's own output also a
    # graph output, that output must keep its negative values (no fold there).
    model = onnx.ModelProto()
    model.CopyFrom(merged["lenet_pair"])
    consumers = {name: node.op_type for node in model.graph.node for name in node.input}
    layer = next(node for node in model.graph.node
                 if node.op_type == "EConv" and consumers.get(node.output[0]) == "Relu")
    model.graph.output.append(helper.make_tensor_value_info(layer.output[0], TensorProto.FLOAT, ["n", "c", "h", "w"]))
    lines = Session(pack_model(model)).kernels()
    assert any(line.startswith(layer.name + ":") and not line.endswith("+ Relu") for line in lines)
    assert sum(line.endswith("+ Relu") for line in lines) == 5  # the other conv1, both conv2, both fc1
    feeds = feeds_for(model, batch=2)
    for lut in ("fp32", "int8"):
        got = assert_parity(model, feeds, lut=lut, rtol=1e-4 if lut == "fp32" else 0.1)
        assert (got[layer.output[0]] < 0).any()
        for name, value in got.items():
            if name != layer.output[0]:
                np.testing.assert_array_equal(value, Session(pack_model(merged["lenet_pair"]), lut=lut).run(feeds)[name])


def test_onnx_path_and_nmpack_path_agree(merged, tmp_path):
    model = merged["resnet"]
    onnx.save(model, tmp_path / "m.onnx")
    (tmp_path / "m.nmpack").write_bytes(pack_model(model))
    feeds = feeds_for(model, 1)
    a = Session(tmp_path / "m.onnx").run(feeds)["logits"]
    b = Session(str(tmp_path / "m.nmpack")).run(feeds)["logits"]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("feeds, words", [
    ({"nope": np.zeros((1, 1, 16, 16), np.float32)}, "unknown input 'nope'"),
    ({"m0.input": np.zeros((1, 1, 16, 16), np.float64)}, "float32"),
    ({"m0.input": np.zeros((1, 16, 16), np.float32)}, "rank 4"),
    ({"m0.input": np.zeros((1, 1, 16, 17), np.float32)}, "shape"),
    ({"m0.input": np.zeros((0, 1, 16, 16), np.float32)}, "empty"),
    ({"m0.input": [[1.0]]}, "numpy array"),
    # max-pooling and the fused ReLUs would turn these into a plausible answer
    ({"m0.input": np.full((1, 1, 16, 16), np.nan, np.float32)}, "NaN or infinite"),
    ({"m0.input": np.pad(np.full((1, 1, 1, 1), -np.inf, np.float32), ((0, 0), (0, 0), (7, 8), (3, 12)))},
     "NaN or infinite"),
])
def test_bad_feeds(merged, feeds, words):
    session = Session(pack_model(merged["lenet_pair"]))
    with pytest.raises(FeedError, match=words):
        session.run(feeds, outputs=["m0.logits"])


def test_missing_feed_and_unknown_output(merged):
    session = Session(pack_model(merged["lenet_pair"]))
    with pytest.raises(FeedError, match="missing feed for input 'm1.input'"):
        session.run({"m0.input": np.zeros((1, 1, 16, 16), np.float32)})
    with pytest.raises(FeedError, match="unknown output 'm2.logits'"):
        session.run({"m0.input": np.zeros((1, 1, 16, 16), np.float32)}, outputs=["m2.logits"])


@pytest.mark.parametrize("outputs", [[], [None], [0]])
def test_outputs_must_be_output_names(merged, outputs):
    session = Session(pack_model(merged["lenet_pair"]))
    with pytest.raises(FeedError, match="outputs must be a non-empty list of output names"):
        session.run({"m0.input": np.zeros((1, 1, 16, 16), np.float32)}, outputs=outputs)
    with pytest.raises(FeedError, match="output must be an output name"):
        session.inputs_needed(None)


def test_model_paths_that_are_not_model_files(merged, tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "m.nmpack").write_bytes(pack_model(merged["lenet_pair"]))
    for path, words in [(tmp_path / "empty.onnx", "is empty"), (tmp_path, "is a directory"), ("", "empty path"),
                        (tmp_path / "nope.onnx", "no such model file")]:
        with pytest.raises(ModelError, match=words):
            Session(path)
    with pytest.raises(ModelError, match="is already a .nmpack file"):
        pack_model(tmp_path / "m.nmpack")


def test_cli_run_writes_outputs_whatever_their_names(tmp_path):
    # np.savez(f, **outputs) took an output named 'file' or 'allow_pickle' for its own arguments.
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["file"]), helper.make_node("Neg", ["x"], ["allow_pickle"])],
                              "names", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("file", "allow_pickle")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    np.save(tmp_path / "x.npy", x)
    result = CliRunner().invoke(run_cmd, [str(tmp_path / "m.onnx"), "--input", f"x={tmp_path / 'x.npy'}",
                                          "-o", str(tmp_path / "out.npz")])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_array_equal(out["file"], np.maximum(x, 0))
        np.testing.assert_array_equal(out["allow_pickle"], -x)


def test_non_contiguous_feed_is_accepted(merged):
    model = merged["vgg"]
    x = feeds_for(model, 2)["input"]
    strided = np.asfortranarray(x)
    got = Session(pack_model(model)).run({"input": strided})["logits"]
    np.testing.assert_allclose(got, ort_outputs(model, {"input": x})["logits"], rtol=1e-4, atol=1e-5)


def test_independent_tasks_side_by_side_match_onnxruntime(merged):
    """With 2 threads the two models of a merged pair are independent tasks. The first runs try
    them one after the other (ops split over the threads) and side by side (one thread each),
    then keep the faster way; every run must agree with onnxruntime."""
    model = merged["lenet_pair"]
    session = Session(pack_model(model), threads=2)
    feeds = feeds_for(model, 2)
    want = ort_outputs(model, feeds)
    for _ in range(10):  # warm-up, 3 trials each way, then the chosen way
        got = session.run(feeds)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4 * np.abs(want[name]).max())
    one = session.run({k: v for k, v in feeds.items() if k == model.graph.input[1].name},
                      outputs=[model.graph.output[1].name])
    np.testing.assert_allclose(one[model.graph.output[1].name], want[model.graph.output[1].name], rtol=1e-4,
                               atol=1e-4 * np.abs(want[model.graph.output[1].name]).max())


def two_conv_tasks() -> onnx.ModelProto:
    """Two independent EConv 16->32 3x3 layers (r=4, 16 codewords per segment) on 32x32 inputs:
    enough work that a layer's strips differ between 1 thread and 2."""
    from neuralmerge.export.functions import DOMAIN, econv_function

    rng = np.random.default_rng(5)
    nodes, inits, inputs, outputs = [], [], [], []
    for t in range(2):
        inits += [numpy_helper.from_array(rng.standard_normal((64, 4)).astype(np.float32), f"cb{t}"),
                  numpy_helper.from_array(rng.integers(0, 16, (32, 3, 3, 4)).astype(np.uint8), f"codes{t}"),
                  numpy_helper.from_array(np.arange(4, dtype=np.int64) * 16, f"offsets{t}"),
                  numpy_helper.from_array(np.array([16], np.int64), f"depth{t}"),
                  numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), f"bias{t}")]
        nodes.append(helper.make_node("EConv", [f"x{t}", f"cb{t}", f"codes{t}", f"offsets{t}", f"depth{t}", f"bias{t}"],
                                      [f"y{t}"], name=f"conv{t}", domain=DOMAIN, strides=[1, 1], pads=[1, 1, 1, 1],
                                      dilations=[1, 1], group=1))
        inputs.append(helper.make_tensor_value_info(f"x{t}", TensorProto.FLOAT, [1, 16, 32, 32]))
        outputs.append(helper.make_tensor_value_info(f"y{t}", TensorProto.FLOAT, [1, 32, 32, 32]))
    graph = helper.make_graph(nodes, "two_tasks", inputs, outputs, inits)
    return helper.make_model(graph, functions=[econv_function(17)], ir_version=8,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


def test_tasks_side_by_side_match_one_thread_on_layers_split_by_rows():
    # Side by side, each layer runs on 1 thread where the session otherwise splits it over 2,
    # with other strips: a layer's cached table offsets must follow (they once followed the input
    # shape alone, and the side-by-side runs read the tables at the 2-thread offsets).
    packed = pack_model(two_conv_tasks())
    feeds = feeds_for(two_conv_tasks(), 1)
    want = Session(packed, threads=1).run(feeds)
    session = Session(packed, threads=2)
    for _ in range(10):  # warm-up, 3 trials each way, then the chosen way
        got = session.run(feeds)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5 * np.abs(want[name]).max())


def op_zoo_model() -> onnx.ModelProto:
    """A graph with the dense ops of the supported subset that the zoo models do not all cover."""
    rng = np.random.default_rng(0)
    const = lambda name, a: numpy_helper.from_array(np.asarray(a), name)  # noqa: E731
    inits = [
        const("w", rng.standard_normal((4, 2, 3, 3)).astype(np.float32)), const("wb", rng.standard_normal(4).astype(np.float32)),
        const("scale", rng.random(4).astype(np.float32) + 0.5), const("bias", rng.standard_normal(4).astype(np.float32)),
        const("mean", rng.standard_normal(4).astype(np.float32)), const("var", rng.random(4).astype(np.float32) + 0.5),
        const("chan", rng.standard_normal((1, 4, 1, 1)).astype(np.float32)), const("two", np.array(2.0, np.float32)),
        const("lo", np.array(-0.5, np.float32)), const("hi", np.array(0.7, np.float32)),
        const("shape", np.array([0, -1], np.int64)), const("gw", rng.standard_normal((5, 96)).astype(np.float32)),
        const("gb", rng.standard_normal(5).astype(np.float32)), const("mw", rng.standard_normal((4, 3)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "wb"], ["c"], kernel_shape=[3, 3], pads=[1, 0, 2, 1], strides=[2, 1], group=1),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("LeakyRelu", ["bn"], ["lr"], alpha=0.1),
        helper.make_node("Mul", ["lr", "chan"], ["mc"]),
        helper.make_node("Div", ["mc", "two"], ["dv"]),
        helper.make_node("Sub", ["chan", "dv"], ["sb"]),
        helper.make_node("AveragePool", ["sb"], ["ap"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                         ceil_mode=1, count_include_pad=1),
        helper.make_node("AveragePool", ["sb"], ["ap2"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
        helper.make_node("MaxPool", ["sb"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["ap", "mp"], ["cat"], axis=1),
        helper.make_node("Clip", ["cat", "lo", "hi"], ["cl"]),
        helper.make_node("Sigmoid", ["cl"], ["sg"]),
        helper.make_node("Transpose", ["sg"], ["tr"], perm=[0, 2, 3, 1]),
        helper.make_node("Tanh", ["tr"], ["th"]),
        helper.make_node("HardSigmoid", ["th"], ["hs"], alpha=0.3, beta=0.4),
        helper.make_node("Reshape", ["hs", "shape"], ["flat"]),
        helper.make_node("Shape", ["flat"], ["fs"]),
        helper.make_node("GlobalMaxPool", ["ap2"], ["gm"]),
        helper.make_node("Flatten", ["gm"], ["gmf"], axis=1),
        helper.make_node("MatMul", ["gmf", "mw"], ["g2"]),
        helper.make_node("Softmax", ["g2"], ["y2"], axis=-1),
        helper.make_node("Identity", ["flat"], ["flat2"]),
        helper.make_node("Gemm", ["flat2", "gw", "gb"], ["g"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("HardSwish", ["g"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 9, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5]),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("batch", [1, 3])  # batch 1: Gemm and MatMul run as sgemv
def test_dense_op_subset_matches_onnxruntime(batch):
    model = op_zoo_model()
    x = np.random.default_rng(5).standard_normal((batch, 2, 9, 8)).astype(np.float32)
    assert_parity(model, {"x": x}, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_dense_ops_split_over_threads_match_onnxruntime(threads, batch):
    """Conv and MatMul large enough to be split over the worker pool (by output channel / column; the
    MatMul has 8448 x 130 > 2**20 multiply-adds even at batch 1)."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             [("w", (33, 16, 3, 3)), ("wb", (33,)), ("g1", (33 * 16 * 16, 130)), ("g2", (61, 130)), ("g2b", (61,))]]
    nodes = [helper.make_node("Conv", ["x", "w", "wb"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("MatMul", ["f", "g1"], ["m"]),
             helper.make_node("Transpose", ["m"], ["mt"], perm=[1, 0]),
             helper.make_node("Gemm", ["mt", "g2", "g2b"], ["y"], transA=1, transB=1)]
    graph = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 61])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((batch, 16, 32, 32)).astype(np.float32)
    assert_parity(model, {"x": x}, rtol=1e-4, threads=threads)


@pytest.mark.parametrize("kernel, strides, pads, dilations", [
    ((3, 3), (1, 1), (2, 3, 1, 0), (2, 3)),  # rows copied whole, clipped at both ends
    ((3, 2), (1, 2), (0, 5, 1, 4), (1, 2)),  # strided, outputs reading only padding
    ((1, 4), (2, 3), (1, 0, 0, 2), (1, 1)),
    ((5, 5), (1, 1), (0, 0, 0, 0), (1, 1)),
])
def test_dense_conv_geometries_match_onnxruntime(kernel, strides, pads, dilations):
    # im2col copies the part of each row that lies inside the input and zero-fills the rest.
    rng = np.random.default_rng(sum(kernel) + sum(pads))
    w = rng.standard_normal((5, 3, *kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=list(kernel), strides=list(strides),
                            pads=list(pads), dilations=list(dilations))
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 11])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model = onnx.shape_inference.infer_shapes(model)
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    assert_parity(model, {"x": rng.standard_normal((2, 3, 9, 11)).astype(np.float32)}, rtol=1e-5)


def test_unsupported_op_is_refused_at_load():
    graph = helper.make_graph([helper.make_node("Hardmax", ["x"], ["y"], name="hardmax1")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match=r"op 'Hardmax' \(node 'hardmax1'\) is not supported by the neuralmerge runtime; "
                                         r"run this file with onnxruntime.InferenceSession"):
        Session(pack_model(model))


def test_cli_pack_and_run(merged, tmp_path):
    onnx.save(merged["lenet_pair"], tmp_path / "m.onnx")
    x = feeds_for(merged["lenet_pair"], 2)["m1.input"]
    np.save(tmp_path / "x.npy", x)
    runner = CliRunner()
    result = runner.invoke(pack_cmd, [str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.nmpack")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(run_cmd, [str(tmp_path / "m.nmpack"), "--input", f"m1.input={tmp_path / 'x.npy'}",
                                     "--output", "m1.logits", "--lut", "int8", "-o", str(tmp_path / "out.npz")])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "out.npz") as out:
        assert out["m1.logits"].shape == (2, 20)
    # A bad feed: one error line, exit 1, and no output file left behind.
    np.save(tmp_path / "bad.npy", x.astype(np.float64))
    result = runner.invoke(run_cmd, [str(tmp_path / "m.nmpack"), "--input", f"m1.input={tmp_path / 'bad.npy'}",
                                     "--output", "m1.logits", "-o", str(tmp_path / "bad.npz")])
    assert result.exit_code == 1 and result.output.startswith("error: input 'm1.input' must have dtype float32")
    assert not (tmp_path / "bad.npz").exists()
    assert cli.main is not None  # the runtime commands reuse neuralmerge.cli's error convention


def test_cli_run_computes_the_outputs_its_inputs_feed(merged, tmp_path):
    """`neuralmerge run merged.onnx --input m0.input=xa.npy` (the runtime issue's example) runs task 0."""
    onnx.save(merged["lenet_pair"], tmp_path / "m.onnx")
    feeds = feeds_for(merged["lenet_pair"], 2)
    np.save(tmp_path / "x.npy", feeds["m0.input"])
    session = Session(str(tmp_path / "m.onnx"))
    assert session.inputs_needed("m0.logits") == ["m0.input"]
    assert session.inputs_needed("m1.logits") == ["m1.input"]
    with pytest.raises(FeedError, match=r"no output named 'nope' \(outputs: m0.logits, m1.logits\)"):
        session.inputs_needed("nope")
    runner = CliRunner()
    result = runner.invoke(run_cmd, [str(tmp_path / "m.onnx"), "--input", f"m0.input={tmp_path / 'x.npy'}",
                                     "-o", str(tmp_path / "out.npz")])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "out.npz") as out:
        assert list(out) == ["m0.logits"]
        np.testing.assert_allclose(out["m0.logits"], session.run(feeds, outputs=["m0.logits"])["m0.logits"])
    result = runner.invoke(run_cmd, [str(tmp_path / "m.onnx"), "-o", str(tmp_path / "none.npz")])
    assert result.exit_code == 1
    assert result.output == "error: the given inputs compute no output: m0.logits needs m0.input (--input NAME=FILE.npy)\n"
    assert not (tmp_path / "none.npz").exists()
    # A misspelt name alone is named as such, not as an input that computes nothing.
    result = runner.invoke(run_cmd, [str(tmp_path / "m.onnx"), "--input", f"m0.image={tmp_path / 'x.npy'}"])
    assert result.exit_code == 1
    assert result.output == "error: unknown input 'm0.image'; the model's inputs are: m0.input, m1.input\n"


def test_calibrated_int8_ranges_are_used_as_quantisation_steps(tmp_path):
    """Calibration records each E-layer's largest |input| (neuralmerge.int8_scales); the runtime must
    turn it into a quantisation step. Reading the range as the step quantised every activation to
    0 or 1 and broke the int8 path (digits 83%, sound 40% agreement on the demo pair)."""
    torch.manual_seed(0)
    a = export_onnx(LeNet(10, image_size=16), tmp_path / "a.onnx", (1, 16, 16), input_name="xa", output_name="ya")
    b = export_onnx(LeNet(6, image_size=16), tmp_path / "b.onnx", (1, 16, 16), input_name="xb", output_name="yb")
    rng = np.random.default_rng(0)
    calib = [tmp_path / "ca.npy", tmp_path / "cb.npy"]
    for path in calib:
        np.save(path, rng.standard_normal((96, 1, 16, 16)).astype(np.float32))
    neuralmerge.merge([a, b], tmp_path / "m.onnx", r=4, codewords=64, calib=calib, calibration={"epochs": 1},
                      quiet=True)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert "neuralmerge.int8_scales" in props
    feeds = {"xa": rng.standard_normal((16, 1, 16, 16)).astype(np.float32),
             "xb": rng.standard_normal((16, 1, 16, 16)).astype(np.float32)}
    exact = Session(str(tmp_path / "m.onnx"), lut="fp32").run(feeds)
    quantised = Session(str(tmp_path / "m.onnx"), lut="int8").run(feeds)
    for name in ("ya", "yb"):
        error = np.linalg.norm(quantised[name] - exact[name]) / np.linalg.norm(exact[name])
        assert error < 0.05, (name, error)


def test_int8_ranges_too_small_to_invert_fall_back_to_each_calls_range(merged):
    """A recorded range whose step 1/step overflows (an E-layer input that was ~0 throughout
    calibration) is packed as 0, each call's own range, instead of making the file unloadable."""
    model = onnx.ModelProto()
    model.CopyFrom(merged["lenet_pair"])
    nodes = [n.name for n in model.graph.node if n.domain == "ai.neuralmerge"]
    tiny = onnx.StringStringEntryProto(key="neuralmerge.int8_scales", value=json.dumps({n: 1e-35 for n in nodes}))
    props = [p for p in model.metadata_props if p.key != "neuralmerge.int8_scales"]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    reference = Session(pack_model(model), lut="int8")  # no recorded ranges at all
    model.metadata_props.append(tiny)
    feeds = feeds_for(model, 2)
    got, expected = Session(pack_model(model), lut="int8").run(feeds), reference.run(feeds)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_profile_times_every_node_of_every_run(merged):
    model = merged["lenet_pair"]
    names = {node.name for node in model.graph.node}
    feeds = feeds_for(model, 1)
    for threads in (1, 2):  # with 2 threads the two tasks may run side by side
        session = Session(pack_model(model), lut="int8", threads=threads, profile=True)
        assert "profile=True" in repr(session)
        start = time.perf_counter()
        for _ in range(3):
            session.run(feeds)
        wall = time.perf_counter() - start
        nodes = session.node_times()
        assert {n.name for n in nodes} <= names and len(nodes) >= 10
        assert all(n.calls == 3 and n.seconds > 0 and n.mean_ms == pytest.approx(n.seconds / 3 * 1e3) for n in nodes)
        encoded = [n for n in nodes if n.op in ("EConv", "EGemm")]
        assert len(encoded) == 6 and all(n.kernel.startswith("int8-") for n in encoded)
        assert all(n.kernel == "" for n in nodes if n not in encoded)
        assert sum(n.seconds for n in nodes) <= wall * threads

        # Reset, then one task alone: only its nodes ran.
        session.reset_node_times()
        assert session.node_times() == []
        session.run({"m1.input": feeds["m1.input"]}, outputs=["m1.logits"])
        alone = session.node_times()
        assert 0 < len(alone) < len(nodes) and all(n.calls == 1 for n in alone)
        assert {n.name for n in alone} == {n.name for n in nodes if n.name.startswith("m1.")}


def test_node_times_need_a_profiling_session(merged):
    session = Session(pack_model(merged["lenet_pair"]))
    session.run(feeds_for(merged["lenet_pair"], 1))
    with pytest.raises(ConfigError, match=r"create it with Session\(\.\.\., profile=True\)"):
        session.node_times()
    with pytest.raises(ConfigError, match="profile must be True or False"):
        Session(pack_model(merged["lenet_pair"]), profile="yes")


def test_benchmark_configurations_take_turns():
    calls = []
    runs = {"slow": lambda: (calls.append("slow"), time.sleep(0.002)), "fast": lambda: calls.append("fast")}
    ms = interleaved_ms(runs, 10, {"slow": 2, "fast": 0})
    assert ms["slow"] > 2 > 0.5 > ms["fast"] >= 0
    # Warm-up, then five rounds of one untimed and two timed calls each, alternating.
    assert calls == ["slow"] * 2 + (["slow"] * 3 + ["fast"] * 3) * 5
    calls.clear()
    interleaved_ms(runs, 7, {"slow": 0, "fast": 0})  # 7 timed calls in rounds of 2: 2, 2, 2, 1
    assert calls == (["slow"] * 3 + ["fast"] * 3) * 3 + ["slow"] * 2 + ["fast"] * 2


def test_cli_bench_against_the_originals(merged, lenet_sources, tmp_path):
    onnx.save(merged["lenet_pair"], tmp_path / "m.onnx")
    a, b = lenet_sources
    args = [str(tmp_path / "m.onnx"), "--baseline", str(a), "--baseline", str(b), "--lut", "fp32", "--lut", "int8",
            "--repeat", "5", "--warmup", "1", "--profile", "--json", str(tmp_path / "bench.json")]
    result = CliRunner().invoke(bench_cmd, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["ort_fp32_ms"] > 0 and report["ort_int8_ms"] > 0 and list(report["runtime_ms"]) == ["fp32", "int8"]
    for lut, ms in report["runtime_ms"].items():
        assert report["ratios"][lut]["vs_ort_fp32"] == pytest.approx(report["ort_fp32_ms"] / ms)
        assert report["ratios"][lut]["vs_ort_int8"] == pytest.approx(report["ort_int8_ms"] / ms)
        nodes = report["profile"][lut]["nodes"]
        assert all(n["calls"] == 5 for n in nodes) and sum(n["share"] for n in nodes) == pytest.approx(1.0)
        assert {n["node"] for n in nodes} == {n.name for n in merged["lenet_pair"].graph.node if n.op_type != "Relu"}
    assert report["merged"]["bytes"] == (tmp_path / "m.onnx").stat().st_size
    assert report["peak_rss"]["peak_bytes"] > report["peak_rss"]["session_bytes"] > 0
    assert "| merged, neuralmerge runtime int8 |" in result.output
    assert "Where the time goes, int8: node times add up to" in result.output

    # An existing --json is not overwritten without --force: one error line, exit 1.
    result = CliRunner().invoke(bench_cmd, args)
    assert result.exit_code == 1 and result.output.startswith("error: ") and len(result.output.splitlines()) == 1
    result = CliRunner().invoke(bench_cmd, [str(tmp_path / "missing.nmpack")])
    assert result.exit_code == 1 and result.output == f"error: no such model file: {tmp_path / 'missing.nmpack'}\n"
    result = CliRunner().invoke(bench_cmd, [str(tmp_path / "m.onnx"), "--baseline", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 1 and result.output == f"error: no such model file: {tmp_path / 'missing.onnx'}\n"
    # A baseline that is not one of the merged models, and a model whose H and W are free.
    for name, shape in [("other", [1, 3, 8, 8]), ("free", ["N", 3, "H", "W"])]:
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], name,
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / f"{name}.onnx")
    result = CliRunner().invoke(bench_cmd, [str(tmp_path / "m.onnx"), "--baseline", str(tmp_path / "other.onnx")])
    assert result.exit_code == 1 and "which no input of the merged model has" in result.output, result.output
    result = CliRunner().invoke(bench_cmd, [str(tmp_path / "free.onnx")])
    assert result.exit_code == 1 and "has free dimensions" in result.output and "--input-shape" in result.output

    # A packed model, no baselines: runtime times only, no ratios.
    (tmp_path / "m.nmpack").write_bytes(pack_model(merged["lenet_pair"]))
    result = CliRunner().invoke(bench_cmd, [str(tmp_path / "m.nmpack"), "--lut", "int8", "--repeat", "3"])
    assert result.exit_code == 0, result.output
    assert re.search(r"\| merged, neuralmerge runtime int8 \| [0-9.]+ \| – \| – \|", result.output)


RSS_AFTER_LOAD = """
import sys
from neuralmerge.runtime import Session
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) * 1024
data = open(sys.argv[1], "rb").read()
before = rss()
session = Session(data)
print(rss() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc (Linux)")
def test_loaded_session_keeps_one_copy_of_the_encoded_layers(tmp_path):
    """E-layers copy their codes at load; the file's copy is handed back to the OS, so a session
    holds about one copy of an 8 MB code tensor, not two."""
    from neuralmerge.export.functions import DOMAIN, egemm_function

    rng = np.random.default_rng(0)
    n_in, n_out, r, codewords = 8192, 2048, 2, 4
    rho = n_in // r
    inits = [numpy_helper.from_array(rng.standard_normal((rho * codewords, r)).astype(np.float32), "nm.fc.codebook"),
             numpy_helper.from_array(rng.integers(0, codewords, (n_out, rho)).astype(np.uint8), "m0.fc.codes"),
             numpy_helper.from_array(np.arange(rho, dtype=np.int64) * codewords, "m0.fc.offsets"),
             numpy_helper.from_array(np.array([n_in], np.int64), "m0.fc.depth"),
             numpy_helper.from_array(np.zeros(n_out, np.float32), "m0.fc.bias")]
    node = helper.make_node("EGemm", ["x", "nm.fc.codebook", "m0.fc.codes", "m0.fc.offsets", "m0.fc.depth",
                                      "m0.fc.bias"], ["y"], name="m0.fc", domain=DOMAIN)
    graph = helper.make_graph([node], "fc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out])], inits)
    model = helper.make_model(graph, functions=[egemm_function(17)], ir_version=8,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    groups = [{"name": "fc", "kind": "fc", "r": r, "segment_codewords": [codewords] * rho, "segments": rho,
               "members": [{"model": 0, "node": "m0.fc", "depth": n_in, "segments": rho}]}]
    helper.set_model_props(model, {"neuralmerge.format_version": "1", "neuralmerge.groups": json.dumps(groups)})
    path = tmp_path / "fc.nmpack"
    path.write_bytes(pack_model(model))
    x = rng.standard_normal((1, n_in)).astype(np.float32)
    np.testing.assert_allclose(Session(str(path)).run({"x": x})["y"], ort_outputs(model, {"x": x})["y"], rtol=1e-4,
                               atol=1e-4)

    grown = int(subprocess.run([sys.executable, "-c", RSS_AFTER_LOAD, str(path)], check=True, capture_output=True,
                               text=True).stdout)
    size = path.stat().st_size
    assert size > 8_000_000
    # Measured: 1.45x the file (its codes once, in the layer's layout, plus the rest); 2.43x when
    # the loader kept the file's copy too.
    assert grown < 1.8 * size, f"a session over a {size:,}-byte file grew RSS by {grown:,} bytes"
