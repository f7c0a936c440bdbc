"""Calibration through the Python API: what trains, what improves, determinism, resume, bad data."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import neuralmerge
from neuralmerge.calibrate import trainer as trainer_module
from neuralmerge.calibrate.checkpoint import CheckpointMismatch
from neuralmerge.calibrate.data import load_calibration, split_holdout
from neuralmerge.calibrate.losses import distillation, layer_mismatch
from neuralmerge.calibrate.trainer import CalibrationInterrupted
from neuralmerge.errors import ConfigError
from neuralmerge.pipeline import plan
from hetero_models import hetero_pair

import torch

FAST = {"epochs": 2, "batch_size": 32, "lr": 3e-2}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib")
    a, b = hetero_pair(folder)
    rng = np.random.default_rng(0)
    xa = folder / "a.npy"
    np.save(xa, rng.standard_normal((96, 3, 40, 40)).astype(np.float32))
    xb = folder / "b.npz"
    np.savez(xb, x=rng.standard_normal((96, 1, 28, 28)).astype(np.float32), y=rng.integers(0, 5, 96))
    return a, b, xa, xb


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_calibration_trains_codebooks_biases_heads_only_and_improves(pair, tmp_path):
    a, b, xa, xb = pair
    plain = neuralmerge.merge([a, b], r=4, codewords=16, quiet=True)
    result = neuralmerge.merge([a, b], tmp_path / "m.onnx", r=4, codewords=16, quiet=True, calib=[xa, xb],
                               calibration=FAST, report=tmp_path / "r.json")
    before, after = initializers(plain.model), initializers(result.model)
    assert before.keys() == after.keys()
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed, "calibration changed nothing"
    for name in before:
        if name.endswith((".codes", ".offsets", ".depth")):
            assert name not in changed  # codes are fixed
    assert any(n.endswith(".codebook") for n in changed)
    heads = {"m0.head.weight", "m0.head.bias", "m1.head.weight", "m1.head.bias"}
    allowed = {n for n in before if n.endswith((".codebook", ".bias"))} | heads
    assert changed <= allowed, changed - allowed
    cal = result.report["calibration"]
    # the held-out loss of the kept epoch is below the uncalibrated one for both models
    for m in cal["models"]:
        assert m["after"]["loss"] < m["before"]["loss"]
        assert m["holdout"] == 10 and m["train"] == 86
    assert cal["models"][0]["labels"] is False and cal["models"][1]["labels"] is True
    assert cal["models"][1]["after"]["accuracy"] is not None and cal["models"][0]["after"]["accuracy"] is None
    assert len(cal["history"]) == 2 and all(len(h["loss"]) == 2 for h in cal["history"])
    # int8 activation ranges for the native runtime: one positive float per E-layer call
    props = {p.key: p.value for p in result.model.metadata_props}
    scales = json.loads(props["neuralmerge.int8_scales"])
    calls = {n.name for n in result.model.graph.node if n.domain == "ai.neuralmerge"}
    assert set(scales) == calls and all(v > 0 for v in scales.values())
    # report files next to report.json, and no checkpoint left after success
    for name in ("r.md", "r_groups.png", "r_fidelity.png", "r_loss.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "## Calibration" in (tmp_path / "r.md").read_text()
    assert not (tmp_path / "m.onnx.ckpt").exists()


@pytest.mark.parametrize("int8_aware", [False, True])
def test_same_seed_same_result(pair, int8_aware):
    # On several threads too: the codebook gathers' backward once summed in a varying order.
    a, b, xa, xb = pair
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [neuralmerge.merge([a, b], r=4, codewords=16, quiet=True, calib=[xa, xb], seed=3,
                                  calibration={**FAST, "int8_aware": int8_aware}).model for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    first, second = initializers(runs[0]), initializers(runs[1])
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    assert runs[0].metadata_props == runs[1].metadata_props  # int8_scales included


def stopping_in_epoch(stop: int, train_epoch):
    """Calibrator._train_epoch that presses Ctrl-C as epoch ``stop`` begins."""
    def train(self, epoch, state, total):
        if epoch == stop:
            raise KeyboardInterrupt
        return train_epoch(self, epoch, state, total)
    return train


@pytest.mark.parametrize("int8_aware", [False, True])
def test_interrupt_leaves_a_checkpoint_and_resume_matches_an_uninterrupted_run(pair, tmp_path, monkeypatch, int8_aware):
    # int8-aware runs once measured each epoch's activation ranges from the previous epoch's,
    # which a resumed run does not have: the ranges are now measured from the parameters alone.
    a, b, xa, xb = pair
    opts = dict(r=4, codewords=16, quiet=True, calib=[xa, xb],
                calibration={**FAST, "epochs": 3, "patience": 5, "int8_aware": int8_aware})
    reference = neuralmerge.merge([a, b], **opts).model
    real_epoch = trainer_module.Calibrator._train_epoch
    monkeypatch.setattr(trainer_module.Calibrator, "_train_epoch", stopping_in_epoch(2, real_epoch))
    out = tmp_path / "m.onnx"
    with pytest.raises(CalibrationInterrupted, match="interrupted after 1 of 3 calibration epochs; resume with --resume"):
        neuralmerge.merge([a, b], out, **opts)
    assert not out.exists() and (tmp_path / "m.onnx.ckpt" / "calib.pt").is_file()
    monkeypatch.setattr(trainer_module.Calibrator, "_train_epoch", real_epoch)
    resumed = neuralmerge.merge([a, b], out, resume=True, **opts)
    assert out.is_file() and not (tmp_path / "m.onnx.ckpt").exists()
    want, got = initializers(reference), initializers(resumed.model)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert resumed.model.metadata_props == reference.metadata_props
    assert len(resumed.report["calibration"]["history"]) == 3


def test_resume_keeps_the_epoch_count(pair, tmp_path, monkeypatch):
    # The learning rate follows a schedule over all epochs, so a run resumed with another
    # --epochs would match neither run: refused, naming the count to resume with.
    a, b, xa, xb = pair
    real_epoch = trainer_module.Calibrator._train_epoch
    opts = dict(r=4, codewords=16, quiet=True, calib=[xa, xb], checkpoint_dir=tmp_path / "ck")
    # Interrupted before an epoch has trained: the schedule has not begun, any count will do.
    monkeypatch.setattr(trainer_module.Calibrator, "_train_epoch", stopping_in_epoch(1, real_epoch))
    with pytest.raises(CalibrationInterrupted, match="after 0 of 3"):
        neuralmerge.merge([a, b], calibration={**FAST, "epochs": 3, "patience": 5}, **opts)
    monkeypatch.setattr(trainer_module.Calibrator, "_train_epoch", stopping_in_epoch(2, real_epoch))
    with pytest.raises(CalibrationInterrupted, match="after 1 of 4"):
        neuralmerge.merge([a, b], calibration={**FAST, "epochs": 4, "patience": 5}, resume=True, **opts)
    monkeypatch.setattr(trainer_module.Calibrator, "_train_epoch", real_epoch)
    with pytest.raises(CheckpointMismatch, match=r"is a run of 4 calibration epochs \(1 done\); resume it with "
                                                 r"--epochs 4"):
        neuralmerge.merge([a, b], calibration={**FAST, "epochs": 5, "patience": 5}, resume=True, **opts)
    result = neuralmerge.merge([a, b], calibration={**FAST, "epochs": 4, "patience": 5}, resume=True, **opts)
    assert len(result.report["calibration"]["history"]) == 4


def test_resume_rejects_a_checkpoint_of_other_models(pair, tmp_path, monkeypatch):
    a, b, xa, xb = pair
    monkeypatch.setattr(trainer_module.Calibrator, "_train_epoch",
                        lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    opts = dict(r=4, codewords=16, quiet=True, calibration=FAST, checkpoint_dir=tmp_path / "ck")
    with pytest.raises(CalibrationInterrupted):
        neuralmerge.merge([a, b], calib=[xa, xb], **opts)
    with pytest.raises(CheckpointMismatch, match="was made for different models, data or settings"):
        neuralmerge.merge([b, a], calib=[xb, xa], resume=True, **opts)
    with pytest.raises(Exception, match="no checkpoint at"):
        neuralmerge.merge([a, b], calib=[xa, xb], resume=True, **{**opts, "checkpoint_dir": tmp_path / "none"})


def test_loader_checks_every_source(pair, tmp_path):
    a, b, xa, xb = pair
    models = plan([a, b]).models
    rng = np.random.default_rng(1)

    def save(name, array):
        path = tmp_path / name
        np.save(path, array)
        return str(path)

    good_b = str(xb)
    cases = [
        ([str(xa)], "--calib was given 1 time for 2 models"),
        ([save("s.npy", rng.standard_normal((4, 3, 32, 32)).astype(np.float32)), good_b], "shape 4×3×32×32 does not match"),
        ([save("d.npy", rng.standard_normal((4, 3, 40, 40))), good_b], "dtype float64 does not match"),
        ([save("e.npy", np.zeros((0, 3, 40, 40), np.float32)), good_b], "no samples"),
        ([save("n.npy", np.full((4, 3, 40, 40), np.nan, np.float32)), good_b], "are NaN or infinite"),
        ([str(tmp_path), good_b], "the folder has no images"),
    ]
    np.savez(tmp_path / "bad_labels.npz", x=rng.standard_normal((4, 1, 28, 28)).astype(np.float32), y=np.array([0, 1, 5, 2]))
    cases.append(([str(xa), str(tmp_path / "bad_labels.npz")], "labels must be in [0, 4], found 5"))
    for paths, message in cases:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_calibration(paths, models)


def test_image_folder_with_preprocessing(tmp_path):
    from PIL import Image

    from neuralmerge.graph.normalize import TensorSpec

    for k in range(3):
        Image.fromarray(np.full((10, 12, 3), 51 * k, np.uint8)).save(tmp_path / f"{k}.png")
    spec = TensorSpec("x", (None, 1, 8, 8), np.dtype(np.float32))
    from neuralmerge.calibrate.data import load_image_folder

    x = load_image_folder(tmp_path, spec, {"mean": 0.5, "std": 0.25})
    assert x.shape == (3, 1, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0, 0], [(0 - 0.5) / 0.25, (0.2 - 0.5) / 0.25, (0.4 - 0.5) / 0.25], atol=1e-5)


def test_losses_and_holdout_split():
    t = torch.randn(5, 7)
    assert torch.allclose(distillation(t, t, 2.0), torch.zeros(5), atol=1e-6)
    assert (distillation(t + torch.randn(5, 7), t, 2.0) > 0).all()
    assert torch.allclose(layer_mismatch(t + 1, t), torch.ones(5))
    train, held = split_holdout(50, 0.1, seed=0)
    assert len(held) == 5 and len(train) == 45 and not set(train) & set(held)
    assert np.array_equal(split_holdout(50, 0.1, seed=0)[1], held)
