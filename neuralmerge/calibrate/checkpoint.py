"""Resumable calibration: ``{checkpoint_dir}/calib.pt``, written atomically after every stage and epoch.

The file carries a fingerprint of everything that decides the result except the epoch count
(source models' bytes, calibration data, encoding and calibration settings, seed), so
``--resume`` refuses a checkpoint made for other models or data. The training stage records the
epoch count itself, and the trainer refuses to continue it with another.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch

from ..errors import NeuralMergeError
from ..io.onnx_files import write_bytes_atomic

FILE_NAME = "calib.pt"


class CheckpointMismatch(NeuralMergeError):
    """``--resume`` found a checkpoint of a different job."""


def fingerprint(parts: list) -> str:
    """sha256 over byte strings and JSON-able settings, in order."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


class Checkpoint:
    """One job's checkpoint file: a dict of stages (``plan``, ``search``, ``training``) saved on rank 0."""

    def __init__(self, directory: str | os.PathLike, key: str, *, enabled: bool = True):
        self.path = Path(directory) / FILE_NAME
        self.key = key
        self.enabled = enabled   # False on ranks other than 0: they read nothing and write nothing
        self.state: dict = {"fingerprint": key}

    def load(self) -> None:
        """Read the file for ``--resume``; a missing, unreadable or foreign checkpoint is a one-line error."""
        if not self.path.is_file():
            raise NeuralMergeError(f"--resume: no checkpoint at {self.path}")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to a user
            raise NeuralMergeError(f"--resume: cannot read {self.path}: {str(exc).splitlines()[0][:200]}") from exc
        if not isinstance(state, dict) or state.get("fingerprint") != self.key:
            raise CheckpointMismatch(f"--resume: {self.path} was made for different models, data or settings")
        self.state = state

    def get(self, stage: str):
        return self.state.get(stage)

    def save(self, stage: str, value) -> None:
        self.state[stage] = value
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(self.state, buffer)
        write_bytes_atomic(buffer.getvalue(), self.path, force=True)

    def remove(self) -> None:
        """Delete the file (and its folder if that is left empty) after a finished job."""
        if not self.enabled:
            return
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()
        except OSError:
            pass
