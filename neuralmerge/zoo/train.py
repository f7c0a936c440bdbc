"""Train, evaluate and export the small classifiers the project builds itself (CPU, deterministic).

The thread count is the caller's: nothing here calls ``torch.set_num_threads``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from tqdm import tqdm

from neuralmerge.errors import ConfigError
from neuralmerge.io.onnx_files import ort_session

# A model, or any function mapping a float32 NCHW numpy batch to logits (numpy or torch).
Classifier = nn.Module | Callable[[np.ndarray], np.ndarray | torch.Tensor]


def _check_xy(x: np.ndarray, y: np.ndarray) -> None:
    if len(x) != len(y):
        raise ConfigError(f"got {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise ConfigError("the dataset is empty")


def train_classifier(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int,
                     batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.0,
                     seed: int = 0, quiet: bool = False, x_val: np.ndarray | None = None,
                     y_val: np.ndarray | None = None) -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy; return it in eval mode.

    The learning rate follows a cosine decay from ``lr`` to 0 over all steps, which reaches a
    better plateau in few epochs than a constant rate. Shuffling is seeded with ``seed`` (the
    model's initial weights are the caller's business). With ``x_val``/``y_val`` the progress
    bar shows validation accuracy after every epoch.
    """
    _check_xy(x, y)
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    labels = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(inputs) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()

    progress = tqdm(range(epochs), desc="train", unit="epoch", disable=quiet)
    for _ in progress:
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        total_loss = 0.0
        for start in range(0, len(inputs), batch_size):
            batch = order[start:start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        status = {"loss": f"{total_loss / len(inputs):.4f}"}
        if x_val is not None and y_val is not None:
            status["val_acc"] = f"{evaluate(model, x_val, y_val):.4f}"
        progress.set_postfix(status)
    return model.eval()


def predict_logits(model: Classifier, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Logits of ``model`` for every row of ``x``, computed in batches without gradients."""
    if isinstance(model, nn.Module):
        model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = np.ascontiguousarray(x[start:start + batch_size], dtype=np.float32)
            logits = model(torch.from_numpy(batch)) if isinstance(model, nn.Module) else model(batch)
            outputs.append(logits.numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits))
    return np.concatenate(outputs)


def evaluate(model: Classifier, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Top-1 accuracy of a torch model (or a numpy-batch → logits callable) on ``x``, ``y``."""
    _check_xy(x, y)
    predictions = predict_logits(model, x, batch_size).argmax(axis=1)
    return float((predictions == np.asarray(y)).mean())


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...], *,
                opset: int = 17, input_name: str = "input", output_name: str = "logits") -> Path:
    """Write ``model`` as an ONNX file with a dynamic batch dimension; return the path.

    ``input_shape`` is one sample's shape, e.g. ``(1, 32, 32)``. The file is written next to its
    destination and renamed into place, so a crash never leaves a half-written model behind.
    """
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    example = torch.zeros((1, *input_shape), dtype=torch.float32)
    temporary = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is chosen on purpose (plain, stable op set); silence its
            # deprecation notice.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model, (example,), temporary, dynamo=False, opset_version=opset,
                input_names=[input_name], output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            )
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
        model.train(was_training)
    return destination


def onnx_session(path: str | os.PathLike, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``path`` (``threads`` = 0 lets onnxruntime choose)."""
    return ort_session(path, threads)


def onnx_accuracy(path: str | os.PathLike, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Top-1 accuracy of the ONNX classifier at ``path`` run by onnxruntime, in batches."""
    session = onnx_session(path)
    input_name = session.get_inputs()[0].name
    return evaluate(lambda batch: session.run(None, {input_name: batch})[0], x, y, batch_size)
