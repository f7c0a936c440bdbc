"""``neuralmerge compose`` under torchrun: 2 processes train the student 1 process trains, only rank 0 writes.

Tiny 8×8 digits, two small ONNX teachers, 2 epochs; LeNet (no BatchNorm) with a ``--labeled`` fine-tune,
and ResNet, whose BatchNorm layers normalise by the global batch's statistics across processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from sklearn.datasets import load_digits
from torch import nn

from neuralmerge.zoo.train import export_onnx, train_classifier

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Two ONNX teachers (digits 0–5 and 4–9), an unlabeled pool of 200 and 40 labeled samples."""
    folder = tmp_path_factory.mktemp("compose_ddp")
    data = load_digits()
    x = ((data.images[:, None] / 16.0 - 0.3) / 0.4).astype(np.float32)
    y = data.target
    args = []
    for i, known in enumerate([[0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 8, 9]]):
        rows = np.flatnonzero(np.isin(y[600:], known))[i::2] + 600
        torch.manual_seed(i)
        teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                nn.Linear(64, 6))
        train_classifier(teacher, x[rows], np.searchsorted(known, y[rows]), epochs=8, batch_size=32, quiet=True)
        export_onnx(teacher, folder / f"t{i}.onnx", (1, 8, 8))
        (folder / f"t{i}.txt").write_text("".join(f"digit{c}\n" for c in known))
        args += [str(folder / f"t{i}.onnx"), "--classes", str(folder / f"t{i}.txt")]
    np.save(folder / "pool.npy", x[:200])
    np.savez(folder / "few.npz", x=x[200:240], y=y[200:240])
    return folder, [*args, "--unlabeled", str(folder / "pool.npy"), "--epochs", "2", "--batch-size", "32",
                    "--threads", "1", "--seed", "3", "-q"]


def run(processes: int, args: list[str]) -> subprocess.CompletedProcess:
    launcher = TORCHRUN if processes > 1 else [sys.executable]
    # "--": without it torchrun's own parser would read compose's options
    command = [*launcher, "-m", "neuralmerge", *(["--"] if processes > 1 else []), "compose", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)


def weights(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


# ResNet after 12 steps on 8×8 images has barely started to learn: here only the match of 1 and 2 processes counts
@pytest.mark.parametrize("student, extra, least_agreement", [("lenet", ["--labeled", "few.npz"], 0.5),
                                                             ("resnet", [], 0.0)])
def test_two_processes_train_the_student_one_process_trains(case, tmp_path, student, extra, least_agreement):
    folder, common = case
    extra = [str(folder / e) if e.endswith(".npz") else e for e in extra]
    reports = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        out.mkdir()
        result = run(processes, [*common, "--student", student, *extra, "--cache-dir", str(out / "cache"),
                                 "-o", str(out / "student.onnx"), "--report", str(out / "report.json")])
        assert result.returncode == 0, result.stderr[-3000:]
        assert sorted(p.name for p in out.iterdir()) == ["cache", "report.json", "student.onnx"]  # no temp files
        assert len(list((out / "cache").iterdir())) == 2  # one cache file per teacher, written once
        reports[processes] = json.loads((out / "report.json").read_text())
    one, two = weights(tmp_path / "p1" / "student.onnx"), weights(tmp_path / "p2" / "student.onnx")
    assert one.keys() == two.keys()
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
    trained_one, trained_two = reports[1]["training"], reports[2]["training"]
    assert trained_one["train_samples"] == trained_two["train_samples"] == 180
    assert trained_one["best_epoch"] == trained_two["best_epoch"]
    assert trained_two["best_val_agreement"] == trained_one["best_val_agreement"] >= least_agreement
    for a, b in zip(trained_one["history"], trained_two["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    if "--labeled" in extra:
        assert reports[2]["finetune"] == reports[1]["finetune"]
        assert reports[2]["finetune"]["samples"] == 40


def test_a_user_error_on_rank_0_stops_every_process(case, tmp_path):
    _, common = case
    result = run(2, [*common, "--tau", "0", "--no-cache", "-o", str(tmp_path / "student.onnx")])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all("--tau 0.0 filters out every sample" in e for e in errors), result.stderr[-3000:]
    assert not list(tmp_path.iterdir())
