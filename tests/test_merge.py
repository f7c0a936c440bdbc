"""End-to-end merge: the one ONNX artifact, exactness, naming, metadata, reports."""
from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch

import neuralmerge
from neuralmerge.errors import ConfigError, NeuralMergeError
from neuralmerge.fidelity import ort_session
from neuralmerge.zoo.architectures import LeNet
from hetero_models import export, hetero_pair


def run(model, feeds):
    sess = ort_session(model)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_exact_when_codewords_cover_every_vector(tmp_path):
    a, b = hetero_pair(tmp_path)
    result = neuralmerge.merge([a, b], tmp_path / "m.onnx", r=8, codewords=65536, compress_heads=True, quiet=True)
    merged = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(merged, full_check=True)
    rng = np.random.default_rng(1)
    xa = rng.standard_normal((3, 3, 40, 40)).astype(np.float32)  # batch sizes differ between the models
    xb = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    got = run(merged, {"image": xa, "img": xb})
    want_a = run(onnx.load(str(a)), {"image": xa})["scores"]
    want_b = run(onnx.load(str(b)), {"img": xb})["logits"]
    np.testing.assert_allclose(got["scores"], want_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["logits"], want_b, rtol=1e-5, atol=1e-6)
    # every conv and fc became an E-layer call and the encodings are exact
    ops = [n.op_type for n in merged.graph.node if n.domain == "ai.neuralmerge"]
    assert ops.count("EConv") == 5 + 2 and ops.count("EGemm") == 2 + 2
    assert all(g["relative_error"] == 0.0 for g in result.report["groups"])
    assert {f.name for f in merged.functions} == {"EConv", "EGemm"}


def test_metadata_and_shared_codebooks(tmp_path):
    a, b = hetero_pair(tmp_path)
    result = neuralmerge.merge([a, b], tmp_path / "m.onnx", r=4, codewords=32, quiet=True)
    merged = result.model
    props = {p.key: p.value for p in merged.metadata_props}
    assert props["neuralmerge.format_version"] == "1"
    groups = json.loads(props["neuralmerge.groups"])
    models = json.loads(props["neuralmerge.models"])
    assert [m["source"] for m in models] == [str(a), str(b)]
    shared = [g for g in groups if len(g["members"]) == 2]
    assert shared, "aligned layers of both models must share a codebook"
    inits = {t.name for t in merged.graph.initializer}
    for g in groups:
        assert g["codebook"] in inits
        assert all(c <= 32 for c in g["segment_codewords"])
    # both members of a shared group reference the same codebook initializer
    calls = [n for n in merged.graph.node if n.domain == "ai.neuralmerge"]
    for g in shared:
        users = [n for n in calls if n.input[1] == g["codebook"]]
        assert {n.name.split(".")[0] for n in users} == {"m0", "m1"}


def test_colliding_names_are_prefixed(tmp_path):
    torch.manual_seed(0)
    a = export(LeNet(10), tmp_path / "a.onnx", (1, 1, 32, 32), "input", "logits")
    b = export(LeNet(20), tmp_path / "b.onnx", (1, 1, 32, 32), "input", "logits")
    merged = neuralmerge.merge([a, b], tmp_path / "m.onnx", quiet=True, fidelity_samples=4).model
    assert [i.name for i in merged.graph.input] == ["m0.input", "m1.input"]
    assert [o.name for o in merged.graph.output] == ["m0.logits", "m1.logits"]
    x = np.random.default_rng(0).standard_normal((5, 1, 32, 32)).astype(np.float32)
    out = run(merged, {"m0.input": x, "m1.input": x[:1]})  # the same dynamic dimension name, independent sizes
    assert out["m0.logits"].shape == (5, 10) and out["m1.logits"].shape == (1, 20)
    assert {d.dim_param for i in merged.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param} == {
        "m0.batch", "m1.batch"}


def test_lenet_pair_paper_compression(tmp_path):
    """Paper Table 1 settings on the paper's LeNet pair: ≥ 10.2× (ACCU) and ≥ 15.0× (LIGHT) on file bytes."""
    torch.manual_seed(0)
    a = export(LeNet(10), tmp_path / "a.onnx", (1, 1, 32, 32), "input", "logits")
    b = export(LeNet(20), tmp_path / "b.onnx", (1, 1, 32, 32), "input", "logits")
    accu = neuralmerge.merge([a, b], quiet=True, preset="accu", fidelity_samples=4).report
    light = neuralmerge.merge([a, b], quiet=True, preset="light", fidelity_samples=4).report
    assert [(g["name"], g["r"], g["codewords"]) for g in accu["groups"]] == [
        ("conv1", 1, 64), ("conv2", 8, 128), ("fc1", 8, 128)]
    assert [(g["name"], g["r"], g["codewords"]) for g in light["groups"]] == [
        ("conv1", 1, 64), ("conv2", 32, 128), ("fc1", 8, 64)]
    assert accu["compression_ratio"] >= 10.2
    assert light["compression_ratio"] >= 15.0
    half = neuralmerge.merge([a, b], quiet=True, preset="light", codebook_dtype="float16", fidelity_samples=4).report
    assert half["compression_ratio"] > light["compression_ratio"]


def test_three_models_and_single_model_compression(tmp_path):
    a, b = hetero_pair(tmp_path)
    torch.manual_seed(3)
    c = export(LeNet(4), tmp_path / "c.onnx", (1, 1, 32, 32), "x", "y")
    rep = neuralmerge.merge([a, b, c], tmp_path / "m3.onnx", r=4, codewords=64, quiet=True).report
    assert len(rep["models"]) == 3 and len(rep["fidelity"]) == 3
    assert any(len(g["layers"]) == 3 for g in rep["groups"])
    single = neuralmerge.merge([c], tmp_path / "c_small.onnx", quiet=True).report
    assert single["compression_ratio"] > 4
    assert single["fidelity"][0]["top1_agreement"] >= 0.5


def test_report_json_keys(tmp_path):
    a, b = hetero_pair(tmp_path)
    neuralmerge.merge([a, b], tmp_path / "m.onnx", report=tmp_path / "r.json", quiet=True)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["compression_ratio"] == pytest.approx(rep["input_bytes"] / rep["output_bytes"])
    assert rep["output_bytes"] == (tmp_path / "m.onnx").stat().st_size
    for m in rep["models"]:
        assert {"path", "bytes", "params", "inputs", "outputs"} <= set(m)
    for g in rep["groups"]:
        assert {"name", "layers", "kind", "r", "codewords", "segments", "quantization_mse"} <= set(g)
    for f in rep["fidelity"]:
        assert 0.0 <= f["top1_agreement"] <= 1.0 and f["max_abs_error"] >= 0.0


def test_config_controls_groups(tmp_path):
    a, b = hetero_pair(tmp_path)
    cfg = tmp_path / "layers.yaml"
    cfg.write_text("defaults: {r: 4, codewords: 16}\nlayers:\n  conv1: {skip: true}\n  conv2: {r: 2, codewords: 8}\n")
    rep = neuralmerge.merge([a, b], config=str(cfg), quiet=True).report
    names = {g["name"]: g for g in rep["groups"]}
    assert "conv1" not in names
    assert names["conv2"]["r"] == 2 and max(names["conv2"]["segment_codewords"]) <= 8
    assert all(g["r"] == 4 for n, g in names.items() if n not in ("conv2",) and g["kind"] == "fc")
    # Skipping every group would write the sources side by side: an error naming the config.
    groups = [g.name for g in neuralmerge.plan([a, b]).groups]
    cfg.write_text("layers:\n" + "".join(f"  {name}: {{skip: true}}\n" for name in groups))
    with pytest.raises(ConfigError, match=f"{re.escape(str(cfg))}: every layer group is set to skip"):
        neuralmerge.merge([a, b], config=str(cfg), quiet=True)


def test_mobilenet_with_vgg_batchnorm_folded_and_exact(tmp_path):
    """A MobileNet-style (depthwise, squeeze-excitation, HardSwish) and a VGG-style model, both
    exported with their BatchNormalization nodes: BN is folded, depthwise layers are not forced
    onto dense ones, and with enough codewords the merged file reproduces both exactly."""
    from helpers_models import export_zoo_model, sample_input

    mobile = export_zoo_model("MobileNetStyle", tmp_path, 13, fold_constants=False)
    vgg_dir = tmp_path / "vgg"
    vgg_dir.mkdir()
    vgg = export_zoo_model("VGGStyle", vgg_dir, 17, fold_constants=False, seed=1)
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(str(mobile)).graph.node)
    result = neuralmerge.merge([mobile, vgg], tmp_path / "m.onnx", r=4, codewords=65536, compress_heads=True,
                               quiet=True, fidelity_samples=2)
    merged = result.model
    assert not any(n.op_type == "BatchNormalization" for n in merged.graph.node)
    plan = neuralmerge.plan([mobile, vgg], r=4, codewords=65536)
    for g in plan.groups:  # depthwise kernels (depth 1) never share a codebook with deep dense ones
        depths = {m.depth for m in g.members}
        assert not (1 in depths and max(depths) > 8), (g.name, depths)
    xm, xv = sample_input("MobileNetStyle", 3).numpy(), sample_input("VGGStyle", 2, seed=1).numpy()
    got = run(merged, {"m0.input": xm, "m1.input": xv})
    np.testing.assert_allclose(got["m0.logits"], run(onnx.load(str(mobile)), {"input": xm})["logits"],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["m1.logits"], run(onnx.load(str(vgg)), {"input": xv})["logits"],
                               rtol=1e-4, atol=1e-5)
    assert {g["kind"] for g in result.report["groups"]} == {"conv", "fc"}


def _small_cnn(path, *, opset=17, dtype=np.float32, scale=0.3, names=("w1", "b1", "w2", "b2", "fw", "fb"),
               node_names=("conv_a", "conv_b", "head"), batch="N"):
    """Conv-Relu-Conv-Relu-Flatten-Gemm on 3x4x4 inputs, built with onnx.helper (initializer and node
    names chosen by the caller)."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    shapes = [(8, 3, 3, 3), (8,), (8, 8, 3, 3), (8,), (5, 128), (5,)]
    w1, b1, w2, b2, fw, fb = names
    nodes = [helper.make_node("Conv", ["x", w1, b1], ["c1"], pads=[1, 1, 1, 1], name=node_names[0]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", w2, b2], ["c2"], pads=[1, 1, 1, 1], name=node_names[1]),
             helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("Flatten", ["r2"], ["f"]),
             helper.make_node("Gemm", ["f", fw, fb], ["y"], transB=1, name=node_names[2])]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        nodes, "small", [helper.make_tensor_value_info("x", elem, [batch, 3, 4, 4])],
        [helper.make_tensor_value_info("y", elem, [batch, 5])],
        [numpy_helper.from_array((rng.standard_normal(s) * scale).astype(dtype), n) for s, n in zip(shapes, names)])
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


def test_prefixed_names_never_collide_with_another_models_own(tmp_path):
    # Models 0 and 1 both call their input 'x' (so both become m{i}.x); model 2 calls its own 'm0.x'.
    sources = [_small_cnn(tmp_path / f"s{i}.onnx") for i in range(2)]
    third = onnx.load(str(_small_cnn(tmp_path / "s2.onnx")))
    for node in third.graph.node:
        node.input[:] = ["m0.x" if n == "x" else n for n in node.input]
    third.graph.input[0].name = "m0.x"
    onnx.save(third, str(tmp_path / "s2.onnx"))
    neuralmerge.merge([*sources, tmp_path / "s2.onnx"], tmp_path / "m.onnx", quiet=True)
    merged = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(merged, full_check=True)
    names = [i.name for i in merged.graph.input]
    assert len(set(names)) == 3 and "m0.x" in names and "m1.x" in names
    models = json.loads({p.key: p.value for p in merged.metadata_props}["neuralmerge.models"])
    assert [m["inputs"][0]["name"] for m in models][2] == "m0.x" != models[0]["inputs"][0]["name"]


def test_source_names_never_collide_with_the_e_layers_constants(tmp_path):
    # A node 'conv1' with an initializer 'conv1.bias': the E-layer's bias is named m0.conv1.bias too.
    source = _small_cnn(tmp_path / "names.onnx", names=("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                                                        "fc.weight", "fc.bias"), node_names=("conv1", "conv2", "fc"))
    neuralmerge.merge([source], tmp_path / "m.onnx", r=1, codewords=65536, compress_heads=True, quiet=True)
    merged = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(merged, full_check=True)
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run(merged, {"x": x})["y"], run(onnx.load(str(source)), {"x": x})["y"], rtol=1e-5,
                               atol=1e-6)


def test_old_opsets_are_converted_and_other_float_types_refused(tmp_path):
    # The E-layers' function bodies use Slice-10: a lone opset-9 model is converted up.
    source = _small_cnn(tmp_path / "opset9.onnx", opset=9)
    result = neuralmerge.merge([source], tmp_path / "m.onnx", quiet=True)
    assert result.report["fidelity"][0]["relative_error"] < 0.2
    with pytest.raises(NeuralMergeError, match="'x' is float16; neuralmerge merges float32 models"):
        neuralmerge.merge([_small_cnn(tmp_path / "half.onnx", dtype=np.float16)], tmp_path / "h.onnx", quiet=True)


def test_input_shape_cannot_change_a_fixed_batch(tmp_path):
    source = _small_cnn(tmp_path / "batch1.onnx", batch=1)
    with pytest.raises(NeuralMergeError, match="dimension 0 of .* is fixed at 1, not 4"):
        neuralmerge.merge([source], tmp_path / "m.onnx", input_shapes={"x": (4, 3, 4, 4)}, quiet=True)


def test_float16_codebooks_count_their_rounding_and_refuse_what_they_cannot_hold(tmp_path):
    source = _small_cnn(tmp_path / "s.onnx")
    exact = neuralmerge.merge([source], tmp_path / "a.onnx", r=1, codewords=65536, quiet=True)
    half = neuralmerge.merge([source], tmp_path / "b.onnx", r=1, codewords=65536, codebook_dtype="float16", quiet=True)
    assert all(g["relative_error"] == 0.0 for g in exact.report["groups"])
    assert all(1e-5 < g["relative_error"] < 1e-3 for g in half.report["groups"])  # float16 rounding, ~2^-12
    with pytest.raises(NeuralMergeError, match="beyond float16's range"):
        neuralmerge.merge([_small_cnn(tmp_path / "big.onnx", scale=1e5)], tmp_path / "c.onnx", r=1,
                          codewords=65536, codebook_dtype="float16", quiet=True)
    assert not (tmp_path / "c.onnx").exists()


def test_fixed_batch_models_calibrate_and_count_top1_on_class_scores_only(tmp_path):
    # torch.onnx.export fixes the batch at 1 unless told otherwise; fidelity runs such a model one
    # sample at a time. A feature-map output has no top-1.
    from neuralmerge.fidelity import compare_outputs

    source = _small_cnn(tmp_path / "batch1.onnx", batch=1)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((40, 3, 4, 4)).astype(np.float32))
    result = neuralmerge.merge([source], tmp_path / "m.onnx", calib=[tmp_path / "calib.npy"],
                               calibration={"epochs": 1}, quiet=True)
    assert result.report["fidelity"][0]["samples"] == 4  # the held-out tenth, run one by one
    # Without calibration data, as many random samples as for a dynamic batch, in chunks (the
    # last one padded for a batch of 3).
    for batch in (1, 3):
        fixed = _small_cnn(tmp_path / f"batch{batch}.onnx", batch=batch)
        plain = neuralmerge.merge([fixed], tmp_path / f"p{batch}.onnx", quiet=True, force=True)
        assert plain.report["fidelity"][0]["samples"] == 16
        assert plain.report["fidelity"][0]["relative_error"] < 0.2
    # A dynamic batch pinned to 1 with --input-shape: the merged model takes one sample at a time.
    dynamic = _small_cnn(tmp_path / "dynamic.onnx")
    pinned = neuralmerge.merge([dynamic], tmp_path / "pinned.onnx", calib=[tmp_path / "calib.npy"],
                               input_shapes={"x": (1, 3, 4, 4)}, calibration={"epochs": 1}, quiet=True)
    assert pinned.report["fidelity"][0]["samples"] == 4
    features = np.random.default_rng(2).standard_normal((4, 8, 6, 6))
    assert "top1_agreement" not in compare_outputs(features, features + 0.1)
    assert compare_outputs(features[:, :, 0, 0], features[:, :, 0, 0])["top1_agreement"] == 1.0


@pytest.mark.parametrize("kwargs,words", [
    (dict(calibration={"epoch": 5}), "unknown calibration setting(s) 'epoch'"),
    (dict(calibration=[("epochs", 1)]), "calibration must be a dict"),
    (dict(seed=-5), "seed must be a non-negative integer"),
    (dict(seed=1.5), "seed must be a non-negative integer"),
    (dict(budget="1"), "--budget must be a percentage"),
    (dict(budget=float("nan")), "--budget must be a percentage"),
])
def test_api_arguments_are_checked_before_any_work(tmp_path, kwargs, words, monkeypatch):
    # As the command line's: a ConfigError naming the argument, before any group is encoded.
    import neuralmerge.pipeline as pipeline

    def no_encoding(*args, **kw):
        raise AssertionError("encoded before checking the arguments")

    monkeypatch.setattr(pipeline, "_encode_artifacts", no_encoding)
    source = _small_cnn(tmp_path / "s.onnx")
    with pytest.raises(neuralmerge.errors.ConfigError) as info:
        neuralmerge.merge([source], tmp_path / "m.onnx", quiet=True, **kwargs)
    assert words in str(info.value)
    assert not (tmp_path / "m.onnx").exists()
