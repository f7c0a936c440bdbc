"""Procedural detection scenes and simulated black-box teachers, for composition tests and benchmarks.

No pixels: aggregation only needs boxes. ``make_scenes`` draws COCO ground truth for synthetic
images; ``simulate_teacher`` turns it into the COCO results a detector that knows only some of
the categories might return: jittered boxes, missed objects, false positives and noisy scores.
Both are deterministic for a given seed.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from neuralmerge.compose.detection import box_iou

DEFAULT_CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "person"},
    {"id": 2, "name": "bicycle"},
    {"id": 3, "name": "car"},
    {"id": 4, "name": "dog"},
    {"id": 5, "name": "chair"},
    {"id": 6, "name": "bottle"},
)

# Object height as a fraction of the image height, and width/height aspect, both log-uniform.
_SIZE_RANGE = (0.08, 0.45)
_ASPECT_RANGE = (0.4, 2.5)
# Objects of one category overlap at most this much, so "same object" stays well defined.
_MAX_SAME_CATEGORY_IOU = 0.3
# Mean scores of true and false detections before noise: detectors rank hits above mistakes on average.
_TRUE_SCORE_MEAN = 0.75
_FALSE_SCORE_MEAN = 0.45


def _random_box(rng: np.random.Generator, width: int, height: int) -> list[float]:
    h = height * np.exp(rng.uniform(*np.log(_SIZE_RANGE)))
    w = min(h * np.exp(rng.uniform(*np.log(_ASPECT_RANGE))), width * 0.9)
    x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return [float(x), float(y), float(w), float(h)]


def make_scenes(
    n_images: int,
    seed: int,
    categories: Sequence[dict[str, Any]] = DEFAULT_CATEGORIES,
    image_size: tuple[int, int] = (640, 480),
    max_objects: int = 8,
) -> dict[str, Any]:
    """COCO ground truth (images, annotations, categories) for ``n_images`` synthetic scenes.

    Each image holds 1..``max_objects`` boxes of random categories, sizes and aspects; boxes of the
    same category overlap by IoU ≤ 0.3. ``image_size`` is (width, height).
    """
    rng = np.random.default_rng(seed)
    width, height = image_size
    category_ids = [c["id"] for c in categories]
    images, annotations = [], []
    for image_id in range(1, n_images + 1):
        images.append({"id": image_id, "file_name": f"scene_{image_id:06d}.png", "width": width, "height": height})
        placed: list[tuple[int, list[float]]] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            category = int(rng.choice(category_ids))
            for _attempt in range(20):
                box = _random_box(rng, width, height)
                same = [b for c, b in placed if c == category]
                if not same or box_iou(np.array([box]), np.array(same)).max() <= _MAX_SAME_CATEGORY_IOU:
                    placed.append((category, box))
                    break
        for category, box in placed:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": category, "bbox": box,
                 "area": box[2] * box[3], "iscrowd": 0}
            )
    return {"images": images, "annotations": annotations, "categories": [dict(c) for c in categories]}


def _jitter(rng: np.random.Generator, box: Sequence[float], jitter: float) -> list[float]:
    """Move the centre by N(0, jitter·size) and scale each side by exp(N(0, jitter))."""
    x, y, w, h = box
    cx, cy = x + w / 2 + rng.normal(0, jitter * w), y + h / 2 + rng.normal(0, jitter * h)
    w2, h2 = w * np.exp(rng.normal(0, jitter)), h * np.exp(rng.normal(0, jitter))
    return [float(cx - w2 / 2), float(cy - h2 / 2), float(w2), float(h2)]


def _score(rng: np.random.Generator, mean: float, noise: float) -> float:
    return float(np.clip(rng.normal(mean, noise), 0.01, 0.99))


def simulate_teacher(
    gt: dict[str, Any],
    known_categories: Iterable[int],
    seed: int,
    jitter: float = 0.05,
    miss_rate: float = 0.2,
    false_positive_rate: float = 0.5,
    score_noise: float = 0.15,
) -> list[dict[str, Any]]:
    """COCO results of a simulated detector that knows only ``known_categories`` (category ids).

    Every ground-truth object of a known category is missed with probability ``miss_rate``, else
    detected with a box jittered by ``jitter`` (relative to its size) and a score around 0.75.
    Each image also gets Poisson(``false_positive_rate``) false positives of known categories,
    scored around 0.45: half are confusions (a jittered box on another object, given a wrong known
    category), half are boxes on background. Scores get N(0, ``score_noise``) noise.
    """
    rng = np.random.default_rng(seed)
    known = sorted(set(int(c) for c in known_categories))
    by_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in gt["images"]}
    for ann in gt["annotations"]:
        by_image[ann["image_id"]].append(ann)
    results: list[dict[str, Any]] = []
    for image in gt["images"]:
        objects = by_image[image["id"]]
        for ann in objects:
            if ann["category_id"] not in known or rng.random() < miss_rate:
                continue
            results.append({"image_id": image["id"], "category_id": ann["category_id"],
                            "bbox": _jitter(rng, ann["bbox"], jitter), "score": _score(rng, _TRUE_SCORE_MEAN, score_noise)})
        for _ in range(int(rng.poisson(false_positive_rate))):
            category = int(rng.choice(known))
            others = [a for a in objects if a["category_id"] != category]
            if others and rng.random() < 0.5:
                box = _jitter(rng, others[int(rng.integers(len(others)))]["bbox"], jitter)
            else:
                box = _random_box(rng, image.get("width", 640), image.get("height", 480))
            results.append({"image_id": image["id"], "category_id": category, "bbox": box,
                            "score": _score(rng, _FALSE_SCORE_MEAN, score_noise)})
    return results
