"""How fast this CPU can sum E-Conv table runs at all: the ceiling of the conv speed-ups.

A script, not a test. Compiles table_sum_ceiling.cpp (the runtime's fp32, fp16 and int8 sum
loops, nothing around them) with the system C++ compiler and times them on LeNet conv2's table
geometry (4 segments x 128 codewords, rows of 416 pixels, 100 terms per channel at the 5x5 taps'
shifts, 64 channels, 5 blocks of 64 output pixels), with the table at its real size (in L2) and
shrunk to fit L1.
ONNX Runtime's fp32 layer and the runtime's whole layer at each precision are timed in the same
run, so the output says which speed-up the sum alone leaves room for, before any table build or
overhead, beside what the whole layer reaches and what the runtime issue asks for. It also times
the table build's instructions (vfmadd231ps; for int8 vpdpbusd and the narrowing of the int32
sums to int8) and adds the build's arithmetic to each sum: a lower bound for the whole layer.

    python benchmarks/table_sum_ceiling.py [--rounds 5] [--reps 300]
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

from neuralmerge.runtime.kernels import EConv  # noqa: E402

SOURCE = Path(__file__).with_suffix(".cpp")
# LeNet conv2: 4 segments of r = 8 channels x 128 codewords, 5x5 taps over a 20-wide padded
# input (rows of 416 pixels), 64 output channels, 5 blocks of 64 output pixels.
SEGMENTS, CODEWORDS, R, KERNEL, PADDED_WIDTH = 4, 128, 8, 5, 20
ROW_PIXELS, CHANNELS, BLOCKS = 416, 64, 5
TERMS = SEGMENTS * KERNEL * KERNEL
BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
TARGET = {"fp32": 1.4, "fp16": 2.2, "int8": 4.5}  # the runtime issue's LeNet conv2 targets
L1_CODEWORDS = 16  # x 4 segments x 416 pixels: 27 KB of int8; the wider tables shrink to the same bytes


def compile_loop(folder: Path) -> Path:
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        sys.exit("error: no C++ compiler (c++, g++ or clang++) on PATH")
    binary = folder / "table_sum_ceiling"
    subprocess.run([compiler, "-O2", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-mf16c", "-o", str(binary), str(SOURCE)],
                   check=True)
    return binary


def ns_per_run(binary: Path, kind: str, codewords: int, reps: int) -> float:
    args = [str(binary), kind, str(SEGMENTS), str(codewords), str(ROW_PIXELS), str(KERNEL), str(PADDED_WIDTH),
            str(CHANNELS), str(BLOCKS), str(reps)]
    return float(subprocess.run(args, check=True, capture_output=True, text=True).stdout)


def build_ns(binary: Path) -> tuple[float, float, float]:
    """ns per vpdpbusd, per vfmadd231ps (512-bit) and per 16 int8 entries narrowed, throughput-bound."""
    out = subprocess.run([str(binary), "build", "20000000"], check=True, capture_output=True, text=True).stdout
    dot, fma, narrow = map(float, out.split())
    return dot, fma, narrow


def layer_timers(reps: int):
    """ORT fp32 and the runtime's whole LeNet conv2 layer at each precision, as timing closures."""
    layer = lut_layers.LAYERS[0]
    rng = np.random.default_rng(0)
    enc = lut_layers.encoded_layer(layer, rng)
    x = lut_layers.input_of(layer, rng)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, _ = lut_layers.ort_sessions(layer, enc, rng, 1, Path(tmp))
    args = (enc["codebook"], enc["codes"], enc["offsets"], layer.n_in, enc["bias"], (1, 1), (layer.pad,) * 4)
    timers = {"ort": lambda: lut_layers.median_us(lambda: fp32.run(None, {"x": x}), reps, 20)}
    for kind in BYTES:
        econv = EConv(*args, lut=kind, threads=1)
        timers[kind] = lambda econv=econv: lut_layers.median_us(lambda: econv(x), reps, 20)
    return timers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are reported")
    parser.add_argument("--reps", type=int, default=300, help="timed calls per case and round")
    args = parser.parse_args()
    if "avx512bw" not in Path("/proc/cpuinfo").read_text():
        sys.exit("error: this script times the AVX-512 loops; the CPU lacks AVX-512BW")
    print(f"CPU: {platform.processor() or platform.machine()}")
    timers = layer_timers(args.reps)
    with tempfile.TemporaryDirectory() as tmp:
        binary = compile_loop(Path(tmp))
        sums = {(kind, where): [] for kind in BYTES for where in ("L2", "L1")}
        layers = {name: [] for name in timers}
        builds = []
        for _ in range(args.rounds):  # alternate, so that other tenants' noise hits every case alike
            builds.append(build_ns(binary))
            for kind, width in BYTES.items():
                sums[kind, "L2"].append(ns_per_run(binary, kind, CODEWORDS, args.reps))
                sums[kind, "L1"].append(ns_per_run(binary, kind, max(L1_CODEWORDS // width, 1), args.reps))
            for name, timer in timers.items():
                layers[name].append(timer())
    ort_us = float(np.median(layers["ort"]))
    runs = CHANNELS * TERMS * BLOCKS
    print(f"LeNet conv2 in ONNX Runtime fp32, 1 thread: {ort_us:.1f} us; the sum reads {runs} runs of 64 pixels")
    print("| table | size | ns per 64-pixel run | sum alone, us | ORT fp32 / sum alone "
          "| ORT fp32 / whole layer | target |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, width in BYTES.items():
        layer_us = float(np.median(layers[kind]))
        for where, codewords in (("L2", CODEWORDS), ("L1", max(L1_CODEWORDS // width, 1))):
            rows = SEGMENTS * codewords
            ns = float(np.median(sums[kind, where]))
            sum_us = ns * runs / 1e3
            size_kb = rows * ROW_PIXELS * width / 1024
            whole = f"{ort_us / layer_us:.2f}x ({layer_us:.1f} us)" if where == "L2" else "–"
            target = f"{TARGET[kind]}x" if where == "L2" else "–"
            label = f"{kind}, real size" if where == "L2" else f"{kind}, shrunk to fit L1"
            print(f"| {label} | {size_kb:.0f} KB | {ns:.3f} | {sum_us:.1f} | {ort_us / sum_us:.2f}x | {whole} | {target} |")
    # The table build: every entry of T[segment][codeword][padded pixel] is an r-long dot product:
    # r/16-lane fp32 FMAs per 16 entries (fp32, fp16: the fp16 table is built in fp32), or r/4
    # products per vpdpbusd lane (int8), whose int32 sums are then narrowed to int8 (to float,
    # times the requantisation factor, rounded, packed). Its arithmetic alone, added to the sum
    # alone, bounds the whole layer from below: the build's instructions and the sum's adds all
    # issue on the same two 512-bit ports of this core.
    entries = SEGMENTS * CODEWORDS * ROW_PIXELS
    dot_ns, fma_ns, narrow_ns = (float(np.median([b[i] for b in builds])) for i in (0, 1, 2))
    print(f"\nTable build arithmetic ({entries} entries of r = {R}): vpdpbusd {dot_ns:.3f} ns, vfmadd231ps "
          f"{fma_ns:.3f} ns each (512-bit, throughput-bound); int8 narrowing {narrow_ns:.3f} ns per 16 entries")
    print("| table | build instructions | build alone, us | sum + build alone, us | ORT fp32 / that | target |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in BYTES:
        count = entries * R // 16 // (4 if kind == "int8" else 1)
        build_us = count * (dot_ns if kind == "int8" else fma_ns) / 1e3
        label = f"{count} FMAs"
        if kind == "int8":
            build_us += entries / 16 * narrow_ns / 1e3
            label = f"{count} vpdpbusd + {entries // 16} narrowings"
        total = float(np.median(sums[kind, "L2"])) * runs / 1e3 + build_us
        print(f"| {kind} | {label} | {build_us:.1f} | {total:.1f} | {ort_us / total:.2f}x | {TARGET[kind]}x |")

if __name__ == "__main__":
    main()
