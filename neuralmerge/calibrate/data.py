"""Calibration data: one ``--calib`` source per model, loaded, checked against the model and split.

A source is an ``.npy`` array (N × the model's input shape, already preprocessed), an ``.npz``
with key ``x`` and optional integer labels ``y``, or a folder of images that the config's
``preprocess`` section turns into arrays (resize, channels, scale, mean, std). Labels are optional;
every check happens here, before any encoding or training.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import ConfigError
from ..graph.normalize import TensorSpec, input_specs, output_specs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(eq=False)
class CalibrationSet:
    """One model's calibration samples (its only input) and, optionally, labels."""
    source: str
    input_name: str              # the model's input name in the source model
    x: np.ndarray                # [N, ...] in the model's input dtype
    y: np.ndarray | None = None  # [N] int64 class indices

    def __len__(self) -> int:
        return len(self.x)

    def digest(self) -> str:
        """A hash of the samples and labels (part of a checkpoint's fingerprint)."""
        h = hashlib.sha256(np.ascontiguousarray(self.x).tobytes())
        if self.y is not None:
            h.update(np.ascontiguousarray(self.y).tobytes())
        return h.hexdigest()


def num_classes(model: onnx.ModelProto) -> int | None:
    """Classes of the model's first output if it is a [N, K] score vector, else None."""
    specs = output_specs(model)
    if specs and len(specs[0].shape) == 2 and isinstance(specs[0].shape[1], int) and specs[0].shape[1] > 1:
        return int(specs[0].shape[1])
    return None


def load_calibration(paths: list[str], models: list[onnx.ModelProto], preprocess: list | None = None
                     ) -> list[CalibrationSet]:
    """Load one source per model (in model order) and check it against the model's input and classes."""
    if len(paths) != len(models):
        raise ConfigError(f"--calib was given {len(paths)} time{'s' if len(paths) != 1 else ''} for "
                          f"{len(models)} model{'s' if len(models) != 1 else ''} (one source per model, in model order)")
    preprocess = list(preprocess or [])
    if len(preprocess) == 1 and len(models) > 1:
        preprocess = preprocess * len(models)
    if preprocess and len(preprocess) != len(models):
        raise ConfigError(f"preprocess lists {len(preprocess)} entries for {len(models)} models")
    sets = []
    for i, (path, model) in enumerate(zip(paths, models)):
        specs = input_specs(model)
        if len(specs) != 1:
            raise ConfigError(f"--calib {path}: calibration supports models with one input; model {i} has "
                              f"{len(specs)}")
        spec = specs[0]
        x, y = _read_source(Path(path), spec, preprocess[i] if preprocess else None)
        _check_samples(path, x, spec)
        if y is not None:
            _check_labels(path, y, len(x), num_classes(model))
        sets.append(CalibrationSet(str(path), spec.name, np.ascontiguousarray(x), y))
    return sets


def _read_source(path: Path, spec: TensorSpec, preprocess: dict | None) -> tuple[np.ndarray, np.ndarray | None]:
    if path.is_dir():
        return load_image_folder(path, spec, preprocess), None
    if not path.is_file():
        raise ConfigError(f"--calib {path}: no such file or folder")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                if "x" not in archive:
                    raise ConfigError(f"--calib {path}: the .npz has no array 'x' (keys: {', '.join(archive) or 'none'})")
                return archive["x"], (archive["y"] if "y" in archive else None)
    except (ValueError, OSError, EOFError) as exc:  # numpy's errors for truncated or pickled files
        raise ConfigError(f"--calib {path}: cannot read: {str(exc).splitlines()[0]}") from exc
    raise ConfigError(f"--calib {path}: expected a .npy file, a .npz file or a folder of images")


def _check_samples(path: str, x: np.ndarray, spec: TensorSpec) -> None:
    want = tuple("N" if k == 0 else ("?" if d is None else d) for k, d in enumerate(spec.shape))
    pretty = "×".join(map(str, want))
    if x.dtype != spec.dtype:
        raise ConfigError(f"--calib {path}: dtype {x.dtype} does not match the model input '{spec.name}' "
                          f"({np.dtype(spec.dtype).name})")
    if x.ndim != len(spec.shape) or any(d is not None and k > 0 and x.shape[k] != d for k, d in enumerate(spec.shape)):
        raise ConfigError(f"--calib {path}: shape {'×'.join(map(str, x.shape))} does not match the model input "
                          f"'{spec.name}' ({pretty})")
    if len(x) == 0:
        raise ConfigError(f"--calib {path}: no samples")
    if len(x) < 2:
        raise ConfigError(f"--calib {path}: needs at least 2 samples (one is held out to measure fidelity)")
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise ConfigError(f"--calib {path}: {bad} of {x.size} values are NaN or infinite")


def _check_labels(path: str, y: np.ndarray, n: int, classes: int | None) -> None:
    if y.ndim != 1 or len(y) != n:
        raise ConfigError(f"--calib {path}: labels 'y' must have one entry per sample ({n}), got shape "
                          f"{'×'.join(map(str, y.shape))}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"--calib {path}: labels 'y' must be integers, got {y.dtype}")
    if classes is None:
        raise ConfigError(f"--calib {path}: labels were given but the model's first output is not a class-score vector")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= classes:
        raise ConfigError(f"--calib {path}: labels must be in [0, {classes - 1}], found {low if low < 0 else high}")


def load_image_folder(folder: Path, spec: TensorSpec, preprocess: dict | None, flag: str = "--calib") -> np.ndarray:
    """Images of ``folder`` (sorted by name) as an N×C×H×W array, preprocessed as the config says.

    Defaults: resize to the model's input size, the model's channel count, scale 255, mean 0, std 1.
    Errors name the folder after ``flag``, the option that gave it.
    """
    from PIL import Image  # only folders need Pillow (a matplotlib dependency)

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"{flag} {folder}: the folder has no images ({', '.join(IMAGE_SUFFIXES)})")
    if len(spec.shape) != 4:
        raise ConfigError(f"{flag} {folder}: image folders need a model with an N×C×H×W input; "
                          f"'{spec.name}' has {len(spec.shape)} dimensions")
    pre = preprocess or {}
    _, channels, height, width = spec.shape
    channels = pre.get("channels", channels or 3)
    if "resize" in pre:
        height, width = pre["resize"]
    if height is None or width is None:
        raise ConfigError(f"{flag} {folder}: the model input has no fixed size; set preprocess.resize")
    mean = np.asarray(pre.get("mean", 0.0), np.float32).reshape(-1, 1, 1)
    std = np.asarray(pre.get("std", 1.0), np.float32).reshape(-1, 1, 1)
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                image = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
                pixels = np.asarray(image, np.float32)
        except OSError as exc:
            raise ConfigError(f"{flag} {file}: cannot read the image: {str(exc).splitlines()[0]}") from exc
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        images.append((pixels / float(pre.get("scale", 255.0)) - mean) / std)
    return np.stack(images).astype(spec.dtype)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train indices, held-out indices); at least one of each."""
    order = np.random.default_rng(seed).permutation(n)
    held = min(max(1, int(round(n * fraction))), n - 1)
    return np.sort(order[held:]), np.sort(order[:held])
