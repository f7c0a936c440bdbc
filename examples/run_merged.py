"""Run a merged model on the device side: the native runtime, no torch, beside stock ONNX Runtime.

    neuralmerge demo                                  # writes neuralmerge-demo/merged.onnx
    python examples/run_merged.py neuralmerge-demo/merged.onnx

Loads the merged file once per table precision, feeds every task a batch of random inputs of its
declared shape, runs one task alone, and prints how far each precision's outputs are from ONNX
Runtime's and how long a call takes. Imports numpy, onnxruntime and neuralmerge.runtime only.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnxruntime as ort

from neuralmerge.runtime import ModelError, Session


def random_feeds(session: Session, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One array per graph input, of its declared shape (the batch dimension set to ``batch``)."""
    return {spec.name: rng.standard_normal([batch if d is None else d for d in spec.shape]).astype(np.float32)
            for spec in session.inputs}


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up: the first call plans buffers
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a merged .onnx (or .nmpack) file")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    try:
        exact = Session(args.model, lut="fp32", threads=args.threads)
    except (ModelError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("inputs: ", ", ".join(f"{s.name} {list(s.shape)}" for s in exact.inputs))
    print("outputs:", ", ".join(f"{s.name} {list(s.shape)}" for s in exact.outputs))
    feeds = random_feeds(exact, 1, rng)

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    reference = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in reference.get_outputs()]
    want = dict(zip(names, reference.run(None, feeds)))
    print(f"onnxruntime, the same file: {median_ms(lambda: reference.run(None, feeds), args.repeat):.3f} ms per call")

    for lut in ("fp32", "fp16", "int8"):
        session = exact if lut == "fp32" else Session(args.model, lut=lut, threads=args.threads)
        got = session.run(feeds)
        error = max(float(np.abs(got[n] - want[n]).max() / max(np.abs(want[n]).max(), 1e-12)) for n in names)
        agree = np.mean([np.array_equal(got[n].argmax(-1), want[n].argmax(-1)) for n in names])
        ms = median_ms(lambda: session.run(feeds), args.repeat)
        # Lines read "node: EConv int8-avx512", with " + Relu" when a ReLU is folded into the layer.
        kernels = sorted({line.split(": ", 1)[1].split()[1] for line in session.kernels()})
        print(f"neuralmerge {lut}: {ms:.3f} ms per call, largest relative difference to onnxruntime "
              f"{error:.1e}, same top-1 on {100 * agree:.0f}% of the outputs (kernels {', '.join(kernels)})")

    # One task alone: only the nodes its output needs run, so only its input is fed.
    first = names[0]
    task_input = exact.inputs[0].name
    alone = exact.run({task_input: feeds[task_input]}, outputs=[first])
    print(f"{first} alone from {task_input}: shape {list(alone[first].shape)}, "
          f"matches the full run: {np.allclose(alone[first], exact.run(feeds)[first], rtol=1e-5, atol=1e-6)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
