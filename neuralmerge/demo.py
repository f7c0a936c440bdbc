"""The embedded default job: train two small models offline, merge them, measure, report.

Model A is the paper's LeNet on scikit-learn's digits (upsampled to 32×32); model B is the same
LeNet on a procedurally generated 20-class "sound" task (Sound20-like spectrograms). Both are
trained here in about a minute, exported to ONNX, merged with the ACCU preset, calibrated on the
training images *without their labels* (the test images are never seen), and checked for size and
per-task test accuracy, before and after calibration, in stock ONNX Runtime.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from .errors import ConfigError
from .fidelity import ort_session, run_merged_model
from .io.onnx_files import write_bytes_atomic
from .pipeline import merge
from .zoo.architectures import LeNet
from .zoo.datasets import digits32, sound20
from .zoo.train import export_onnx, onnx_accuracy, train_classifier

TASKS = (  # name, dataset factory, epochs, input name, output name
    ("digits", lambda seed: digits32(seed=seed), 4, "image", "digit_logits"),
    ("sound20", lambda seed: sound20(seed=seed), 8, "spectrogram", "sound_logits"),
)


def run_demo(out_dir: str | Path = "neuralmerge-demo", *, preset: str = "accu", seed: int = 0,
             quiet: bool = False, force: bool = False, calib_epochs: int = 2) -> dict:
    """Run the demo; write models, the merged model and reports into ``out_dir``; return the summary."""
    out = Path(out_dir)
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the demo folder {out}: {exc.strerror}") from None
    start = time.perf_counter()
    sources, data = [], []
    for name, make, epochs, in_name, out_name in TASKS:
        ds = make(seed)
        torch.manual_seed(seed)
        model = train_classifier(LeNet(ds.num_classes), ds.x_train, ds.y_train, epochs=epochs, seed=seed,
                                 quiet=quiet)
        path = export_onnx(model, out / f"{name}.onnx", ds.input_shape, input_name=in_name, output_name=out_name)
        sources.append(path)
        np.save(out / f"{name}_calib.npy", ds.x_train)   # calibration data: the training images, no labels
        data.append((name, ds, in_name, out_name))
    train_seconds = time.perf_counter() - start

    uncalibrated = merge(sources, preset=preset, seed=seed, quiet=True, fidelity_samples=4)
    result = merge(sources, out / "merged.onnx", preset=preset, seed=seed, force=True, quiet=quiet,
                   report=out / "report.json", calib=[out / f"{name}_calib.npy" for name, *_ in data],
                   calibration={"epochs": calib_epochs})
    tasks = []
    for i, (name, ds, in_name, out_name) in enumerate(data):
        original = onnx_accuracy(sources[i], ds.x_test, ds.y_test)
        before, after = (_task_accuracy(m, i, ds, in_name, out_name) for m in (uncalibrated.model, result.model))
        tasks.append({"task": name, "classes": ds.num_classes, "test_samples": int(len(ds.y_test)),
                      "original_accuracy": original, "uncalibrated_accuracy": before, "merged_accuracy": after,
                      "drop": original - after})
    summary = {
        "preset": preset, "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "input_bytes": result.report["input_bytes"], "merged_bytes": result.report["output_bytes"],
        "compression_ratio": result.report["compression_ratio"], "tasks": tasks,
    }
    write_bytes_atomic(json.dumps(summary, indent=2).encode(), out / "demo.json", force=True)
    write_bytes_atomic(format_demo(summary).encode(), out / "demo.md", force=True)
    return summary


def _task_accuracy(model: onnx.ModelProto, i: int, ds, in_name: str, out_name: str) -> float:
    """Test accuracy of task ``i`` run inside the merged ``model`` (stock ONNX Runtime)."""
    session = ort_session(model, threads=2)
    names = _name_maps(model)[i]
    logits = np.concatenate([run_merged_model(session, names, {in_name: ds.x_test[k:k + 512]})[out_name]
                             for k in range(0, len(ds.x_test), 512)])
    return float((logits.argmax(1) == ds.y_test).mean())


def _name_maps(merged: onnx.ModelProto) -> list[dict[str, str]]:
    props = {p.key: p.value for p in merged.metadata_props}
    maps = []
    for m in json.loads(props["neuralmerge.models"]):
        maps.append({e["original"]: e["name"] for e in m["inputs"] + m["outputs"]})
    return maps


def format_demo(summary: dict) -> str:
    lines = [
        f"# neuralmerge demo ({summary['preset']} preset)",
        "",
        f"Two LeNets trained offline in {summary['train_seconds']} s, merged into one ONNX file: "
        f"{summary['input_bytes']:,} → {summary['merged_bytes']:,} bytes "
        f"(**{summary['compression_ratio']:.2f}×** smaller).",
        "",
        "Calibrated on the training images without labels.",
        "",
        "| task | classes | test samples | original accuracy | merged, before calibration | after | drop |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in summary["tasks"]:
        lines.append(f"| {t['task']} | {t['classes']} | {t['test_samples']} | {100 * t['original_accuracy']:.2f}% | "
                     f"{100 * t['uncalibrated_accuracy']:.2f}% | {100 * t['merged_accuracy']:.2f}% | "
                     f"{100 * t['drop']:+.2f} pts |")
    lines.append("")
    return "\n".join(lines)
