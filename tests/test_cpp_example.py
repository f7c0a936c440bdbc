"""examples/cpp builds as its README says and runs a packed merged model without Python, matching Session.

The build directory (build/example in the checkout, git-ignored) is kept between runs: it compiles
the library once (~1 min on 2 cores), incrementally after.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import neuralmerge
from hetero_models import hetero_pair
from neuralmerge.runtime import Session, pack_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example_build() -> Path:
    build = ROOT / "build" / "example"
    subprocess.run(["cmake", "-S", str(ROOT / "examples" / "cpp"), "-B", str(build), "-G", "Ninja",
                    f"-DPython_EXECUTABLE={sys.executable}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    return build


def test_run_model_matches_the_python_session(example_build, tmp_path):
    a, b = hetero_pair(tmp_path)
    merged = neuralmerge.merge([a, b], r=4, codewords=16, quiet=True).model
    (tmp_path / "m.nmpack").write_bytes(pack_model(merged))
    session = Session(str(tmp_path / "m.nmpack"), lut="int8")
    spec = session.inputs[1]
    x = np.random.default_rng(0).standard_normal([1 if d is None else d for d in spec.shape]).astype(np.float32)
    x.tofile(tmp_path / "x.f32")
    output = session.outputs[1].name
    want = session.run({spec.name: x}, outputs=[output])[output]

    done = subprocess.run([str(example_build / "run_model"), str(tmp_path / "m.nmpack"), "--lut", "int8",
                           "--output", output, f"{spec.name}={tmp_path / 'x.f32'}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    match = re.fullmatch(rf"{re.escape(output)}: ([0-9x]+), arg-max (\d+) \((-?[0-9.]+)\)\n", done.stdout)
    assert match, done.stdout
    assert match[1] == "x".join(map(str, want.shape))
    assert int(match[2]) == int(want.argmax()) and abs(float(match[3]) - float(want.max())) < 1e-3


def test_run_model_profiles_every_node(example_build, tmp_path):
    a, b = hetero_pair(tmp_path)
    merged = neuralmerge.merge([a, b], r=4, codewords=16, quiet=True).model
    (tmp_path / "m.nmpack").write_bytes(pack_model(merged))
    done = subprocess.run([str(example_build / "run_model"), str(tmp_path / "m.nmpack"), "--profile", "4"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    start = lines.index("node times, mean of 4 runs:")
    rows = [re.fullmatch(r" *([0-9.]+) us  (\S+)  (\w+)(  .+)?", line) for line in lines[start + 1:]]
    # Every node ran, but the Relus folded into the E-layers before them.
    names = {row[2] for row in rows}
    assert all(rows) and {n.name for n in merged.graph.node if n.op_type != "Relu"} <= names
    assert names <= {n.name for n in merged.graph.node}
    assert all(float(row[1]) >= 0 for row in rows)
    assert {row[3] for row in rows if row[4]} <= {"EConv", "EGemm"}
    done = subprocess.run([str(example_build / "run_model"), str(tmp_path / "m.nmpack"), "--profile", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr == "error: --profile needs a number of runs >= 1, got '0'\n"


def test_run_model_refuses_a_bad_file_in_one_line(example_build, tmp_path):
    (tmp_path / "bad.nmpack").write_bytes(b"NMPACK01 but nothing after")
    done = subprocess.run([str(example_build / "run_model"), str(tmp_path / "bad.nmpack")], capture_output=True,
                          text=True)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1


def test_run_model_refuses_bad_arguments_in_one_line(example_build, tmp_path):
    # Each once ended otherwise: an uncaught exception (--lut, a directory: std::bad_alloc), a
    # made-up answer (a misspelt input was filled with 0.5), or a silently truncated input file.
    a, _ = hetero_pair(tmp_path)
    model = tmp_path / "m.nmpack"
    model.write_bytes(pack_model(neuralmerge.merge([a], r=4, codewords=16, quiet=True).model))
    spec = Session(str(model)).inputs[0]
    np.zeros((2, *spec.shape[1:]), np.float32).tofile(tmp_path / "two.f32")
    for args, status, words in [
        ([str(model), "--lut", "int4"], 2, "unknown lookup-table precision 'int4'"),
        ([str(model), f"imgae={tmp_path / 'two.f32'}"], 1, f"the model has no input 'imgae' (its inputs: {spec.name})"),
        ([str(model), f"{spec.name}={tmp_path / 'two.f32'}"], 1, f"not the {int(np.prod(spec.shape[1:]))} float32"),
        ([str(model), f"{spec.name}={tmp_path / 'none.f32'}"], 1, "cannot open"),
        ([str(tmp_path)], 1, "is not a regular file"),
    ]:
        done = subprocess.run([str(example_build / "run_model"), *args], capture_output=True, text=True)
        assert done.returncode == status and len(done.stderr.splitlines()) == 1, done.stderr
        assert done.stderr.startswith("error: ") and words in done.stderr, done.stderr


def test_an_installed_library_is_found_by_another_project(example_build, tmp_path):
    # cmake --install puts the library, its headers and a CMake package in a prefix; a project of
    # its own then finds it with find_package(neuralmerge) and links neuralmerge::lut.
    prefix = tmp_path / "prefix"
    subprocess.run(["cmake", "--install", str(example_build), "--prefix", str(prefix)], check=True, capture_output=True)
    assert (prefix / "lib" / "cmake" / "neuralmerge" / "neuralmergeConfig.cmake").is_file()
    project = tmp_path / "app"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(app LANGUAGES CXX)\nfind_package(neuralmerge 0.1 REQUIRED)\n"
        f"add_executable(run_model {ROOT / 'examples' / 'cpp' / 'run_model.cpp'})\n"
        "target_link_libraries(run_model PRIVATE neuralmerge::lut)\n")
    for step in (["cmake", "-S", str(project), "-B", str(project / "build"), "-G", "Ninja", f"-DCMAKE_PREFIX_PATH={prefix}"],
                 ["cmake", "--build", str(project / "build")]):
        done = subprocess.run(step, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    a, _ = hetero_pair(tmp_path)
    (tmp_path / "m.nmpack").write_bytes(pack_model(neuralmerge.merge([a], r=4, codewords=16, quiet=True).model))
    done = subprocess.run([str(project / "build" / "run_model"), str(tmp_path / "m.nmpack")], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "arg-max" in done.stdout, done.stderr


def test_econv_demo_matches_its_dense_reference(example_build):
    done = subprocess.run([str(example_build / "econv_demo")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    error = float(re.search(r"max \|LUT - direct\| = ([0-9.e+-]+)", done.stdout)[1])
    assert error < 1e-5
    assert "bad code rejected" in done.stdout
