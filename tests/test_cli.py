"""The command line: success paths and every bad input of the foundation issue.

Each bad input must give one line on stderr starting with ``error:``, a non-zero exit, no
traceback, and no output file.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from hetero_models import hetero_pair


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "neuralmerge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return hetero_pair(tmp_path_factory.mktemp("pair"))


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_help_and_version():
    proc = cli("--help")
    assert proc.returncode == 0 and "merge" in proc.stdout and "inspect" in proc.stdout
    assert cli("--version").stdout.strip().endswith("0.1.0")


def test_merge_and_inspect(pair, tmp_path):
    a, b = pair
    out, rep = tmp_path / "merged.onnx", tmp_path / "report.json"
    proc = cli("merge", a, b, "-o", out, "--preset", "light", "--report", rep, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and json.loads(rep.read_text())["compression_ratio"] > 1
    proc = cli("inspect", a, b)
    assert proc.returncode == 0, proc.stderr
    assert "conv1" in proc.stdout and "fc1" in proc.stdout and "[head]" in proc.stdout
    plan = json.loads(cli("inspect", a, b, "--json").stdout)
    assert plan["groups"][0]["name"] == "conv1"


def _write(model, path):
    onnx.save(model, str(path))
    return path


def _tiny_model(op_type="Relu", domain="", weight=None):
    w = weight if weight is not None else np.ones((4, 3, 3, 3), np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node(op_type, ["c"], ["y"], name="act", domain=domain)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [numpy_helper.from_array(w, "w")])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize("case", ["missing", "truncated", "garbage", "unsupported_op", "no_layers", "nan"])
def test_bad_model_files(case, pair, tmp_path):
    a, _ = pair
    bad = tmp_path / f"{case}.onnx"
    if case == "truncated":
        bad.write_bytes(a.read_bytes()[: a.stat().st_size // 2])
    elif case == "garbage":
        bad.write_bytes(b"\x08\x07this is not onnx" * 10)
    elif case == "unsupported_op":
        _write(_tiny_model("FancyOp", domain="com.example"), bad)
    elif case == "no_layers":
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
        _write(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), bad)
    elif case == "nan":
        w = np.ones((4, 3, 3, 3), np.float32)
        w[1, 2, 0, 0] = np.nan
        _write(_tiny_model(weight=w), bad)
    out = tmp_path / "out.onnx"
    proc = cli("merge", a, bad, "-o", out)
    expected = {"missing": "not found", "truncated": "corrupt", "garbage": "", "unsupported_op": "FancyOp",
                "no_layers": "no mergeable layers", "nan": "NaN"}[case]
    assert_one_line_error(proc, expected)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.onnx*"))


@pytest.mark.parametrize("args,fragment", [
    (["--r", "0"], "r must be a positive integer"),
    (["--r", "-3"], "r must be a positive integer"),
    (["--codewords", "0"], "codewords"),
    (["--codewords", "70000"], "codewords"),
    (["--input-shape", "nosuch=1x3x4x4"], "nosuch"),
    (["--input-shape", "image=1xax4"], "--input-shape"),
])
def test_bad_flags(args, fragment, pair, tmp_path):
    a, b = pair
    out = tmp_path / "out.onnx"
    assert_one_line_error(cli("merge", a, b, "-o", out, *args), fragment)
    assert not out.exists()


def test_bad_configs(pair, tmp_path):
    a, b = pair
    out = tmp_path / "out.onnx"
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("layers:\n  conv99: {r: 4}\n")
    assert_one_line_error(cli("merge", a, b, "-o", out, "--config", unknown), "conv99")
    bad_key = tmp_path / "badkey.yaml"
    bad_key.write_text("layerz: {}\n")
    assert_one_line_error(cli("merge", a, b, "-o", out, "--config", bad_key), "layerz")
    needs_two = tmp_path / "two.yaml"
    needs_two.write_text(f"models: [{a}, {b}]\n")
    assert_one_line_error(cli("merge", a, "-o", out, "--config", needs_two), "2 models")
    assert not out.exists()
    # the same config alone supplies both models
    assert cli("merge", "-o", out, "--config", needs_two, "--quiet").returncode == 0


def test_existing_output_needs_force(pair, tmp_path):
    a, b = pair
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    assert_one_line_error(cli("merge", a, b, "-o", out), "--force")
    assert out.read_bytes() == b"keep me"
    assert cli("merge", a, b, "-o", out, "--force", "--quiet").returncode == 0
    onnx.checker.check_model(onnx.load(str(out)))


def test_verbose_shows_traceback(pair, tmp_path):
    a, _ = pair
    proc = cli("merge", a, tmp_path / "missing.onnx", "-o", tmp_path / "o.onnx", "-v")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_internal_errors_exit_with_their_own_status(pair, monkeypatch):
    # A bug of ours (any exception that is not a NeuralMergeError) exits with 3, apart from bad
    # input (1) and a malformed command line (2); -v shows its traceback.
    import neuralmerge.cli as cli_module
    import neuralmerge.pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(neuralmerge.pipeline, "plan", broken)
    a, b = pair
    result = CliRunner().invoke(cli_module.main, ["inspect", str(a), str(b)])
    assert result.exit_code == 3
    assert result.output == "error: internal error: RuntimeError: boom (run with -v for details)\n"
    result = CliRunner().invoke(cli_module.main, ["inspect", str(a), str(b), "-v"])
    assert isinstance(result.exception, RuntimeError)


def test_a_merged_model_failing_the_checker_is_an_internal_error(pair, tmp_path, monkeypatch):
    import neuralmerge.cli as cli_module
    import neuralmerge.pipeline

    real_check = neuralmerge.pipeline.onnx.checker.check_model

    def check(model, *args, **kwargs):  # the merged model (it has E-layer functions) fails
        if any(f.domain == "ai.neuralmerge" for f in model.functions):
            raise onnx.checker.ValidationError("bogus node")
        return real_check(model, *args, **kwargs)

    monkeypatch.setattr(neuralmerge.pipeline.onnx.checker, "check_model", check)
    a, b = pair
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(cli_module.main, ["merge", str(a), str(b), "-o", str(out), "--quiet"])
    assert result.exit_code == 3 and not out.exists()
    assert result.output == ("error: internal error: RuntimeError: the merged model fails the ONNX checker: "
                             "bogus node (run with -v for details)\n")


@pytest.mark.parametrize("args,fragment", [
    (["--seed", "-1"], "neuralmerge merge: Invalid value for '--seed'"),
    (["--calib", "x.npy", "--lr", "nan"], "--lr must be a finite number"),
    (["--bogus"], "No such option '--bogus'"),
])
def test_usage_errors_are_one_line_too(args, fragment, pair, tmp_path):
    # click's own errors (bad option values, unknown options) keep its exit status 2 but come as
    # one line; NaN never passes a range check.
    a, b = pair
    out = tmp_path / "out.onnx"
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 40, 40), np.float32))
    proc = cli("merge", a, b, "-o", out, *args, cwd=tmp_path)
    assert_one_line_error(proc, fragment)
    assert not out.exists() and not (tmp_path / "out.onnx.ckpt").exists()


def test_outputs_never_overwrite_inputs_or_each_other(pair, tmp_path):
    a, b = pair
    before = a.read_bytes()
    assert_one_line_error(cli("merge", a, b, "-o", a, "--force"), "would overwrite the input")
    assert_one_line_error(cli("merge", a, b, "-o", tmp_path / "m.onnx", "--report", tmp_path / "m.onnx"),
                          "two outputs name the same file")
    assert_one_line_error(cli("pack", a, "-o", a, "--force"), "would overwrite the input")
    assert_one_line_error(cli("run", a, "--input", f"image={tmp_path / 'x.npy'}", "-o", a, "--force"),
                          "would overwrite the input")
    assert a.read_bytes() == before and not (tmp_path / "m.onnx").exists()


def test_unwritable_output_folder_fails_before_any_work(pair, tmp_path):
    a, b = pair
    assert_one_line_error(cli("merge", a, b, "-o", "/proc/out.onnx"), "cannot write to folder /proc")
    assert_one_line_error(cli("merge", a, b, "-o", ""), "an output path is empty")


def test_outputs_get_the_usual_file_mode(pair, tmp_path):
    # mkstemp makes 0600 files; outputs follow the umask like any other program's.
    a, b = pair
    out = tmp_path / "merged.onnx"
    assert cli("merge", a, b, "-o", out, "--preset", "light", "--quiet").returncode == 0
    import os
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_pinned_dynamic_height_and_width_merge(tmp_path):
    # --input-shape pins H and W the file leaves free; fidelity is measured at the pinned shape.
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])], "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])],
        [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "w2")])
    source = tmp_path / "dyn.onnx"
    _write(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    out = tmp_path / "out.onnx"
    assert_one_line_error(cli("merge", source, "-o", out), "--input-shape")
    proc = cli("merge", source, "-o", out, "--input-shape", "x=1x3x8x8", "--report", tmp_path / "r.json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["fidelity"][0]["samples"] == 16  # one at a time
    assert [d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim] == [1, 3, 8, 8]
    # N keeps the batch as the model has it: dynamic here.
    proc = cli("merge", source, "-o", out, "--input-shape", "x=Nx3x8x8", "--force", "--quiet")
    assert proc.returncode == 0, proc.stderr
    dims = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 8, 8]
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    assert ort.InferenceSession(str(out)).run(None, {"x": x})[0].shape == (3, 4, 8, 8)
    assert_one_line_error(cli("merge", source, "-o", out, "--force", "--input-shape", "x=1xNx8x8"), "--input-shape")


def test_demo_refuses_a_folder_below_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    assert_one_line_error(cli("demo", "--out", tmp_path / "file" / "sub"), "cannot create the demo folder")
