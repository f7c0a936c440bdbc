"""Per-layer latency of the LUT kernels against ONNX Runtime (docs/runtime.md). A script, not a test.

Layers (batch 1): LeNet conv2 (32->64, 5x5, pad 2, 16x16, r8 C128), VGG 3x3 56x56x128->128 and
28x28x256->256 (r16 C256), FC 4096->1024 (r8 C128). Weights are random codes into a Gaussian
codebook (no k-means: the kernels' speed does not depend on the codeword values); inputs are
ReLU'd Gaussians. Baselines, timed in the same run: (a) ONNX Runtime fp32 Conv/Gemm with the
decoded dense weight at ORT_ENABLE_ALL, (b) the same layer statically quantised to int8
(onnxruntime.quantization.quantize_static, QDQ, per-channel). Ratios are ORT-fp32 time / time.

    python benchmarks/lut_layers.py [--reps 300] [--threads 1 2] [--json out.json]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy / onnxruntime load their thread pools

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import threadpoolctl
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from neuralmerge.runtime.kernels import EConv, EGemm, cpu_features

from _cli import check_outputs, cpu_name, non_negative_int, number, positive_int, write_text  # benchmarks/_cli.py

LUTS = ("fp32", "fp16", "int16", "int8")
ROUNDS = 5  # the timed calls are split into rounds, interleaving the variants


@dataclass(frozen=True)
class Layer:
    name: str
    kind: str  # "conv" or "fc"
    n_in: int
    n_out: int
    kernel: int = 1
    pad: int = 0
    size: int = 1
    r: int = 8
    codewords: int = 128


LAYERS = (
    Layer("LeNet conv2 16²×32→64 5×5", "conv", 32, 64, kernel=5, pad=2, size=16, r=8, codewords=128),
    Layer("VGG 56²×128→128 3×3", "conv", 128, 128, kernel=3, pad=1, size=56, r=16, codewords=256),
    Layer("VGG 28²×256→256 3×3", "conv", 256, 256, kernel=3, pad=1, size=28, r=16, codewords=256),
    Layer("FC 4096→1024", "fc", 4096, 1024, r=8, codewords=128),
)


def encoded_layer(layer: Layer, rng: np.random.Generator) -> dict:
    rho = -(-layer.n_in // layer.r)
    code_shape = (layer.n_out, layer.kernel, layer.kernel, rho) if layer.kind == "conv" else (layer.n_out, rho)
    fan_in = layer.n_in * layer.kernel**2
    codebook = (rng.standard_normal((rho * layer.codewords, layer.r)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    codes = rng.integers(0, layer.codewords, size=code_shape).astype(np.uint8 if layer.codewords <= 256 else np.uint16)
    offsets = np.arange(rho, dtype=np.int64) * layer.codewords
    bias = (rng.standard_normal(layer.n_out) * 0.1).astype(np.float32)
    weight = codebook[codes.astype(np.int64) + offsets].reshape(*code_shape[:-1], -1)[..., :layer.n_in]
    if layer.kind == "conv":
        weight = weight.transpose(0, 3, 1, 2)  # OIHW
    return dict(codebook=codebook, codes=codes, offsets=offsets, bias=bias, weight=np.ascontiguousarray(weight))


def input_of(layer: Layer, rng: np.random.Generator) -> np.ndarray:
    shape = (1, layer.n_in, layer.size, layer.size) if layer.kind == "conv" else (1, layer.n_in)
    return np.maximum(rng.standard_normal(shape), 0).astype(np.float32)


def onnx_model(layer: Layer, enc: dict) -> onnx.ModelProto:
    weight, bias = enc["weight"], enc["bias"]
    if layer.kind == "conv":
        p = layer.pad
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[p, p, p, p], kernel_shape=[layer.kernel] * 2)
        out = layer.size + 2 * p - layer.kernel + 1
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, layer.n_in, layer.size, layer.size])
        y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, layer.n_out, out, out])
    else:
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, layer.n_in])
        y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, layer.n_out])
    graph = helper.make_graph([node], "layer", [x_info], [y_info],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


class _Calibration(CalibrationDataReader):
    def __init__(self, samples: list[np.ndarray]) -> None:
        self._samples = iter({"x": s} for s in samples)

    def get_next(self):
        return next(self._samples, None)


def ort_sessions(layer: Layer, enc: dict, rng: np.random.Generator, threads: int, workdir: Path):
    fp32_path, int8_path = workdir / "fp32.onnx", workdir / "int8.onnx"
    onnx.save(onnx_model(layer, enc), fp32_path)
    quantize_static(str(fp32_path), str(int8_path), _Calibration([input_of(layer, rng) for _ in range(8)]),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    return (ort.InferenceSession(str(fp32_path), options, providers=providers),
            ort.InferenceSession(str(int8_path), options, providers=providers))


def median_us(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = np.empty(reps)
    for i in range(reps):
        start = time.perf_counter_ns()
        fn()
        times[i] = time.perf_counter_ns() - start
    return float(np.median(times)) / 1e3


def relative_rms(y: np.ndarray, reference: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y - reference) ** 2) / np.mean(reference**2)))


def bench_layer(layer: Layer, threads: int, reps: int, warmup: int) -> dict:
    rng = np.random.default_rng(0)
    enc = encoded_layer(layer, rng)
    x = input_of(layer, rng)
    with tempfile.TemporaryDirectory() as tmp:
        ort_fp32, ort_int8 = ort_sessions(layer, enc, rng, threads, Path(tmp))
    args = (enc["codebook"], enc["codes"], enc["offsets"], layer.n_in, enc["bias"])
    geometry = ((1, 1), (layer.pad,) * 4, (1, 1), 1) if layer.kind == "conv" else ()
    ours = {lut: (EConv(*args, *geometry, lut=lut, threads=threads) if layer.kind == "conv"
                  else EGemm(*args, lut=lut, threads=threads)) for lut in LUTS}

    exact = ours["fp32"](x)
    ort_exact = ort_fp32.run(None, {"x": x})[0]
    row = dict(layer=layer.name, threads=threads, kernels={lut: ours[lut].kernel_name for lut in LUTS},
               error={"ort-fp32 vs exact": relative_rms(ort_exact, exact),
                      "ort-int8 vs exact": relative_rms(ort_int8.run(None, {"x": x})[0], exact),
                      **{lut: relative_rms(ours[lut](x), exact) for lut in LUTS}})
    # Interleave the variants round by round so that noise from other tenants hits all alike.
    timings: dict[str, list[float]] = {name: [] for name in ("ort-fp32", "ort-int8", *LUTS)}
    runners = {"ort-fp32": lambda: ort_fp32.run(None, {"x": x}), "ort-int8": lambda: ort_int8.run(None, {"x": x}),
               **{lut: (lambda layer_=ours[lut]: layer_(x)) for lut in LUTS}}
    for _ in range(ROUNDS):
        for name, fn in runners.items():
            timings[name].append(median_us(fn, reps // ROUNDS, warmup))
    row["us"] = {name: float(np.median(values)) for name, values in timings.items()}
    row["ratio"] = {name: row["us"]["ort-fp32"] / us for name, us in row["us"].items()}
    return row


def markdown(rows: list[dict]) -> str:
    names = ("ort-int8", *LUTS)
    lines = ["| layer | threads | ORT fp32 µs | " + " | ".join(f"{n} µs (×)" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for row in rows:
        cells = [f"{row['us'][n]:.1f} ({row['ratio'][n]:.2f}×)" for n in names]
        lines.append(f"| {row['layer']} | {row['threads']} | {row['us']['ort-fp32']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "| layer | kernels | rel. RMS error vs exact fp32 LUT |", "|---|---|---|"]
    for row in rows:
        if row["threads"] != rows[0]["threads"]:
            continue
        kernels = ", ".join(row["kernels"].values())
        errors = ", ".join(f"{k} {v:.1e}" for k, v in row["error"].items())
        lines.append(f"| {row['layer']} | {kernels} | {errors} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=number(int, ROUNDS), default=300, help="timed calls per variant (default 300)")
    parser.add_argument("--warmup", type=non_negative_int, default=10, help="untimed calls before each timed batch")
    parser.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    check_outputs([args.json])

    print(f"CPU: {cpu_name()}; kernel features: {cpu_features()}")
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}, OPENBLAS_CORETYPE="
          f"{os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    pools = threadpoolctl.threadpool_info()
    for pool in pools:
        print(f"threadpool: {pool.get('internal_api')} {pool.get('version')} threads={pool.get('num_threads')} "
              f"{pool.get('filepath')}")
    rows = [bench_layer(layer, threads, args.reps, args.warmup) for threads in args.threads for layer in LAYERS]
    print(markdown(rows))
    if args.json:
        write_text(args.json, json.dumps(dict(cpu_features=cpu_features(), threadpools=pools, rows=rows), indent=2))


if __name__ == "__main__":
    main()
