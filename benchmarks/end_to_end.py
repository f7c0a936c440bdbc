"""End-to-end latency: merged pairs in the neuralmerge runtime vs the originals in ONNX Runtime.

Pairs (random weights: latency does not depend on training):
  lenet   the paper's LeNet pair (10 and 20 classes, 1x32x32), merged with preset "accu"
  vgg-zf  VGG-16 with average pooling + ZF-Net at 3x224x224, merged with preset "accu"

    python benchmarks/end_to_end.py --pairs lenet --threads 1 2 --out bench-e2e [--profile]
    -> bench-e2e/end_to_end.json, bench-e2e/end_to_end.md (--profile: plus each precision's
       slowest nodes, timed in separate runs)

Targets (1 thread, ORT fp32 time of both originals back to back / our time): LeNet fp32 >= 1.5x,
int8 >= 4x, int8 >= 1x vs the originals in ORT static int8; session peak RSS <= 2x the merged
file + 50 MB.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy/torch load their thread pools

import torch  # noqa: E402
from torch import nn  # noqa: E402

import neuralmerge  # noqa: E402
from neuralmerge.runtime.bench import benchmark, format_benchmark  # noqa: E402
from neuralmerge.zoo.architectures import LeNet  # noqa: E402
from neuralmerge.zoo.train import export_onnx  # noqa: E402

from _cli import check_outputs, positive_int, write_text  # noqa: E402  (benchmarks/_cli.py)


class ZFNet(nn.Module):
    """ZF-Net (Zeiler & Fergus 2014): 96@7x7/2, 256@5x5/2, 384, 384, 256 @3x3, fc 4096, 4096."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, 7, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(96, 256, 5, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(256 * 5 * 5, 4096), nn.ReLU(),
                                        nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class VGGAvg(nn.Module):
    """VGG-16 (configuration D) with average instead of max pooling, as in the NeuralMerger paper."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, channels = [], 3
        for width in (64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512, "P"):
            if width == "P":
                layers.append(nn.AvgPool2d(2))
            else:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(512 * 7 * 7, 4096), nn.ReLU(),
                                        nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


PAIRS = {
    "lenet": (lambda: LeNet(10), lambda: LeNet(20), (1, 32, 32)),
    "vgg-zf": (lambda: VGGAvg(1000), lambda: ZFNet(1000), (3, 224, 224)),
}


def build_pair(name: str, folder: Path) -> tuple[Path, list[Path]]:
    make_a, make_b, shape = PAIRS[name]
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    originals = [export_onnx(make().eval(), folder / f"{name}_{i}.onnx", shape) for i, make in enumerate((make_a, make_b))]
    merged = folder / f"{name}_merged.onnx"
    if not merged.exists():
        neuralmerge.merge([str(p) for p in originals], str(merged), preset="accu", quiet=True, fidelity_samples=2)
    return merged, originals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=["lenet", "vgg-zf"])
    parser.add_argument("--threads", nargs="+", type=positive_int, default=[1, 2])
    parser.add_argument("--repeat", type=positive_int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench-e2e"))
    parser.add_argument("--profile", action="store_true", help="also time every node of the merged model")
    args = parser.parse_args()
    check_outputs([args.out / "end_to_end.json", args.out / "end_to_end.md"],
                  folders=[args.out, *(args.out / pair for pair in args.pairs)])

    results, report = {}, ["# End-to-end latency (batch 1)", ""]
    for pair in args.pairs:
        merged, originals = build_pair(pair, args.out / pair)
        for threads in args.threads:
            repeat = args.repeat if pair == "lenet" else max(10, args.repeat // 20)
            r = benchmark(merged, originals, threads=threads, repeat=repeat, warmup=max(3, repeat // 10),
                          profile=args.profile)
            results[f"{pair}/threads={threads}"] = r
            report += [f"## {pair}, {threads} thread(s)", "", format_benchmark(r), ""]
            print(report[-2], flush=True)
        lenet = results.get(f"{pair}/threads=1")
        if pair == "lenet" and lenet:
            rss_limit = 2 * lenet["merged"]["bytes"] + 50 * 2**20
            checks = {"fp32 >= 1.5x ORT fp32": lenet["ratios"]["fp32"]["vs_ort_fp32"] >= 1.5,
                      "int8 >= 4x ORT fp32": lenet["ratios"]["int8"]["vs_ort_fp32"] >= 4.0,
                      "int8 >= 1x ORT int8": lenet["ratios"]["int8"]["vs_ort_int8"] >= 1.0,
                      "peak RSS <= 2x file + 50 MB": lenet["peak_rss"]["peak_bytes"] <= rss_limit}
            report += ["LeNet targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in checks.items()), ""]
            print(report[-2], flush=True)
    write_text(args.out / "end_to_end.json", json.dumps(results, indent=2))
    write_text(args.out / "end_to_end.md", "\n".join(report))
    print(f"wrote {args.out / 'end_to_end.json'} and {args.out / 'end_to_end.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
