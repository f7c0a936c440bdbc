"""How fast this CPU can sum E-Conv table runs at all: the ceiling of the conv speed-ups.

A script, not a test. Compiles table_sum_ceiling.cpp (the runtime's fp32, fp16 and int8 sum
loops, nothing around them) with the system C++ compiler and times them on a layer's table
geometry, with the table at the size the runtime gives it (in L2) and shrunk to fit L1:

- LeNet conv2 16²×32→64 5×5 (r = 8, C = 128): 4 segments x 128 codewords, rows of 416
  pixels, 100 terms per channel at the 5x5 taps' shifts, 64 channels, 5 blocks of 64 pixels;
- VGG 28²×256→256 3×3 (r = 16, C = 256): the runtime builds and sums this layer's table a
  strip of 8 output rows and a chunk of 3 segments at a time (rows of 320 pixels, 983 KB in
  fp32), so the loop runs on one such chunk (27 terms per channel at the 3x3 taps' shifts of a
  30-wide padded input, 256 channels, 4 blocks), and the whole layer's 14 blocks x 144 terms
  are counted at that speed.

ONNX Runtime's fp32 layer and the runtime's whole layer at each precision are timed in the same
run, so the output says which speed-up the sum alone leaves room for, before any table build or
overhead, beside what the whole layer reaches and what the runtime issue asks for. It also times
the table build's instructions (vfmadd231ps; for int8 vpdpbusd and the narrowing of the int32
sums to int8) and adds the arithmetic of the smallest table the layer needs (every segment and
codeword over the padded input once, no strip overlap) to each sum: an estimate of a layer that
builds and then sums, with the sums at L2 speed and, optimistically, at L1 speed. Last, it times
the sums with that arithmetic interleaved into every term: an estimate of a layer that builds the
next strip's table while it sums this one.

    python benchmarks/table_sum_ceiling.py [--layer lenet vgg28] [--rounds 5] [--reps 300]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lut_layers  # noqa: E402  (the per-layer benchmark: the same layer and ORT set-up)

from neuralmerge.runtime.kernels import EConv, cpu_features  # noqa: E402

from _cli import cpu_name, positive_int  # noqa: E402  (benchmarks/_cli.py)

SOURCE = Path(__file__).with_suffix(".cpp")
BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
L1_BYTES = 26_624  # the shrunk table: 16 codewords x 4 segments x 416 pixels of int8


@dataclass(frozen=True)
class Geometry:
    """One conv layer's table, as the runtime builds and sums it."""

    name: str
    layer: int  # index into lut_layers.LAYERS
    segments: int  # segments in the table the loop sums (the runtime's chunk)
    codewords: int
    r: int
    kernel: int
    padded_width: int
    row_pixels: int  # pixels per table row (the runtime's ld)
    channels: int
    blocks: int  # blocks of 64 pixels the loop sums per channel
    runs: int  # runs of 64 pixels the whole layer sums
    entries: int  # entries of the smallest table the layer needs
    target: dict  # the runtime issue's targets (ORT fp32 time / ours)

    def terms(self) -> int:
        return self.segments * self.kernel * self.kernel

    def l1_codewords(self, width: int) -> int:
        return max(L1_BYTES // (self.segments * self.row_pixels * width), 1)


GEOMETRIES = {
    "lenet": Geometry("LeNet conv2 16²×32→64 5×5", 0, segments=4, codewords=128, r=8, kernel=5, padded_width=20,
                      row_pixels=416, channels=64, blocks=5, runs=64 * 100 * 5, entries=4 * 128 * 416,
                      target={"fp32": 1.4, "fp16": 2.2, "int8": 4.5}),
    "vgg28": Geometry("VGG 28²×256→256 3×3", 2, segments=3, codewords=256, r=16, kernel=3, padded_width=30,
                      row_pixels=320, channels=256, blocks=4, runs=256 * 144 * 14, entries=16 * 256 * 30 * 30,
                      target={"fp32": 1.6, "fp16": 2.5, "int8": 6.0}),
}


def compile_loop(folder: Path, **build_per_term: int) -> Path:
    """The loops, with ``build_per_term`` (BUILD_FMAS, BUILD_DOTS, BUILD_NARROWS) of the table
    build's instructions interleaved into every term of the sums."""
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        sys.exit("error: no C++ compiler (c++, g++ or clang++) on PATH")
    binary = folder / ("table_sum_ceiling" + "".join(f"_{k}{v}" for k, v in sorted(build_per_term.items())))
    defines = [f"-D{k}={v}" for k, v in build_per_term.items()]
    subprocess.run([compiler, "-O2", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-mf16c", *defines, "-o", str(binary),
                    str(SOURCE)], check=True)
    return binary


def ns_per_run(binary: Path, g: Geometry, kind: str, codewords: int, reps: int) -> float:
    args = [str(binary), kind, str(g.segments), str(codewords), str(g.row_pixels), str(g.kernel), str(g.padded_width),
            str(g.channels), str(g.blocks), str(reps)]
    return float(subprocess.run(args, check=True, capture_output=True, text=True).stdout)


def build_ns(binary: Path) -> tuple[float, ...]:
    """Throughput-bound ns per vpdpbusd, per vfmadd231ps (512-bit), per 16 int8 entries narrowed,
    per vaddps, per vpaddw, and per instruction of a half-vaddps, half-vfmadd231ps mix."""
    out = subprocess.run([str(binary), "build", "20000000"], check=True, capture_output=True, text=True).stdout
    return tuple(map(float, out.split()))


def layer_timers(g: Geometry, reps: int):
    """ORT fp32 and the runtime's whole layer at each precision, as timing closures."""
    layer = lut_layers.LAYERS[g.layer]
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


def build_counts(g: Geometry) -> dict[str, float]:
    """The smallest table's build instructions per term of two channels (one loop iteration) of
    the whole layer's sums: every entry of T[segment][codeword][padded pixel] is an r-long dot
    product, r/16-lane fp32 FMAs per 16 entries (fp32, fp16: the fp16 table is built in fp32) or
    r/4 products per vpdpbusd lane (int8), whose int32 sums are then narrowed to int8."""
    iterations = g.runs / 2
    return {"fmas": g.entries * g.r / 16 / iterations, "dots": g.entries * g.r / 64 / iterations,
            "narrows": g.entries / 16 / iterations}


def report(g: Geometry, binary: Path, folder: Path, rounds: int, reps: int) -> None:
    timers = layer_timers(g, reps)
    # The sums with the build's instructions interleaved, rounded to whole instructions per term.
    per_term = build_counts(g)
    used = {"fp": {"BUILD_FMAS": max(round(per_term["fmas"]), 1)},
            "int8": {"BUILD_DOTS": max(round(per_term["dots"]), 1), "BUILD_NARROWS": max(round(per_term["narrows"]), 1)}}
    interleaved = {family: compile_loop(folder, **counts) for family, counts in used.items()}
    sums = {(kind, where): [] for kind in BYTES for where in ("L2", "L1", "interleaved")}
    layers = {name: [] for name in timers}
    builds = []
    for _ in range(rounds):  # alternate, so that other tenants' noise hits every case alike
        builds.append(build_ns(binary))
        for kind, width in BYTES.items():
            sums[kind, "L2"].append(ns_per_run(binary, g, kind, g.codewords, reps))
            sums[kind, "L1"].append(ns_per_run(binary, g, kind, g.l1_codewords(width), reps))
            sums[kind, "interleaved"].append(
                ns_per_run(interleaved["int8" if kind == "int8" else "fp"], g, kind, g.codewords, reps))
        for name, timer in timers.items():
            layers[name].append(timer())
    ort_us = float(np.median(layers["ort"]))
    print(f"\n{g.name} in ONNX Runtime fp32, 1 thread: {ort_us:.1f} us; the sum reads {g.runs} runs of 64 pixels")
    print("| table | size | ns per 64-pixel run | sum alone, us | ORT fp32 / sum alone "
          "| ORT fp32 / whole layer | target |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    sum_us = {}
    for kind, width in BYTES.items():
        layer_us = float(np.median(layers[kind]))
        for where, codewords in (("L2", g.codewords), ("L1", g.l1_codewords(width))):
            ns = float(np.median(sums[kind, where]))
            sum_us[kind, where] = ns * g.runs / 1e3
            size_kb = g.segments * codewords * g.row_pixels * width / 1024
            whole = f"{ort_us / layer_us:.2f}x ({layer_us:.1f} us)" if where == "L2" else "–"
            target = f"{g.target[kind]}x" if where == "L2" else "–"
            label = f"{kind}, real size" if where == "L2" else f"{kind}, shrunk to fit L1"
            print(f"| {label} | {size_kb:.0f} KB | {ns:.3f} | {sum_us[kind, where]:.1f} | "
                  f"{ort_us / sum_us[kind, where]:.2f}x | {whole} | {target} |")
    # The table build: every entry of T[segment][codeword][padded pixel] is an r-long dot product:
    # r/16-lane fp32 FMAs per 16 entries (fp32, fp16: the fp16 table is built in fp32), or r/4
    # products per vpdpbusd lane (int8), whose int32 sums are then narrowed to int8 (to float,
    # times the requantisation factor, rounded, packed). Its arithmetic alone, added to the sum
    # alone, estimates a layer that builds and then sums, as the runtime does (the build's FMAs
    # and the sums' adds share this core's two 512-bit ports, as the mix below shows; AMD Zen 4/5
    # have add pipes of their own); the interleaved sums after it, one that overlaps the two.
    dot_ns, fma_ns, narrow_ns, add_ns, addw_ns, mix_ns = (float(np.median([b[i] for b in builds])) for i in range(6))
    print(f"\nTable build arithmetic ({g.entries} entries of r = {g.r}): vpdpbusd {dot_ns:.3f} ns, vfmadd231ps "
          f"{fma_ns:.3f} ns each (512-bit, throughput-bound); int8 narrowing {narrow_ns:.3f} ns per 16 entries")
    print(f"The sums' adds: vaddps {add_ns:.3f} ns, vpaddw {addw_ns:.3f} ns each; half vaddps, half vfmadd231ps "
          f"{mix_ns:.3f} ns per instruction ({'the same ports as the FMAs' if mix_ns > 0.8 * min(add_ns, fma_ns) else 'ports of their own'})")
    print("| table | build instructions | build alone, us | sum + build, us | ORT fp32 / that "
          "| the same with sums at L1 speed | target |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind in BYTES:
        count = g.entries * g.r // 16 // (4 if kind == "int8" else 1)
        build_us = count * (dot_ns if kind == "int8" else fma_ns) / 1e3
        label = f"{count} FMAs"
        if kind == "int8":
            build_us += g.entries / 16 * narrow_ns / 1e3
            label = f"{count} vpdpbusd + {g.entries // 16} narrowings"
        total, optimistic = sum_us[kind, "L2"] + build_us, sum_us[kind, "L1"] + build_us
        print(f"| {kind} | {label} | {build_us:.1f} | {total:.1f} | {ort_us / total:.2f}x | "
              f"{ort_us / optimistic:.2f}x | {g.target[kind]}x |")
    # Were the next strip's table built while this one is summed, the build's instructions could
    # issue in the sums' load stalls: the sums timed with them interleaved (whole instructions
    # per term, the added time scaled to the layer's own count), on the real-size table.
    print(f"\nThe sums with the build's instructions interleaved into every term (per term of two channels: "
          f"{per_term['fmas']:.2f} FMAs, or {per_term['dots']:.2f} vpdpbusd + {per_term['narrows']:.2f} narrowings)")
    print("| table | interleaved per term | ns per 64-pixel run | sum and build, us | ORT fp32 / that | target |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in BYTES:
        if kind == "int8":
            counts = used["int8"]
            label = f"{counts['BUILD_DOTS']} vpdpbusd + {counts['BUILD_NARROWS']} narrowings"
            scale = ((per_term["dots"] * dot_ns + per_term["narrows"] * narrow_ns)
                     / (counts["BUILD_DOTS"] * dot_ns + counts["BUILD_NARROWS"] * narrow_ns))
        else:
            label = f"{used['fp']['BUILD_FMAS']} FMAs"
            scale = per_term["fmas"] / used["fp"]["BUILD_FMAS"]
        base = float(np.median(sums[kind, "L2"]))
        ns = base + (float(np.median(sums[kind, "interleaved"])) - base) * scale
        total = ns * g.runs / 1e3
        print(f"| {kind} | {label} | {ns:.3f} | {total:.1f} | {ort_us / total:.2f}x | {g.target[kind]}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", nargs="+", choices=sorted(GEOMETRIES), default=["lenet", "vgg28"],
                        help="layer geometries to time (default: both)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="alternating rounds; medians are reported")
    parser.add_argument("--reps", type=positive_int, default=300, help="timed calls per case and round")
    args = parser.parse_args()
    if "avx512bw" not in Path("/proc/cpuinfo").read_text():
        sys.exit("error: this script times the AVX-512 loops; the CPU lacks AVX-512BW")
    print(f"CPU: {cpu_name()}; kernel features: {cpu_features()}")
    with tempfile.TemporaryDirectory() as tmp:
        binary = compile_loop(Path(tmp))
        for name in args.layer:
            report(GEOMETRIES[name], binary, Path(tmp), args.rounds, args.reps)


if __name__ == "__main__":
    main()
