"""Black-box teachers: batched inference through onnxruntime or any callable, cached on disk.

A teacher maps a float32 batch (B, ...) to logits (B, K). Its outputs on an unlabeled set are
cached under ``cache_dir`` in a file named by a hash of the teacher's identity (the ONNX file's
bytes, or a caller-given key for a callable) and of the data, so a rerun with other composition
settings does not run the teachers again. A callable without a key is never cached: there is
nothing reliable to hash.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from neuralmerge.compose import CompositionError

BatchFunction = Callable[[np.ndarray], np.ndarray]


@dataclass
class Teacher:
    """One black-box classifier: ``run(batch) -> logits``, a display name, and an optional cache key."""

    run: BatchFunction
    name: str
    cache_key: str | None = None
    input_shape: tuple[int, ...] | None = None   # one sample's shape, when the model declares it
    output_width: int | None = None              # number of logits, when the model declares it
    onnx_path: str | None = None                 # set for ONNX teachers: a white box feature transfer can import


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def onnx_teacher(path: str | os.PathLike, threads: int = 1) -> Teacher:
    """A teacher running the ONNX file at ``path`` with onnxruntime (first input, first output)."""
    from neuralmerge.zoo.train import onnx_session  # onnxruntime session with one-line load errors

    session = onnx_session(path, threads)
    declared = session.get_inputs()[0]
    dims = declared.shape[1:]
    input_shape = tuple(dims) if all(isinstance(d, int) and d > 0 for d in dims) else None
    out_dims = session.get_outputs()[0].shape
    output_width = out_dims[1] if len(out_dims) == 2 and isinstance(out_dims[1], int) else None

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {declared.name: batch})[0]

    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return Teacher(run, str(path), cache_key=f"onnx:{digest}", input_shape=input_shape, output_width=output_width,
                   onnx_path=str(path))


def as_teacher(teacher: "Teacher | str | os.PathLike | BatchFunction", index: int) -> Teacher:
    """Accept a Teacher, an ONNX path, or a bare callable (named ``teacher<index>``, not cached)."""
    if isinstance(teacher, Teacher):
        return teacher
    if isinstance(teacher, (str, os.PathLike)):
        return onnx_teacher(teacher)
    if callable(teacher):
        return Teacher(teacher, f"teacher{index}")
    raise CompositionError(f"teacher {index} is neither an ONNX path nor a callable")


def data_fingerprint(x: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
    digest.update(np.ascontiguousarray(x).data)
    return digest.hexdigest()


def _run_batches(teacher: Teacher, x: np.ndarray, batch_size: int, progress: bool) -> np.ndarray:
    outputs = []
    starts = range(0, len(x), batch_size)
    for start in tqdm(starts, desc=f"teacher {Path(teacher.name).name}", unit="batch", disable=not progress,
                      leave=False):
        batch = np.ascontiguousarray(x[start:start + batch_size], dtype=np.float32)
        try:
            result = teacher.run(batch)
            if hasattr(result, "detach"):  # a torch tensor from a Python teacher
                result = result.detach().cpu().numpy()
            logits = np.asarray(result, dtype=np.float64)
        except Exception as error:  # a black box may fail in any way; say which one and where
            raise CompositionError(f"teacher {teacher.name} failed on samples {start}..{start + len(batch) - 1}: "
                                   f"{_first_line(error)}") from error
        if logits.ndim != 2 or len(logits) != len(batch):
            raise CompositionError(f"teacher {teacher.name} returned shape {list(logits.shape)} for a batch of "
                                   f"{len(batch)}; expected (batch, classes) logits")
        if not np.isfinite(logits).all():
            bad = start + int(np.flatnonzero(~np.isfinite(logits).all(axis=1))[0])
            raise CompositionError(f"teacher {teacher.name} returned NaN or infinite logits (first at sample {bad})")
        outputs.append(logits)
    return np.concatenate(outputs)


def _cache_file(cache_dir: Path, teacher: Teacher, data_hash: str) -> Path:
    key = hashlib.sha256(f"{teacher.cache_key}|{data_hash}".encode()).hexdigest()[:32]
    return cache_dir / f"{key}.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def teacher_logits(teachers: Sequence[Teacher], x: np.ndarray | Sequence[np.ndarray], *, batch_size: int = 256,
                   cache_dir: str | os.PathLike | None = None, progress: bool = True) -> tuple[list[np.ndarray], list[bool]]:
    """Every teacher's logits (n, K_i) on ``x`` (one array for all, or one per teacher); also, per teacher,
    whether they came from the cache."""
    inputs = [x] * len(teachers) if isinstance(x, np.ndarray) else list(x)
    if len(inputs) != len(teachers):
        raise CompositionError(f"got {len(teachers)} teachers but {len(inputs)} inputs")
    if any(len(xi) == 0 for xi in inputs):
        raise CompositionError("the unlabeled set is empty")
    hashes: dict[int, str] = {}  # by array identity: teachers that share an input hash it once
    results, cached = [], []
    for teacher, x in zip(teachers, inputs):
        path = None
        if cache_dir is not None and teacher.cache_key:
            if id(x) not in hashes:
                hashes[id(x)] = data_fingerprint(x)
            path = _cache_file(Path(cache_dir).expanduser(), teacher, hashes[id(x)])
        if path is not None and path.is_file():
            try:
                logits = np.load(path)
            except (OSError, ValueError):  # a damaged cache entry is recomputed, never trusted
                logits = None
            if logits is not None and logits.ndim == 2 and len(logits) == len(x):
                results.append(logits)
                cached.append(True)
                continue
        logits = _run_batches(teacher, x, batch_size, progress)
        if path is not None:
            _save_atomic(path, logits)
        results.append(logits)
        cached.append(False)
    return results, cached


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/neuralmerge/teachers`` (``~/.cache/neuralmerge/teachers`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "neuralmerge" / "teachers"
