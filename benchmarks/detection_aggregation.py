"""Model Composition Table 4 analogue: how good are the aggregated detection pseudo-labels?

Simulated teachers (``neuralmerge.zoo.scenes``) with different category subsets label synthetic
scenes; each aggregation variant's pseudo-labels are scored against the ground truth with
pycocotools (mAP@[.5:.95], mAP@.5) plus the precision/recall of the whole label set at IoU 0.5
(what a student would train on). Two scenarios: three overlapping "experts" (paper Table 2) and
six teachers with random category subsets (paper scenario 4). Mean ± std over seeds.

    python benchmarks/detection_aggregation.py --seeds 5 --images 500 --json detection_aggregation.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuralmerge.compose.detection import TeacherPredictions, aggregate_detections, evaluate_map  # noqa: E402
from neuralmerge.zoo.scenes import DEFAULT_CATEGORIES, make_scenes, simulate_teacher  # noqa: E402

from _cli import check_outputs, number, positive_int, write_text  # noqa: E402  (benchmarks/_cli.py)

CATEGORY_IDS = [c["id"] for c in DEFAULT_CATEGORIES]
NAMES = {c["id"]: c["name"] for c in DEFAULT_CATEGORIES}
# person (1) is known by every expert, as in the paper's Table 2; the rest overlap partially.
EXPERT_SUBSETS = [[1, 2, 3, 4], [1, 2, 5, 6], [1, 3, 4, 5]]


def random_subsets(rng: np.random.Generator, n_teachers: int) -> list[list[int]]:
    """Random category subsets of 2–4 classes that together cover every category."""
    while True:
        subsets = [sorted(rng.choice(CATEGORY_IDS, size=int(rng.integers(2, 5)), replace=False).tolist())
                   for _ in range(n_teachers)]
        if set().union(*subsets) == set(CATEGORY_IDS):
            return subsets


def methods(threshold: float) -> dict[str, dict]:
    """Rows of the table: (a) union, (b) score filter only, (c) full method, then other strategies."""
    return {
        "(a) no filtering: union of all detections": dict(strategy="affirmative", soft_nms_method="none", score_threshold=0.0),
        f"(b) score filtering only (score ≥ {threshold})": dict(strategy="affirmative", soft_nms_method="none", score_threshold=threshold),
        "(c) full: filtering + consensus + gaussian Soft-NMS": dict(strategy="consensus", soft_nms_method="gaussian", score_threshold=threshold),
        "filtering + consensus + linear Soft-NMS": dict(strategy="consensus", soft_nms_method="linear", score_threshold=threshold),
        "filtering + affirmative + gaussian Soft-NMS": dict(strategy="affirmative", soft_nms_method="gaussian", score_threshold=threshold),
        "filtering + unanimous + gaussian Soft-NMS": dict(strategy="unanimous", soft_nms_method="gaussian", score_threshold=threshold),
    }


def run_scenario(subsets_for_seed, seeds, n_images, threshold, teacher_kwargs) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {name: [] for name in methods(threshold)}
    for seed in seeds:
        gt = make_scenes(n_images, seed=seed)
        subsets = subsets_for_seed(seed)
        teachers = [
            TeacherPredictions(f"teacher{i}", {c: NAMES[c] for c in known},
                               simulate_teacher(gt, known, seed=1000 * seed + i, **teacher_kwargs))
            for i, known in enumerate(subsets)
        ]
        for name, settings in methods(threshold).items():
            result = aggregate_detections(teachers, **settings)
            scores = evaluate_map(gt, result.detections)
            rows[name].append({"seed": seed, "subsets": subsets, "labels_per_image": len(result.detections) / n_images,
                               **{k: scores[k] for k in ("map", "map50", "precision50", "recall50")}})
    return rows


def markdown(title: str, rows: dict[str, list[dict]]) -> str:
    lines = [f"**{title}**", "",
             "| method | mAP@[.5:.95] | mAP@.5 | precision@.5 | recall@.5 | labels / image |",
             "|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        cells = []
        for key, scale in (("map", 100), ("map50", 100), ("precision50", 100), ("recall50", 100), ("labels_per_image", 1)):
            values = np.array([r[key] for r in runs]) * scale
            cells.append(f"{values.mean():.1f} ± {values.std():.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=positive_int, default=5, help="number of seeds (scenes and teachers), ≥ 5 for the table")
    parser.add_argument("--images", type=positive_int, default=500, help="synthetic images per seed")
    parser.add_argument("--score-threshold", type=number(float, 0, 1), default=0.3, help="filtering threshold of rows (b)–(f)")
    parser.add_argument("--jitter", type=number(float, 0), default=0.05)
    parser.add_argument("--miss-rate", type=number(float, 0, 1), default=0.2)
    parser.add_argument("--false-positive-rate", type=number(float, 0), default=0.5, help="expected false positives per image per teacher")
    parser.add_argument("--score-noise", type=number(float, 0), default=0.15)
    parser.add_argument("--json", type=Path, help="write per-seed figures and the settings here")
    args = parser.parse_args()
    check_outputs([args.json])

    teacher_kwargs = dict(jitter=args.jitter, miss_rate=args.miss_rate,
                          false_positive_rate=args.false_positive_rate, score_noise=args.score_noise)
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    scenarios = {
        "3 experts (teachers per class: person 3, bicycle/car/dog/chair 2, bottle 1)": lambda seed: EXPERT_SUBSETS,
        "6 teachers with random 2–4-class subsets": lambda seed: random_subsets(np.random.default_rng(10_000 + seed), 6),
    }
    results = {}
    for title, subsets_for_seed in scenarios.items():
        rows = run_scenario(subsets_for_seed, seeds, args.images, args.score_threshold, teacher_kwargs)
        results[title] = rows
        print(markdown(f"{title} — {args.images} images × {len(seeds)} seeds", rows), end="\n\n", flush=True)
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        write_text(args.json, json.dumps({"settings": {**vars(args), "json": str(args.json), **teacher_kwargs},
                                          "scenarios": results}, indent=1))


if __name__ == "__main__":
    main()
