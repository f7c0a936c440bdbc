"""The Python examples run as documented (small settings) and print what examples/README.md quotes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import neuralmerge
from hetero_models import hetero_pair

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# the examples run from another folder, as a user's would; this checkout's package comes first
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_run_merged_compares_every_precision_with_onnxruntime(tmp_path):
    a, b = hetero_pair(tmp_path)
    neuralmerge.merge([a, b], tmp_path / "merged.onnx", r=4, codewords=16, quiet=True)
    out = run(str(EXAMPLES / "run_merged.py"), str(tmp_path / "merged.onnx"), "--repeat", "3", cwd=tmp_path)
    for lut in ("fp32", "fp16", "int8"):
        line = next(line for line in out.splitlines() if line.startswith(f"neuralmerge {lut}:"))
        difference = float(line.split("largest relative difference to onnxruntime ")[1].split(",")[0])
        assert difference < {"fp32": 1e-4, "fp16": 1e-2, "int8": 0.2}[lut], line
    assert "matches the full run: True" in out


def test_run_merged_bad_file_is_one_line(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    done = subprocess.run([sys.executable, str(EXAMPLES / "run_merged.py"), "bad.onnx"], capture_output=True,
                          text=True, cwd=tmp_path, env=ENV)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1


def test_compose_teachers_example_writes_a_student_for_all_ten_digits(tmp_path):
    out = run(str(EXAMPLES / "compose_teachers.py"), "--epochs", "3", "--out", str(tmp_path / "composed"),
              cwd=tmp_path)
    assert "student classes (union, first appearance): digit0, digit1, digit2, digit3, digit4, digit5, digit6, " \
           "digit7, digit8, digit9" in out
    line = next(line for line in out.splitlines() if line.startswith("test accuracy"))
    composed = float(line.split("unlabeled data ")[1].split("%")[0])
    assert composed > 60.0, line
    assert (tmp_path / "composed" / "student.onnx").is_file()
