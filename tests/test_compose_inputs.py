"""Composition inputs: image-folder pools, per-teacher preprocessing from --config, the student's own input."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

from neuralmerge.compose import CompositionError, compose
from neuralmerge.compose.cli_compose import compose_cmd
from neuralmerge.compose.inputs import InputConfig, load_pool, pool_inputs, prepare_pool, read_input_config
from neuralmerge.compose.student import read_classes
from neuralmerge.compose.teachers import Teacher
from neuralmerge.errors import ConfigError, NeuralMergeError
from neuralmerge.zoo.train import export_onnx, train_classifier


def test_array_preparation_converts_channels_resizes_and_normalises():
    x = np.arange(2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
    rgb = prepare_pool(x, {"channels": 3, "scale": 2, "mean": [0, 1, 2], "std": [1, 1, 2]}, None, "t")
    assert rgb.shape == (2, 3, 4, 4) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb[:, 0], x[:, 0] / 2)
    np.testing.assert_allclose(rgb[:, 2], (x[:, 0] / 2 - 2) / 2)
    grey = prepare_pool(np.stack([x[:, 0], 2 * x[:, 0], 0 * x[:, 0]], axis=1), {"channels": 1}, None, "t")
    np.testing.assert_allclose(grey[:, 0], (0.299 + 2 * 0.587) * x[:, 0], rtol=1e-6)
    # a teacher's declared size is the default resize; a constant image stays constant
    resized = prepare_pool(np.full((3, 1, 8, 8), 5.0, np.float32), {"scale": 1}, (1, 16, 16), "t")
    assert resized.shape == (3, 1, 16, 16)
    np.testing.assert_allclose(resized, 5.0, rtol=1e-6)
    # without an entry, arrays are taken as they are: a size mismatch is an error, not a silent resize
    with pytest.raises(CompositionError, match=r"teacher t takes inputs \[1, 16, 16\] but the unlabeled samples are "
                                               r"\[1, 8, 8\]; resize them with the config's preprocess section"):
        prepare_pool(np.zeros((3, 1, 8, 8), np.float32), None, (1, 16, 16), "teacher t")


def _teacher(name: str, shape) -> Teacher:
    return Teacher(lambda b: np.zeros((len(b), 2)), name, input_shape=shape)


def test_pool_inputs_share_arrays_and_choose_the_students_input():
    pool = np.random.default_rng(0).random((6, 1, 8, 8)).astype(np.float32)
    same = [_teacher("a", (1, 8, 8)), _teacher("b", (1, 8, 8))]
    student, inputs = pool_inputs(pool, same, InputConfig())
    assert inputs[0] is inputs[1] is student
    mixed = [_teacher("a", (1, 8, 8)), _teacher("b", (1, 12, 12))]
    config = InputConfig(preprocess=[None, {"scale": 1}])
    with pytest.raises(ConfigError, match=r"the teachers take different inputs \(\[1, 8, 8\] for a, \[1, 12, 12\] "
                                          r"for b\); say what the student takes in the config's 'student:' section"):
        pool_inputs(pool, mixed, config)
    config.student = {"resize": [10, 10]}
    student, inputs = pool_inputs(pool, mixed, config)
    assert student.shape == (6, 1, 10, 10) and inputs[0] is not inputs[1]
    assert inputs[0].shape == (6, 1, 8, 8) and inputs[1].shape == (6, 1, 12, 12)
    with pytest.raises(ConfigError, match="preprocess lists 3 entries for 2 teachers"):
        pool_inputs(pool, mixed, InputConfig(preprocess=[None, None, None]))


def test_config_errors_are_one_line_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preprocess: {resize: [8, 8]}\nstudents: {}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'students' \(allowed: preprocess, student\)"):
        read_input_config(bad)
    with pytest.raises(ConfigError, match=r"student.channels must be 1 or 3, got 2"):
        read_input_config({"student": {"channels": 2}})
    with pytest.raises(ConfigError, match="config file not found"):
        read_input_config(tmp_path / "missing.yaml")
    config = read_input_config({"preprocess": [None, {"scale": 255}], "student": {"resize": [4, 4]}})
    assert config.preprocess == [None, {"scale": 255}] and config.student == {"resize": [4, 4]}
    with pytest.raises(ConfigError, match=r"takes 8×8 inputs but its preprocess resizes to 4×4"):
        prepare_pool(np.zeros((2, 1, 8, 8), np.float32), {"resize": [4, 4]}, (1, 8, 8), "teacher t")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"--unlabeled .*empty: the folder has no images"):
        prepare_pool(load_pool(tmp_path / "empty"), None, (1, 8, 8), "teacher t")
    with pytest.raises(CompositionError, match="no such file or folder"):
        load_pool(tmp_path / "nowhere.npy")
    with pytest.raises(ConfigError, match=r"the student has no fixed input size to read the images at; give one with "
                                          r"resize: \[height, width\] in its config section"):
        prepare_pool(tmp_path / "empty", {"channels": 1}, None, "the student")


def _tiny(classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(128, classes))


@pytest.fixture(scope="module")
def folder_case(tmp_path_factory):
    """Digits as 16×16 grey PNGs; teacher 0 (digits 0–5) reads 8×8 inputs, teacher 1 (4–9) 16×16, both in [0, 1]."""
    folder = tmp_path_factory.mktemp("compose_inputs")
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.images))
    images, y = data.images[order], data.target[order]
    pool_dir = folder / "pool"
    pool_dir.mkdir()
    pool, test, train = range(0, 500), slice(500, 800), slice(800, None)
    pixels = np.kron(images, np.ones((2, 2))) * 255 / 16  # 16×16, 0..255
    for i in pool:
        Image.fromarray(pixels[i].astype(np.uint8)).save(pool_dir / f"{i:04d}.png")
    full = (pixels / 255).astype(np.float32)[:, None]
    small = torch.nn.functional.avg_pool2d(torch.from_numpy(full), 2).numpy()
    teachers = []
    for i, (known, x, size) in enumerate([([0, 1, 2, 3, 4, 5], small, 8), ([4, 5, 6, 7, 8, 9], full, 16)]):
        rows = np.flatnonzero(np.isin(y[train], known))
        torch.manual_seed(i)
        model = train_classifier(_tiny(6), x[train][rows], np.searchsorted(known, y[train][rows]), epochs=20,
                                 batch_size=32, quiet=True)
        teachers.append(str(export_onnx(model, folder / f"t{i}.onnx", (1, size, size))))
        (folder / f"t{i}.txt").write_text("".join(f"digit{c}\n" for c in known))
    (folder / "config.yaml").write_text("student: {resize: [12, 12]}\n")
    student_test = torch.nn.functional.interpolate(torch.from_numpy(full[test]), size=(12, 12), mode="bilinear",
                                                   align_corners=False, antialias=True).numpy()
    return {"dir": folder, "teachers": teachers, "pool": str(pool_dir), "x_test": student_test, "y_test": y[test]}


def _compose_cli(case, tmp_path, *extra):
    args = [*case["teachers"], "--classes", str(case["dir"] / "t0.txt"), "--classes", str(case["dir"] / "t1.txt"),
            "--unlabeled", case["pool"], "-o", str(tmp_path / "student.onnx"), "--no-cache", "--threads", "1",
            "--epochs", "8", "--seed", "0", *extra]
    return CliRunner().invoke(compose_cmd, args)


def test_cli_composes_teachers_of_two_input_sizes_from_an_image_folder(folder_case, tmp_path):
    result = _compose_cli(folder_case, tmp_path, "--config", str(folder_case["dir"] / "config.yaml"),
                          "--report", str(tmp_path / "report.json"))
    assert result.exit_code == 0, result.output
    student = tmp_path / "student.onnx"
    dims = [d.dim_value for d in onnx.load(str(student)).graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [1, 12, 12]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["inputs"] == {"student": [1, 12, 12], "teachers": [[1, 8, 8], [1, 16, 16]]}
    assert report["config"].endswith("config.yaml")
    session = ort.InferenceSession(str(student), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: folder_case["x_test"]})[0]
    names = np.array([int(n.removeprefix("digit")) for n in read_classes(student)])
    assert (names[logits.argmax(axis=1)] == folder_case["y_test"]).mean() > 0.7


def test_cli_without_a_student_section_names_the_disagreeing_teachers(folder_case, tmp_path):
    result = _compose_cli(folder_case, tmp_path, "--report", str(tmp_path / "report.json"))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the teachers take different inputs ([1, 8, 8] for "), lines
    assert "say what the student takes in the config's 'student:' section" in lines[0]
    assert not (tmp_path / "student.onnx").exists() and not (tmp_path / "report.json").exists()


def test_feature_transfer_needs_teachers_that_take_the_students_input(folder_case):
    pool = load_pool(folder_case["pool"])
    teachers = [Teacher(lambda b: np.zeros((len(b), 6)), f"t{i}", input_shape=(1, s, s)) for i, s in enumerate((8, 16))]
    x, inputs = pool_inputs(pool, teachers, InputConfig(student={"resize": [16, 16]}))
    with pytest.raises(NeuralMergeError, match="--feature-transfer runs the teachers on the student's input"):
        compose(teachers, [[f"d{c}" for c in range(6)], [f"d{c}" for c in range(4, 10)]], x, teacher_inputs=inputs,
                feature_transfer=True, epochs=1)
