"""Reading ONNX files safely and writing outputs atomically."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from ..errors import ModelLoadError, NeuralMergeError


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check one ONNX file; any problem is a one-line ``ModelLoadError``."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"model file is empty: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ...: all mean the same to a user
        raise ModelLoadError(f"cannot parse ONNX file {path} (truncated or corrupt): {_first_line(exc)}") from exc
    if not model.graph.node:
        raise ModelLoadError(f"{path} is not a valid ONNX model (it has no graph nodes; truncated or corrupt?)")
    try:  # with strict shape inference: a wrong declared shape would fail the merged model's check
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX model: {_first_line(exc)}") from exc
    return model


def ort_session(model: "str | os.PathLike | bytes | onnx.ModelProto", threads: int = 1):
    """A CPU onnxruntime session (``threads`` intra-op threads, 0 = onnxruntime's choice, one
    inter-op thread, every graph optimisation); a file it cannot load is a ``ModelLoadError``."""
    import onnxruntime as ort  # imported here: reading and writing ONNX files does not need it

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # fatal only: the caller reports every error in one line of its own
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        if not Path(model).is_file():
            raise ModelLoadError(f"no such ONNX file: {model}")
        model = str(model)
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        where = model if isinstance(model, str) else "the model"
        raise ModelLoadError(f"cannot load ONNX file {where} in onnxruntime: {_first_line(exc)}") from None


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike, *, force: bool = False) -> int:
    """Write ``model`` to ``path`` through a temporary file in the same folder; returns the byte size."""
    data = model.SerializeToString()
    write_bytes_atomic(data, path, force=force)
    return len(data)


def write_bytes_atomic(data: bytes, path: str | os.PathLike, *, force: bool = False) -> None:
    """Write bytes so that readers never see a half-written file (temp file, then rename)."""
    path = Path(path)
    check_output_path(path, force=force)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise NeuralMergeError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(path: str | os.PathLike, *, force: bool) -> None:
    """Refuse to overwrite without ``force`` and require an existing parent folder."""
    if not str(path):
        raise NeuralMergeError("an output path is empty")
    path = Path(path)
    if path.exists() and not force:
        raise NeuralMergeError(f"output {path} exists (use --force to overwrite)")
    if path.is_dir():
        raise NeuralMergeError(f"output {path} is a directory")
    if not path.parent.is_dir():
        raise NeuralMergeError(f"output folder {path.parent} does not exist")


def check_output_paths(outputs, inputs=(), *, force: bool) -> None:
    """Before any work is done: ``check_output_path`` for every output given (``None`` skipped),
    and a file created in its folder; no output may be another output or one of ``inputs`` (a
    model, a report or data overwritten)."""
    seen: dict[str, str] = {}
    for out in outputs:
        if out is None:
            continue
        check_output_path(out, force=force)
        check_writable_folder(Path(out).parent)
        key = os.path.realpath(out)
        if key in seen:
            raise NeuralMergeError(f"two outputs name the same file: {seen[key]} and {out}")
        seen[key] = str(out)
    for src in inputs:
        if src and os.path.realpath(src) in seen:
            raise NeuralMergeError(f"output {seen[os.path.realpath(src)]} would overwrite the input {src}")


def check_writable_folder(folder: str | os.PathLike) -> None:
    """A file can be created in ``folder``: the only sure test (permissions, read-only or virtual
    file systems) is to create one."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise NeuralMergeError(f"cannot write to folder {folder}: {exc.strerror}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
