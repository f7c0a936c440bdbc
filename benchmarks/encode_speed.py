"""Joint k-means encoding speed: the paper's LeNet pair and a pair of VGG-16-sized models.

Weights are random (speed does not depend on training). Settings are the paper's ACCU presets
(docs/calibration.md). LeNet: median of several runs; VGG: one run.

    python benchmarks/encode_speed.py [--lenet-runs 3] [--skip-vgg] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import faiss
import numpy as np

from neuralmerge.encode.kmeans import encode_group
from neuralmerge.graph.layers import Layer

from _cli import positive_int  # benchmarks/_cli.py, beside this script

LENET = [  # (name, kind, weight shape, r, C)
    ("conv1", "conv", (32, 1, 5, 5), 1, 64),
    ("conv2", "conv", (64, 32, 5, 5), 8, 128),
    ("fc1", "fc", (1024, 4096), 8, 128),
]
VGG_CONVS = [(64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (256, 256),
             (512, 256), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
VGG_CONV_RC = [(32, 256)] * 4 + [(16, 256)] * 3 + [(8, 256)] * 6   # g1-2, g3, g4-5
VGG = [(f"conv{i + 1}", "conv", (p, d, 3, 3), r, c) for i, ((p, d), (r, c)) in enumerate(zip(VGG_CONVS, VGG_CONV_RC))]
VGG += [("fc1", "fc", (4096, 25088), 4, 128), ("fc2", "fc", (4096, 4096), 4, 64)]


def random_pair(spec, seed: int) -> list[tuple[str, int, int, list[Layer]]]:
    rng = np.random.default_rng(seed)
    groups = []
    for name, kind, shape, r, c in spec:
        members = [Layer(model=m, node=f"{name}", op_type="Conv" if kind == "conv" else "Gemm", kind=kind,
                         weight=rng.standard_normal(shape, dtype=np.float32) * 0.05, bias=None,
                         weight_name=f"{name}.weight", bias_name=None) for m in range(2)]
        groups.append((name, r, c, members))
    return groups


def encode_all(groups, label: str | None = None) -> dict[str, float]:
    """Seconds per group; prints each row as it finishes when ``label`` is given."""
    times = {}
    for name, r, c, members in groups:
        start = time.perf_counter()
        enc = encode_group(members, r, c, name=name)
        times[name] = time.perf_counter() - start
        if label:
            print(f"{label:<12} {name:<7} {enc.r:>3} {c:>5} {times[name]:>9.2f} {enc.relative_error:>8.3f}", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lenet-runs", type=positive_int, default=3)
    parser.add_argument("--skip-vgg", action="store_true")
    parser.add_argument("--threads", type=positive_int, default=faiss.omp_get_max_threads())
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, {args.threads} thread(s), nredo=3, niter=25 (encode_group defaults)")

    print(f"{'models':<12} {'group':<7} {'r':>3} {'C':>5} {'seconds':>9} {'rel.err':>8}")
    lenet = random_pair(LENET, seed=0)
    runs = [encode_all(lenet) for _ in range(args.lenet_runs)]
    for name, r, c, members in lenet:
        print(f"{'LeNet pair':<12} {name:<7} {r:>3} {c:>5} {statistics.median(run[name] for run in runs):>9.2f}")
    print(f"{'LeNet pair':<12} {'total':<7} {'':>3} {'':>5} {statistics.median(sum(run.values()) for run in runs):>9.2f}"
          f"   (median of {args.lenet_runs})", flush=True)
    if not args.skip_vgg:
        run = encode_all(random_pair(VGG, seed=1), label="VGG-16 pair")
        print(f"{'VGG-16 pair':<12} {'total':<7} {'':>3} {'':>5} {sum(run.values()):>9.2f}   (1 run)")


if __name__ == "__main__":
    main()
