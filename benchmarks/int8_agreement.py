"""Top-1 agreement of the reduced-precision LUT paths with the exact fp32 path on real test data.

Uses the demo pair (`neuralmerge demo` writes digits.onnx, sound20.onnx and the calibrated
merged.onnx into its folder): each test image of digits32 and sound20 is run at batch 1 through
the native runtime at fp32, fp16 and int8, and the predictions are compared.

    neuralmerge demo --out runs/demo && python benchmarks/int8_agreement.py runs/demo

``--model`` measures another merge of the same pair instead, e.g. one calibrated with
``--int8-aware`` (docs/calibration.md); the originals' accuracy is printed beside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from neuralmerge.errors import NeuralMergeError
from neuralmerge.runtime import Session
from neuralmerge.zoo.train import onnx_accuracy
from neuralmerge.zoo.datasets import digits32, sound20

from _cli import non_negative_int  # benchmarks/_cli.py, beside this script

TASKS = (("image", "digit_logits", digits32), ("spectrogram", "sound_logits", sound20))
SOURCES = ("digits.onnx", "sound20.onnx")  # the demo's originals, one per task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_dir", type=Path, help="folder written by `neuralmerge demo`")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="the seed the demo used")
    parser.add_argument("--model", type=Path, default=None, help="merged model to measure (default DEMO_DIR/merged.onnx)")
    args = parser.parse_args()
    model = str(args.model or args.demo_dir / "merged.onnx")
    run_demo = f"run `neuralmerge demo --out {args.demo_dir}` first"
    if not args.demo_dir.is_dir():
        sys.exit(f"error: demo folder {args.demo_dir} not found ({run_demo})")
    if args.model and not args.model.is_file():
        sys.exit(f"error: model file not found: {args.model}")
    for path in [Path(model)] + [args.demo_dir / source for source in SOURCES]:
        if not path.is_file():
            sys.exit(f"error: {path} not found in the demo folder ({run_demo})")
    try:
        sessions = {lut: Session(model, lut=lut, threads=1) for lut in ("fp32", "fp16", "int8")}
    except NeuralMergeError as exc:  # a corrupt or foreign model: one line, as the CLI says it
        sys.exit(f"error: {exc}")
    print(f"{model}, one image per call")
    print("| task | test samples | original accuracy | fp32 accuracy | fp16 agreement | int8 agreement | int8 accuracy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (input_name, output_name, make), source in zip(TASKS, SOURCES):
        ds = make(seed=args.seed)
        original = 100 * onnx_accuracy(args.demo_dir / source, ds.x_test, ds.y_test)
        predictions = {}
        for lut, session in sessions.items():
            logits = [session.run({input_name: ds.x_test[i:i + 1]}, outputs=[output_name])[output_name]
                      for i in range(len(ds.x_test))]
            predictions[lut] = np.concatenate(logits).argmax(1)
        agree = {lut: 100 * float((predictions[lut] == predictions["fp32"]).mean()) for lut in ("fp16", "int8")}
        accuracy = {lut: 100 * float((predictions[lut] == ds.y_test).mean()) for lut in ("fp32", "int8")}
        print(f"| {ds.name} | {len(ds.y_test)} | {original:.2f}% | {accuracy['fp32']:.2f}% | {agree['fp16']:.2f}% | "
              f"{agree['int8']:.2f}% | {accuracy['int8']:.2f}% |")


if __name__ == "__main__":
    main()
