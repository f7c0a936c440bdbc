"""File-size compression of the paper's LeNet pair at the paper's Table 1 settings.

Two LeNets (32@5×5 → pool → 64@5×5 → pool → fc 1024 → 10-way / 20-way heads, 32×32×1 input)
are exported to ONNX and merged at ACCU and LIGHT with fp32 and fp16 codebooks; the ratio is
the sum of the two input files' bytes over the merged file's bytes (what the report calls
``compression_ratio``). Weights are random: file size does not depend on them (every segment
has more distinct vectors than codewords). The paper's arithmetic gives 10.31× and 15.16×.

    python benchmarks/compression.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import neuralmerge
from neuralmerge.zoo.architectures import LeNet
from neuralmerge.zoo.train import export_onnx

from _cli import check_outputs, write_text  # benchmarks/_cli.py, beside this script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    check_outputs([args.json])
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        a = export_onnx(LeNet(10), Path(tmp) / "a.onnx", (1, 32, 32))
        b = export_onnx(LeNet(20), Path(tmp) / "b.onnx", (1, 32, 32))
        for preset in ("accu", "light"):
            for dtype in ("float32", "float16"):
                start = time.perf_counter()
                rep = neuralmerge.merge([a, b], preset=preset, codebook_dtype=dtype, quiet=True,
                                        fidelity_samples=2).report
                rows.append({
                    "preset": preset, "codebook_dtype": dtype,
                    "settings": ", ".join(f"{g['name']} {g['r']}/{g['codewords']}" for g in rep["groups"]),
                    "input_bytes": rep["input_bytes"], "output_bytes": rep["output_bytes"],
                    "compression_ratio": round(rep["compression_ratio"], 2),
                    "encode_seconds": rep["encode_seconds"], "merge_seconds": round(time.perf_counter() - start, 2),
                })
    print("| preset | codebooks | settings (r/C) | input bytes | merged bytes | compression | encode s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['codebook_dtype']} | {r['settings']} | {r['input_bytes']:,} | "
              f"{r['output_bytes']:,} | {r['compression_ratio']:.2f}× | {r['encode_seconds']:.1f} |")
    if args.json:
        write_text(args.json, json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
