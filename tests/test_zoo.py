"""Offline datasets and the small-model training/export utilities (neuralmerge.zoo)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from neuralmerge.errors import ConfigError, ModelLoadError, NeuralMergeError
from neuralmerge.zoo.architectures import LeNet
from neuralmerge.zoo.datasets import Dataset, class_subset, digits32, shapes, sound20
from neuralmerge.zoo.train import evaluate, export_onnx, onnx_accuracy, train_classifier


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return digits32(seed=0, augment=1)


@pytest.fixture(scope="module")
def sounds() -> Dataset:
    return sound20(n_per_class=60, seed=0)


@pytest.fixture(scope="module")
def figures() -> Dataset:
    return shapes(n_per_class=40, seed=0)


def assert_well_formed(ds: Dataset, num_classes: int, size: int = 32) -> None:
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.ndim == 4 and x.shape[1:] == (1, size, size)
        assert len(x) == len(y)
        assert np.isfinite(x).all()
        assert set(np.unique(y)) == set(range(num_classes))
    assert len(ds.classes) == ds.num_classes == num_classes
    assert len(set(ds.classes)) == num_classes
    assert ds.input_shape == (1, size, size)
    # Standardised with the training split's statistics.
    assert abs(float(ds.x_train.mean())) < 1e-3
    assert abs(float(ds.x_train.std()) - 1.0) < 1e-3


def assert_same(a: Dataset, b: Dataset) -> None:
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def assert_balanced(labels: np.ndarray, num_classes: int) -> None:
    counts = np.bincount(labels, minlength=num_classes)
    assert counts.max() - counts.min() <= 1, counts


# --- digits32 -------------------------------------------------------------------------------


def test_digits32_shapes_split_and_augmentation(digits: Dataset) -> None:
    assert_well_formed(digits, 10)
    assert digits.name == "digits32"
    # 1797 images, 25 % stratified test split, one augmented copy of each training image.
    assert len(digits.x_test) == 450
    assert len(digits.x_train) == 2 * (1797 - 450)
    original, shifted = np.split(digits.x_train, 2)
    np.testing.assert_array_equal(*np.split(digits.y_train, 2))
    assert not np.allclose(original, shifted)
    assert abs(float(digits.x_test.mean())) < 0.1  # same statistics as the training split
    test_counts = np.bincount(digits.y_test, minlength=10)
    assert test_counts.min() >= 43 and test_counts.max() <= 47  # stratified (classes have 174–183)


def test_digits32_is_deterministic_per_seed(digits: Dataset) -> None:
    assert_same(digits, digits32(seed=0, augment=1))
    other = digits32(seed=1, augment=1)
    assert not np.array_equal(digits.y_test, other.y_test)
    assert len(digits32(augment=0).x_train) == 1797 - 450


def test_digits32_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="augment"):
        digits32(augment=-1)
    with pytest.raises(ConfigError, match="test_fraction"):
        digits32(test_fraction=1.5)


# --- sound20 --------------------------------------------------------------------------------


def test_sound20_shapes_balance_and_names(sounds: Dataset) -> None:
    assert_well_formed(sounds, 20)
    assert sounds.name == "sound20"
    assert len(sounds.x_train) + len(sounds.x_test) == 20 * 60
    assert_balanced(sounds.y_test, 20)
    assert {"tone_low", "chirp_up", "chirp_down", "noise_high", "clicks_fast"} <= set(sounds.classes)


def test_sound20_is_deterministic_per_seed() -> None:
    assert_same(sound20(n_per_class=8, seed=0), sound20(n_per_class=8, seed=0))
    assert not np.allclose(sound20(n_per_class=8, seed=0).x_train, sound20(n_per_class=8, seed=1).x_train)


def pooled(x: np.ndarray) -> np.ndarray:
    """2×2 average pooling, flattened: 256 features keep the linear probe fast."""
    return x.reshape(len(x), 16, 2, 16, 2).mean(axis=(2, 4)).reshape(len(x), -1)


def test_sound20_is_learnable_but_not_trivial(sounds: Dataset) -> None:
    linear = LogisticRegression(max_iter=300).fit(pooled(sounds.x_train), sounds.y_train)
    accuracy = float((linear.predict(pooled(sounds.x_test)) == sounds.y_test).mean())
    # Chance is 5 %; noise, stray tones and overlapping classes keep a linear model well below 100 %.
    assert 0.4 < accuracy < 0.9, accuracy


# --- shapes ---------------------------------------------------------------------------------


def test_shapes_shapes_balance_and_determinism(figures: Dataset) -> None:
    assert_well_formed(figures, 10)
    assert_balanced(figures.y_test, 10)
    assert figures.classes[:5] == ["circle", "square", "triangle", "cross", "ring"]
    assert_same(figures, shapes(n_per_class=40, seed=0))
    assert not np.allclose(figures.x_train, shapes(n_per_class=40, seed=1).x_train)


def test_shapes_options() -> None:
    small = shapes(n_per_class=8, seed=0, num_classes=3, size=16)
    assert_well_formed(small, 3, size=16)
    assert len(small.x_train) + len(small.x_test) == 24
    with pytest.raises(ConfigError, match="num_classes"):
        shapes(num_classes=50)


# --- class_subset ---------------------------------------------------------------------------


def test_class_subset_relabels_and_limits(digits: Dataset) -> None:
    subset = class_subset(digits, [7, 2, 9], n=20, seed=3)
    assert subset.classes == ["7", "2", "9"]
    assert subset.name == "digits32[7,2,9]"
    assert np.bincount(subset.y_train).tolist() == [20, 20, 20]
    assert np.bincount(subset.y_test).tolist() == [int((digits.y_test == c).sum()) for c in (7, 2, 9)]
    # Every kept sample is one of the original samples of the matching class.
    sevens = digits.x_train[digits.y_train == 7].reshape(-1, 32 * 32)
    for image in subset.x_train[subset.y_train == 0][:5]:
        assert (np.abs(sevens - image.reshape(1, -1)).max(axis=1) == 0).any()
    assert_same(subset, class_subset(digits, [7, 2, 9], n=20, seed=3))
    assert len(class_subset(digits, [0, 1]).x_train) == int(np.isin(digits.y_train, [0, 1]).sum())


@pytest.mark.parametrize("classes", [[], [1, 1], [3, 10], [-1]])
def test_class_subset_rejects_bad_classes(digits: Dataset, classes: list[int]) -> None:
    with pytest.raises(ConfigError):
        class_subset(digits, classes)


# --- training, evaluation, export -------------------------------------------------------------


def test_one_epoch_lenet_beats_chance(digits: Dataset) -> None:
    torch.manual_seed(0)
    model = train_classifier(LeNet(10), digits.x_train[:600], digits.y_train[:600], epochs=1,
                             batch_size=32, seed=0, quiet=True)
    assert not model.training
    assert evaluate(model, digits.x_test, digits.y_test) > 0.6  # chance is 0.1


def test_training_is_deterministic_for_a_seed(digits: Dataset) -> None:
    def run(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = train_classifier(LeNet(10), digits.x_train[:96], digits.y_train[:96], epochs=2,
                                 batch_size=32, seed=seed, quiet=True)
        return [p.detach().clone() for p in model.parameters()]

    first, again, reshuffled = run(0), run(0), run(1)
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(first[0], reshuffled[0])


def test_evaluate_accepts_a_numpy_callable() -> None:
    x = np.zeros((5, 1, 4, 4), np.float32)
    y = np.array([0, 1, 1, 1, 0])
    always_one = lambda batch: np.tile([0.0, 1.0], (len(batch), 1))  # noqa: E731
    assert evaluate(always_one, x, y, batch_size=2) == pytest.approx(0.6)
    with pytest.raises(ConfigError):
        evaluate(always_one, x, y[:3])


def test_export_onnx_matches_torch(tmp_path, digits: Dataset) -> None:
    torch.manual_seed(0)
    model = LeNet(10)
    model.train()
    path = export_onnx(model, tmp_path / "nested" / "lenet.onnx", (1, 32, 32))
    assert model.training  # export does not change the caller's mode
    assert sorted(p.name for p in path.parent.iterdir()) == ["lenet.onnx"]  # no temp file left

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    model.eval()
    for batch in (digits.x_test[:1], digits.x_test[:37]):  # dynamic batch dimension
        (onnx_logits,) = session.run(None, {"input": batch})
        with torch.no_grad():
            torch_logits = model(torch.from_numpy(batch)).numpy()
        np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4, rtol=0)
    x, y = digits.x_test[:300], digits.y_test[:300]
    assert onnx_accuracy(path, x, y) == pytest.approx(evaluate(model, x, y))


def test_onnx_accuracy_reports_missing_or_corrupt_files(tmp_path) -> None:
    x, y = np.zeros((2, 1, 32, 32), np.float32), np.zeros(2, np.int64)
    with pytest.raises(ModelLoadError, match="no such ONNX file"):
        onnx_accuracy(tmp_path / "missing.onnx", x, y)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(NeuralMergeError, match="cannot load ONNX file"):
        onnx_accuracy(corrupt, x, y)
