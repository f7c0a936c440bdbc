"""How fast this CPU can sum int8 table runs at all: the ceiling of the int8 E-Conv speed-up.

A script, not a test. Compiles table_sum_ceiling.cpp (the runtime's int8 sum loop, nothing around
it) with the system C++ compiler and times it on LeNet conv2's table geometry (4 segments x 128
codewords, rows of 416 bytes, 100 terms per channel, 64 channels, 320 output pixels), with the
table in L2 (its real size) and shrunk to fit L1, with runs at any byte and 64-byte aligned. ONNX
Runtime's fp32 time for the same layer is measured in the same run, so the output says which
speed-up the sum alone leaves room for, before any table build or overhead.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lut_layers  # noqa: E402  (the per-layer benchmark: the same layer and ORT set-up)

SOURCE = Path(__file__).with_suffix(".cpp")
ROW_BYTES, TERMS, CHANNELS, BLOCKS = 416, 100, 64, 5
CASES = (("table in L2 (512 rows, 213 KB), runs at any byte", 512, 1),
         ("table in L2, runs 64-byte aligned", 512, 64),
         ("table in L1 (64 rows, 27 KB), runs at any byte", 64, 1),
         ("table in L1, runs 64-byte aligned", 64, 64))


def compile_loop(folder: Path) -> Path:
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        sys.exit("error: no C++ compiler (c++, g++ or clang++) on PATH")
    binary = folder / "table_sum_ceiling"
    subprocess.run([compiler, "-O2", "-mavx512f", "-mavx512bw", "-o", str(binary), str(SOURCE)], check=True)
    return binary


def ns_per_vector(binary: Path, rows: int, alignment: int, reps: int) -> float:
    args = [str(binary), str(rows), str(ROW_BYTES), str(TERMS), str(CHANNELS), str(BLOCKS), str(alignment), str(reps)]
    return float(subprocess.run(args, check=True, capture_output=True, text=True).stdout)


def ort_fp32_us(reps: int) -> float:
    layer = lut_layers.LAYERS[0]  # LeNet conv2
    rng = np.random.default_rng(0)
    encoded = lut_layers.encoded_layer(layer, rng)
    x = lut_layers.input_of(layer, rng)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, _ = lut_layers.ort_sessions(layer, encoded, rng, 1, Path(tmp))
    return lut_layers.median_us(lambda: fp32.run(None, {"x": x}), reps, 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are reported")
    parser.add_argument("--reps", type=int, default=300, help="timed calls per case and round")
    args = parser.parse_args()
    if "avx512bw" not in Path("/proc/cpuinfo").read_text():
        sys.exit("error: this script times the AVX-512 loop; the CPU lacks AVX-512BW")
    print(f"CPU: {platform.processor() or platform.machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        binary = compile_loop(Path(tmp))
        times = {name: [] for name, _, _ in CASES}
        ort = []
        for _ in range(args.rounds):  # alternate, so that other tenants' noise hits every case alike
            for name, rows, alignment in CASES:
                times[name].append(ns_per_vector(binary, rows, alignment, args.reps))
            ort.append(ort_fp32_us(args.reps))
    ort_us = float(np.median(ort))
    vectors = CHANNELS * TERMS * BLOCKS
    print(f"LeNet conv2 in ONNX Runtime fp32, 1 thread: {ort_us:.1f} us; the int8 sum loads {vectors} vectors")
    print("| case | ns per 64-byte vector | sum alone, us | ORT fp32 / sum alone |")
    print("|---|---:|---:|---:|")
    for name, _, _ in CASES:
        ns = float(np.median(times[name]))
        sum_us = ns * vectors / 1e3
        print(f"| {name} | {ns:.3f} | {sum_us:.1f} | {ort_us / sum_us:.2f}x |")


if __name__ == "__main__":
    main()
