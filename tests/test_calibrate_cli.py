"""Calibration on the command line: success, every bad input, Ctrl-C and resume, torchrun with 2 processes.

Each bad input gives one line on stderr starting with ``error:``, a non-zero exit, and writes nothing.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from hetero_models import hetero_pair
from test_cli import assert_one_line_error, cli

ENCODE = ("--r", "4", "--codewords", "16", "--batch-size", "32", "--lr", "0.03")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_calib")
    a, b = hetero_pair(folder)
    rng = np.random.default_rng(0)
    np.save(folder / "a.npy", rng.standard_normal((64, 3, 40, 40)).astype(np.float32))
    np.save(folder / "b.npy", rng.standard_normal((64, 1, 28, 28)).astype(np.float32))
    return folder, a, b, folder / "a.npy", folder / "b.npy"


def codebooks(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
            if t.name.endswith((".codebook", ".bias"))}


def test_merge_with_calibration_writes_model_reports_and_plots(job, tmp_path):
    _, a, b, xa, xb = job
    out, rep = tmp_path / "merged.onnx", tmp_path / "report.json"
    proc = cli("merge", a, b, "-o", out, *ENCODE, "--calib", xa, "--calib", xb, "--epochs", "1", "--report", rep)
    assert proc.returncode == 0, proc.stderr
    assert "calibrated 1 epoch(s)" in proc.stdout and "held-out top1 agreement" in proc.stdout
    report = json.loads(rep.read_text())
    assert report["calibration"]["epochs_run"] == 1 and len(report["calibration"]["models"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "merged.onnx", "report.json", "report.md", "report_fidelity.png", "report_groups.png", "report_loss.png"]


def test_int8_aware_flag_reaches_the_calibration(job, tmp_path):
    _, a, b, xa, xb = job
    rep = tmp_path / "report.json"
    proc = cli("merge", a, b, "-o", tmp_path / "m.onnx", *ENCODE, "--calib", xa, "--calib", xb, "--epochs", "1",
               "--int8-aware", "--report", rep, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(rep.read_text())["calibration"]["settings"]["int8_aware"] is True


def _bad_inputs(folder, tmp_path, a, b, xa, xb):
    rng = np.random.default_rng(1)

    def save(name, array):
        np.save(tmp_path / name, array)
        return tmp_path / name

    empty_dir = tmp_path / "no_images"
    empty_dir.mkdir()
    (empty_dir / "notes.txt").write_text("not an image")
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=rng.standard_normal((8, 1, 28, 28)).astype(np.float32), y=np.array([0, 1, 2, 3, 4, 5, 0, 1]))
    return {
        "count": (["--calib", xa], "--calib was given 1 time for 2 models"),
        "shape": (["--calib", save("s.npy", np.zeros((4, 3, 32, 32), np.float32)), "--calib", xb], "does not match"),
        "dtype": (["--calib", save("d.npy", np.zeros((4, 3, 40, 40), np.float64)), "--calib", xb], "dtype float64"),
        "empty": (["--calib", save("e.npy", np.zeros((0, 3, 40, 40), np.float32)), "--calib", xb], "no samples"),
        "nan": (["--calib", save("n.npy", np.full((4, 3, 40, 40), np.nan, np.float32)), "--calib", xb], "NaN"),
        "no_images": (["--calib", empty_dir, "--calib", xb], "no images"),
        "labels": (["--calib", xa, "--calib", labels], "labels must be in [0, 4]"),
        "resume_other_models": (["--calib", xa, "--calib", xb, "--resume", "--checkpoint-dir", folder / "foreign"],
                                "was made for different models"),
    }


CASES = ["count", "shape", "dtype", "empty", "nan", "no_images", "labels", "resume_other_models"]


@pytest.mark.parametrize("case", CASES)
def test_bad_calibration_input(case, job, tmp_path):
    folder, a, b, xa, xb = job
    if case == "resume_other_models":  # a checkpoint that another job left (b, a swapped)
        from neuralmerge.calibrate.checkpoint import Checkpoint
        Checkpoint(folder / "foreign", "another job's fingerprint").save("encoded", {"model": b"not a model"})
    args, message = _bad_inputs(folder, tmp_path, a, b, xa, xb)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = cli("merge", a, b, "-o", out_dir / "m.onnx", *ENCODE, "--report", out_dir / "r.json", *args)
    assert_one_line_error(proc, message)
    assert list(out_dir.iterdir()) == []


def test_ctrl_c_leaves_a_checkpoint_then_resume_finishes(job, tmp_path):
    _, a, b, xa, xb = job
    out = tmp_path / "m.onnx"
    ckpt = tmp_path / "m.onnx.ckpt" / "calib.pt"
    # a patience of 200 epochs: early stopping must not end the run before the signal arrives
    config = tmp_path / "patient.yaml"
    config.write_text("defaults: {r: 4, codewords: 16}\ncalibration: {patience: 200}\n")
    args = ["merge", a, b, "-o", out, *ENCODE, "--config", config, "--calib", xa, "--calib", xb, "--quiet"]
    # SIG_DFL in the child: a shell that started the tests in the background made them ignore
    # SIGINT, and Python keeps an ignored SIGINT ignored (no KeyboardInterrupt)
    proc = subprocess.Popen([sys.executable, "-m", "neuralmerge", *map(str, args), "--epochs", "200"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: interrupted") and "resume with --resume" in last
    assert ckpt.is_file() and not out.exists()
    done = cli(*args, "--epochs", "1", "--resume")
    assert done.returncode == 0, done.stderr
    assert out.is_file() and not ckpt.exists()


def test_torchrun_two_processes_match_one(job, tmp_path):
    _, a, b, xa, xb = job
    args = [a, b, *ENCODE, "--calib", xa, "--calib", xb, "--epochs", "2", "--quiet", "--seed", "1"]
    one = cli("merge", "-o", tmp_path / "one.onnx", *args)
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # "--": torchrun's own parser would take --r for an abbreviation of one of its options
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run([*torchrun, "-m", "neuralmerge", "--", "merge", "-o", str(tmp_path / "two.onnx"),
                          *map(str, args)], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[:3000]
    want, got = codebooks(tmp_path / "one.onnx"), codebooks(tmp_path / "two.onnx")
    assert want.keys() == got.keys()
    before = codebooks_before(job)
    moved = 0
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5)
        moved += not np.array_equal(want[name], before[name])
    assert moved > 0  # calibration did change parameters in both runs


def codebooks_before(job) -> dict[str, np.ndarray]:
    import neuralmerge

    _, a, b, _, _ = job
    model = neuralmerge.merge([a, b], r=4, codewords=16, quiet=True, seed=1).model
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith((".codebook", ".bias"))}
