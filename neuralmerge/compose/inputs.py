"""The unlabeled pool as each teacher and the student see it.

The pool is an array file (``.npy``, or ``.npz`` with key ``x``) or a folder of images. Without a
config every teacher and the student take the arrays as they are (so their input shapes must
agree), and an image folder is read at the teachers' input size. A YAML config (``--config``)
prepares the pool per teacher and for the student with the keys of calibration's ``preprocess``
section: ``resize: [H, W]``, ``channels`` (1 or 3), ``scale`` (values are divided by it first;
default 255 for images, 1 for arrays), ``mean`` and ``std`` (a number, or one per channel)::

    preprocess:            # one mapping for every teacher, or a list with one (or null) per teacher
      scale: 1
    student: {resize: [16, 16], mean: 0.5, std: 0.25}

A teacher with a preprocess entry (or any teacher, for an image folder) gets the pool resized to
its ONNX input's size when that is fixed. The student takes the
``student`` mapping applied to the pool (images with the teachers' channel count unless it says
otherwise) or, without one, the teachers' input when they all take the same.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from neuralmerge.compose import CompositionError
from neuralmerge.errors import ConfigError
from neuralmerge.settings import check_preprocess, load_config_mapping, parse_preprocess

if TYPE_CHECKING:  # pragma: no cover
    from neuralmerge.compose.teachers import Teacher

_CONFIG_KEYS = ("preprocess", "student")
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as Pillow converts RGB to grey


@dataclass
class InputConfig:
    """The config's ``preprocess`` (none, one for all teachers, or one per teacher) and ``student`` mappings."""

    preprocess: list = field(default_factory=list)
    student: dict | None = None
    source: str = "config"


def read_input_config(config: str | os.PathLike | dict | None) -> InputConfig:
    """Parse and check a compose config (a YAML path or a dict); None gives the empty config."""
    if config is None:
        return InputConfig()
    data, source = load_config_mapping(config, _CONFIG_KEYS)
    preprocess = parse_preprocess(data.get("preprocess"), source, per="teacher")
    return InputConfig(preprocess, check_preprocess(data.get("student"), f"{source}: student"), source)


def read_array_file(path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Arrays from a ``.npy`` (the first key) or ``.npz`` file (every key must be present)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError:  # numpy's message for a file that is neither speaks of pickles
        raise CompositionError(f"{path}: not a readable .npy or .npz file") from None
    except (OSError, EOFError) as exc:
        raise CompositionError(f"{path}: cannot read as .npy/.npz ({str(exc).splitlines()[0][:200]})") from None
    if isinstance(loaded, np.ndarray):
        if len(keys) > 1:
            raise CompositionError(f"{path}: expected an .npz file with arrays {', '.join(keys)}")
        return {keys[0]: loaded}
    with loaded:
        missing = [k for k in keys if k not in loaded.files]
        if missing:
            raise CompositionError(f"{path}: no array '{missing[0]}' (found {', '.join(loaded.files) or 'none'})")
        return {k: loaded[k] for k in keys}


def load_pool(path: str | os.PathLike) -> np.ndarray | Path:
    """The unlabeled pool: the array of a ``.npy``/``.npz`` file (key ``x``), or the path of an image folder."""
    path = Path(path)
    if path.is_dir():
        return path
    if not path.is_file():
        raise CompositionError(f"--unlabeled {path}: no such file or folder")
    return read_array_file(path, ("x",))["x"]


def prepare_pool(pool: np.ndarray | Path, preprocess: dict | None, shape: tuple | None, who: str) -> np.ndarray:
    """The pool as float32 (N, *shape) for ``who``: read (images), channels converted, resized, normalised.

    ``shape`` is the input ``who`` declares (None: whatever the pool and ``preprocess`` give).
    """
    pre = preprocess or {}
    if shape is not None and "resize" in pre and len(shape) == 3 and tuple(pre["resize"]) != tuple(shape[1:]):
        raise ConfigError(f"{who} takes {shape[1]}×{shape[2]} inputs but its preprocess resizes to "
                          f"{pre['resize'][0]}×{pre['resize'][1]}")
    if isinstance(pool, Path):
        if shape is None and "resize" not in pre:
            raise ConfigError(f"{who} has no fixed input size to read the images at; give one with resize: "
                              f"[height, width] in its config section")
        from neuralmerge.calibrate.data import load_image_folder
        from neuralmerge.graph.normalize import TensorSpec

        spec_shape = (None, *shape) if shape is not None else (None, pre.get("channels", 3), None, None)
        x = load_image_folder(pool, TensorSpec(who, spec_shape, np.dtype(np.float32)), pre, flag="--unlabeled")
    elif not pre:  # arrays are taken as they are unless the config says how to prepare them
        x = np.asarray(pool, dtype=np.float32)
    else:
        x = _transform_array(np.asarray(pool, dtype=np.float32), pre, shape, who)
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise CompositionError(f"{who} takes inputs {list(shape)} but the unlabeled samples are "
                               f"{list(x.shape[1:])}; resize them with the config's preprocess section")
    return np.ascontiguousarray(x)


def _transform_array(x: np.ndarray, pre: dict, shape: tuple | None, who: str) -> np.ndarray:
    """Channels, size and normalisation of an N×C×H×W array pool (scale defaults to 1: arrays hold values)."""
    image = tuple(shape) if shape is not None and len(shape) == 3 else None  # a declared C×H×W input
    want_channels = pre.get("channels", image[0] if image else None)
    want_size = tuple(pre["resize"]) if "resize" in pre else (image[1:] if image else None)
    if (want_channels is not None or want_size is not None) and x.ndim != 4:
        raise CompositionError(f"{who}: resizing and channel conversion need an N×C×H×W pool, got shape "
                               f"{list(x.shape)}")
    if want_channels is not None and want_channels != x.shape[1]:
        if x.shape[1] == 1 and want_channels == 3:
            x = np.repeat(x, 3, axis=1)
        elif x.shape[1] == 3 and want_channels == 1:
            x = np.einsum("nchw,c->nhw", x, _LUMA)[:, None]
        else:
            raise CompositionError(f"{who} takes {want_channels} channels; the pool has {x.shape[1]} "
                                   f"(only 1 <-> 3 is converted)")
    if want_size is not None and tuple(x.shape[2:]) != want_size:
        import torch
        import torch.nn.functional as F

        # antialiased bilinear, like Pillow's BILINEAR resize of image folders
        with torch.no_grad():
            x = F.interpolate(torch.from_numpy(np.ascontiguousarray(x)), size=want_size, mode="bilinear",
                              align_corners=False, antialias=True).numpy()
    mean = np.asarray(pre.get("mean", 0.0), np.float32).reshape(-1, *([1] * (x.ndim - 2)))
    std = np.asarray(pre.get("std", 1.0), np.float32).reshape(-1, *([1] * (x.ndim - 2)))
    if mean.size not in (1, x.shape[1]) or std.size not in (1, x.shape[1]):
        raise ConfigError(f"{who}: mean and std take one value or one per channel ({x.shape[1]})")
    return ((x / np.float32(pre.get("scale", 1.0)) - mean) / std).astype(np.float32)


def pool_inputs(pool: np.ndarray | Path, teachers: Sequence["Teacher"], config: InputConfig
                ) -> tuple[np.ndarray, list[np.ndarray]]:
    """(the student's input, each teacher's input): the pool prepared as ``config`` says, one array per
    distinct preparation (teachers that take the same input share it)."""
    count = len(teachers)
    entries = list(config.preprocess)
    if len(entries) == 1:
        entries = entries * count
    if entries and len(entries) != count:
        raise ConfigError(f"{config.source}: preprocess lists {len(entries)} entries for {count} teachers")
    entries = entries or [None] * count
    prepared: dict[str, np.ndarray] = {}
    teacher_inputs = []
    for teacher, pre in zip(teachers, entries):
        key = json.dumps([pre, teacher.input_shape], sort_keys=True)
        if key not in prepared:
            prepared[key] = prepare_pool(pool, pre, teacher.input_shape, f"teacher {teacher.name}")
        teacher_inputs.append(prepared[key])
    if config.student is not None:
        student = dict(config.student)
        channels = {x.shape[1] for x in teacher_inputs if x.ndim == 4}
        if isinstance(pool, Path) and "channels" not in student and len(channels) == 1:
            student["channels"] = channels.pop()  # images: the teachers' channels, not Pillow's RGB default
        return prepare_pool(pool, student, None, "the student"), teacher_inputs
    if len(prepared) == 1:
        return teacher_inputs[0], teacher_inputs
    if any(x.shape[1:] != teacher_inputs[0].shape[1:] for x in teacher_inputs):
        shapes = ", ".join(f"{list(x.shape[1:])} for {t.name}" for t, x in zip(teachers, teacher_inputs))
        raise ConfigError(f"the teachers take different inputs ({shapes}); say what the student takes in the "
                          f"config's 'student:' section")
    raise ConfigError("the teachers' inputs are prepared differently; say what the student takes in the "
                      "config's 'student:' section")
