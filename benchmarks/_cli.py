"""What the benchmark scripts share: argument types and output checks that fail up front, in one
line, before minutes or hours of work, and the CPU's name for their headers."""
from __future__ import annotations

import argparse
import math
import platform
import sys
from pathlib import Path

from neuralmerge.errors import NeuralMergeError
from neuralmerge.io.onnx_files import check_output_paths, check_writable_folder, write_bytes_atomic


def number(kind: type, low: float, high: float | None = None, *, exclusive: bool = False):
    """An argparse type: a ``kind`` (int or float) at least ``low`` (above it if ``exclusive``)
    and at most ``high``; anything else is an argparse usage error (exit 2)."""
    def parse(text: str):
        value = kind(text)  # a ValueError is argparse's usual "invalid int value: 'x'"
        if not math.isfinite(value) or (value <= low if exclusive else value < low) or (high is not None and value > high):
            if high is None:
                bound = f"{'>' if exclusive else '>='} {low}"
            else:
                bound = f"in {'(' if exclusive else '['}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = number(int, 1)       # counts: seeds, runs, reps, rounds, images, threads, epochs, samples
non_negative_int = number(int, 0)   # counts that may be 0: warmup calls, augmented copies, a seed


def check_outputs(files=(), folders=()) -> None:
    """Exit with ``error: ...`` (status 1) unless every output folder exists or can be created
    (it is created) and every output file (``None``: not asked for) can be written, before any
    work. Files are overwritten, as the scripts always did."""
    try:
        for folder in map(Path, folders):
            if folder.exists() and not folder.is_dir():
                raise NeuralMergeError(f"output folder {folder} is a file")
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise NeuralMergeError(f"cannot write to folder {folder}: {exc.strerror}") from None
            check_writable_folder(folder)
        check_output_paths(files, force=True)
    except NeuralMergeError as exc:
        sys.exit(f"error: {exc}")


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the machine type: platform.processor()
    is only "x86_64" on Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def write_text(path: str | Path, text: str) -> None:
    """Write an output atomically (a temporary file renamed): an interrupted run leaves no half file."""
    write_bytes_atomic(text.encode(), path, force=True)
