"""Latency of a merged model in the native runtime against its originals in ONNX Runtime (docs/runtime.md, "Command line").

The originals run back to back in one loop, as a device serving all tasks would, in ONNX
Runtime fp32 (ORT_ENABLE_ALL) and statically quantised to int8 (QDQ, per-channel). Every
figure is a median over timed repetitions after warm-up; ratios come from the same run. On one
thread the configurations take turns in rounds, so that load from other processes falls on all
of them.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from neuralmerge.errors import ConfigError
from neuralmerge.io.onnx_files import ort_session
from neuralmerge.runtime.session import PRECISIONS, Session

__all__ = ["benchmark", "format_benchmark", "format_profile", "interleaved_ms", "random_feeds", "quantize_int8",
           "session_peak_rss"]


SETTLE_RUNS = 7  # kWarmupRuns + 2 * kTrialRuns in csrc/executor/session.cpp
ROUNDS = 5  # turns each configuration takes in interleaved_ms


def interleaved_ms(runs: dict[str, Callable[[], object]], repeat: int, warmup: dict[str, int]) -> dict[str, float]:
    """Median wall time in milliseconds of each of ``runs`` over ``repeat`` timed calls.

    After ``warmup[name]`` untimed calls each, the calls are taken in rounds (ROUNDS of
    ceil(repeat / ROUNDS) calls, the last one shorter) in which every configuration has its turn:
    one untimed call, then its share of the timed ones. Timed one after another, a minute of load
    from another process on this shared kind of machine fell on one configuration alone and moved
    the ratios by 10-20%.
    """
    for name, fn in runs.items():
        for _ in range(warmup[name]):
            fn()
    per_round = -(-repeat // ROUNDS)
    times: dict[str, list[float]] = {name: [] for name in runs}
    while any(len(t) < repeat for t in times.values()):
        for name, fn in runs.items():
            fn()  # its caches, evicted by the configuration before
            for _ in range(min(per_round, repeat - len(times[name]))):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t) * 1e3) for name, t in times.items()}


def batch1_shape(name: str, shape, what: str) -> list[int]:
    """``shape`` at batch 1: a free first dimension (the batch) becomes 1; any other free one is an
    error (timing an image of 1x1 pixels would measure nothing the user runs)."""
    dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
    if None in dims[1:]:
        raise ConfigError(f"{what} input '{name}' has free dimensions {list(shape)}; bench times fixed shapes: "
                          "pin them when merging (neuralmerge merge --input-shape)")
    return [1 if dims[0] is None else dims[0], *dims[1:]]


def random_feeds(session, rng: np.random.Generator, what: str = "model") -> dict[str, np.ndarray]:
    """Batch-1 float32 feeds for an onnxruntime session."""
    return {i.name: rng.standard_normal(batch1_shape(i.name, i.shape, what)).astype(np.float32)
            for i in session.get_inputs()}


def quantize_int8(source: str | os.PathLike, destination: str | os.PathLike, samples: int = 16, seed: int = 0) -> None:
    """Static int8 quantisation (QDQ, per-channel) calibrated on random batch-1 inputs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    reference = ort_session(source, 1)
    rng = np.random.default_rng(seed)
    batches = [random_feeds(reference, rng) for _ in range(samples)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(batches)

        def get_next(self):
            return next(self._batches, None)

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static logs advice on every call
    try:
        quantize_static(str(source), str(destination), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        logging.getLogger().setLevel(quiet)


# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's at fork.
_RSS_SCRIPT = """
import sys, numpy as np
from neuralmerge.runtime import Session, session
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
before = hwm()
s = Session(sys.argv[1], lut=sys.argv[2])
feeds = {i.name: np.ones([d or 1 for d in i.shape], np.float32) for i in s.inputs}
for _ in range(5):
    s.run(feeds)
print(before, hwm())
"""


def session_peak_rss(model: str | os.PathLike, lut: str) -> dict:
    """Peak RSS (bytes) of a fresh process that loads ``model`` into a Session and runs it."""
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(model), lut], check=True, capture_output=True,
                         text=True).stdout.split()
    before, peak = int(out[0]) * 1024, int(out[1]) * 1024  # KiB
    return {"interpreter_bytes": before, "peak_bytes": peak, "session_bytes": peak - before}


def benchmark(merged: str | os.PathLike, baselines: list[str | os.PathLike], *, threads: int = 1,
              luts: tuple[str, ...] = PRECISIONS, repeat: int = 200, warmup: int = 20, int8_baseline: bool = True,
              profile: bool = False, seed: int = 0) -> dict:
    """Time ``merged`` (.onnx or .nmpack) in the runtime at each ``lut`` and ``baselines`` back to back in ORT.

    ``profile`` adds ``result["profile"][lut]``: each node's mean time over ``repeat`` more runs
    of a profiling session (kept apart from the timed runs, which it would slow down).
    """
    from neuralmerge.runtime.pack import is_packed, model_path, pack_model

    for path in [merged, *baselines]:
        model_path(path)
    rng = np.random.default_rng(seed)
    result: dict = {"threads": threads, "repeat": repeat, "warmup": warmup, "cpu": _cpu_features(),
                    "merged": {"path": str(merged), "bytes": Path(merged).stat().st_size},
                    "baselines": [{"path": str(b), "bytes": Path(b).stat().st_size} for b in baselines],
                    "runtime_ms": {}, "ratios": {}}

    packed = Path(merged).read_bytes() if is_packed(merged) else pack_model(merged)
    result["merged"]["nmpack_bytes"] = len(packed)
    merged_inputs = {tuple(batch1_shape(s.name, s.shape, "merged model")[1:]) for s in Session(packed).inputs}
    runs: dict[str, Callable[[], object]] = {}
    if baselines:
        fp32 = [ort_session(b, threads) for b in baselines]
        fp32_feeds = [random_feeds(s, rng, f"baseline {b}") for s, b in zip(fp32, baselines)]
        for path, baseline_feeds in zip(baselines, fp32_feeds):
            for name, x in baseline_feeds.items():  # a baseline is one of the models merged: it takes one of the inputs
                if tuple(x.shape[1:]) not in merged_inputs:
                    raise ConfigError(f"baseline {path} takes '{name}' of shape {list(x.shape)}, which no input of "
                                      f"the merged model has; --baseline names the models that were merged")
        runs["ort_fp32"] = lambda: [s.run(None, f) for s, f in zip(fp32, fp32_feeds)]
        if int8_baseline:
            with tempfile.TemporaryDirectory() as tmp:
                int8_paths = [Path(tmp) / f"int8_{i}.onnx" for i in range(len(baselines))]
                for source, target in zip(baselines, int8_paths):
                    quantize_int8(source, target, seed=seed)
                result["ort_int8_bytes"] = [p.stat().st_size for p in int8_paths]
                int8 = [ort_session(p, threads) for p in int8_paths]
            runs["ort_int8"] = lambda: [s.run(None, f) for s, f in zip(int8, fp32_feeds)]
    warmups = {name: warmup for name in runs}

    feeds = {}
    for lut in luts:
        session = Session(packed, lut=lut, threads=threads)
        feeds[lut] = {s.name: rng.standard_normal(batch1_shape(s.name, s.shape, "merged model")).astype(np.float32)
                      for s in session.inputs}
        runs[lut] = lambda session=session, lut=lut: session.run(feeds[lut])
        # A session with 2+ threads tries two ways of running a merged model's tasks on its first
        # SETTLE_RUNS runs (docs/runtime.md); those are warm-up, whatever --warmup says.
        warmups[lut] = max(warmup, SETTLE_RUNS)
    if threads == 1:
        ms = interleaved_ms(runs, repeat, warmups)
    else:
        # With 2+ threads, one configuration's thread pool keeps spinning after its calls (ONNX
        # Runtime's by default) and slowed the next configuration's turn (the runtime's LeNet
        # pair at int8 up to 6x, ORT int8 20-45%), so each configuration is timed on its own.
        ms = {}
        for name, fn in runs.items():
            time.sleep(0.1)  # the previous configuration's threads stop spinning
            ms[name] = interleaved_ms({name: fn}, repeat, {name: warmups[name]})[name]
    for name in ("ort_fp32", "ort_int8"):
        if name in ms:
            result[f"{name}_ms"] = ms[name]
    for lut in luts:
        result["runtime_ms"][lut] = ms[lut]
        ratios = {}
        if "ort_fp32_ms" in result:
            ratios["vs_ort_fp32"] = result["ort_fp32_ms"] / ms[lut]
        if "ort_int8_ms" in result:
            ratios["vs_ort_int8"] = result["ort_int8_ms"] / ms[lut]
        result["ratios"][lut] = ratios
        if profile:
            result.setdefault("profile", {})[lut] = _node_profile(packed, lut, threads, feeds[lut], repeat, warmup)
    with tempfile.TemporaryDirectory() as tmp:
        pack_path = Path(tmp) / "merged.nmpack"
        pack_path.write_bytes(packed)
        result["peak_rss"] = session_peak_rss(pack_path, luts[0])
    result["threadpools"] = _threadpools()
    return result


def _node_profile(packed: bytes, lut: str, threads: int, feeds: dict, repeat: int, warmup: int) -> dict:
    session = Session(packed, lut=lut, threads=threads, profile=True)
    for _ in range(max(warmup, SETTLE_RUNS)):
        session.run(feeds)
    session.reset_node_times()
    start = time.perf_counter()
    for _ in range(repeat):
        session.run(feeds)
    run_ms = (time.perf_counter() - start) / repeat * 1e3
    nodes = session.node_times()
    total = sum(n.seconds for n in nodes) or 1.0
    return {"run_ms": run_ms, "nodes": [{"node": n.name, "op": n.op, "kernel": n.kernel, "calls": n.calls,
                                         "mean_ms": n.mean_ms, "share": n.seconds / total} for n in nodes]}


def format_profile(lut: str, profile: dict, top: int = 10) -> str:
    """A Markdown table of the ``top`` slowest nodes of one benchmark() profile."""
    nodes = sorted(profile["nodes"], key=lambda n: -n["mean_ms"])
    node_ms = sum(n["mean_ms"] for n in nodes)
    overlap = "; tasks ran side by side, so node times overlap" if node_ms > profile["run_ms"] else ""
    lines = [f"Where the time goes, {lut}: node times add up to {node_ms:.3f} ms of a {profile['run_ms']:.3f} ms run "
             f"(mean of profiled runs{overlap})", "", "| node | op | kernel | ms | share |", "|---|---|---|---:|---:|"]
    for n in nodes[:top]:
        lines.append(f"| {n['node']} | {n['op']} | {n['kernel']} | {n['mean_ms']:.4f} | {100 * n['share']:.1f}% |")
    rest = nodes[top:]
    if rest:
        lines.append(f"| {len(rest)} other nodes | | | {sum(n['mean_ms'] for n in rest):.4f} | "
                     f"{100 * sum(n['share'] for n in rest):.1f}% |")
    return "\n".join(lines)


def format_benchmark(result: dict) -> str:
    """A Markdown table of one benchmark() result."""
    lines = [f"threads {result['threads']}, median of {result['repeat']} runs; CPU: {result['cpu']}", "",
             "| configuration | ms | ORT fp32 / this | ORT int8 / this |", "|---|---:|---:|---:|"]
    if "ort_fp32_ms" in result:
        lines.append(f"| originals, ORT fp32 (back to back) | {result['ort_fp32_ms']:.3f} | 1.00 | |")
    if "ort_int8_ms" in result:
        lines.append(f"| originals, ORT static int8 | {result['ort_int8_ms']:.3f} | "
                     f"{result['ort_fp32_ms'] / result['ort_int8_ms']:.2f} | 1.00 |")
    for lut, ms in result["runtime_ms"].items():
        r = result["ratios"][lut]
        cells = [f"{r[key]:.2f}" if key in r else "–" for key in ("vs_ort_fp32", "vs_ort_int8")]
        lines.append(f"| merged, neuralmerge runtime {lut} | {ms:.3f} | {cells[0]} | {cells[1]} |")
    rss = result["peak_rss"]
    lines += ["", f"merged file {result['merged']['bytes']:,} bytes; session peak RSS {rss['peak_bytes'] / 2**20:.1f} MiB "
              f"({rss['session_bytes'] / 2**20:.1f} MiB above the bare interpreter)"]
    for lut, profile in result.get("profile", {}).items():
        lines += ["", format_profile(lut, profile)]
    return "\n".join(lines)


def _cpu_features() -> str:
    from neuralmerge.runtime import _native
    return _native.load().cpu_features()


def _threadpools() -> list:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{k: v for k, v in info.items() if k in ("internal_api", "prefix", "num_threads", "version")}
            for info in threadpool_info()]

