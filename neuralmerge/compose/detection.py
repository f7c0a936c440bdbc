"""Detection pseudo-label aggregation (Model Composition, BMVC 2021, §3.2 and Algorithm 2).

Several black-box detectors ("teachers"), each knowing its own subset of categories, have been
run over the same unlabeled images. Their COCO *results* files are combined into one set of
pseudo-labels a student detector can be trained on:

1. filter: drop detections scoring below ``score_threshold`` (Algorithm 1, FilterPseudoLabels);
2. per image and category, group the boxes that cover the same object: greedily, by descending
   score, the best unassigned box takes every unassigned box whose IoU with it exceeds
   ``iou_threshold`` (GroupByObject);
3. vote: with K the number of distinct teachers in a group and N the number of teachers whose
   category list contains the class, ``unanimous`` keeps K = N, ``consensus`` keeps K ≥ N/2
   (the paper deletes a group when K < N/2), ``affirmative`` keeps every group;
4. Soft-NMS inside each kept group (linear or gaussian, Bodla et al. 2017), then drop boxes whose
   decayed score fell below ``score_threshold``.

Boxes are COCO ``[x, y, width, height]`` in pixels throughout. Categories are matched by COCO id.
Every problem with the user's files raises :class:`DetectionInputError` with a one-line message
naming the file.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
from tqdm import tqdm

from neuralmerge.errors import NeuralMergeError

Strategy = Literal["unanimous", "consensus", "affirmative"]
SoftNMSMethod = Literal["linear", "gaussian", "none"]
STRATEGIES: tuple[str, ...] = ("unanimous", "consensus", "affirmative")
SOFT_NMS_METHODS: tuple[str, ...] = ("linear", "gaussian", "none")


class DetectionInputError(NeuralMergeError):
    """A detection, category, image-list or ground-truth file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class TeacherPredictions:
    """One teacher's detections (COCO results) and the categories ({id: name}) it can detect."""

    source: str
    categories: dict[int, str]
    detections: list[dict[str, Any]]


@dataclass
class AggregationResult:
    """Aggregated pseudo-labels (COCO results, sorted by image then descending score) and counts."""

    detections: list[dict[str, Any]]
    image_ids: list[int]
    categories: dict[int, str]
    stats: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Geometry, grouping, voting and Soft-NMS


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of two arrays of COCO boxes ``[x, y, w, h]``, shapes (n, 4) and (m, 4) → (n, m)."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    inter_w = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    inter_h = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = inter_w * inter_h
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return inter / union


def group_by_object(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[np.ndarray]:
    """Cluster same-category boxes into objects; returns index arrays, best-scoring box first.

    Greedy by descending score: the best unassigned box seeds a group and takes every unassigned
    box whose IoU with the seed is strictly above ``iou_threshold``.
    """
    iou = box_iou(boxes, boxes)
    order = np.argsort(-np.asarray(scores), kind="stable")
    unassigned = np.ones(len(order), dtype=bool)
    groups: list[np.ndarray] = []
    for seed in order:
        if not unassigned[seed]:
            continue
        members = np.flatnonzero(unassigned & (iou[seed] > iou_threshold))
        members = np.union1d(members, [seed])  # self-IoU can round below a threshold close to 1
        unassigned[members] = False
        groups.append(members[np.argsort(-scores[members], kind="stable")])
    return groups


def keep_group(n_voting_teachers: int, n_eligible_teachers: int, strategy: Strategy) -> bool:
    """The paper's vote: K distinct teachers in a group versus N teachers that know its class."""
    if strategy == "unanimous":
        return n_voting_teachers >= n_eligible_teachers
    if strategy == "consensus":
        return n_voting_teachers >= n_eligible_teachers / 2
    if strategy == "affirmative":
        return True
    raise DetectionInputError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")


def soft_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    method: SoftNMSMethod = "gaussian",
    sigma: float = 0.5,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.001,
) -> tuple[np.ndarray, np.ndarray]:
    """Soft-NMS (Bodla et al. 2017): returns (kept indices in selection order, their decayed scores).

    Repeatedly keep the highest-scoring remaining box M and decay every other remaining box b:
    ``linear``: s *= 1 - IoU(M, b) when IoU(M, b) >= iou_threshold (Bodla's N_t); ``gaussian``: s *= exp(-IoU² / sigma);
    ``none``: no decay. Boxes whose score drops below ``score_threshold`` are discarded.
    """
    # Hand-written: torchvision only has hard NMS (and the project may not depend on it), and no
    # maintained numpy package offers both Soft-NMS variants; the IoU matrix is computed once and
    # each step is one vector update over the remaining boxes.
    current = np.asarray(scores, dtype=np.float64).copy()
    if method not in SOFT_NMS_METHODS:
        raise DetectionInputError(f"unknown Soft-NMS method {method!r} (choose from {', '.join(SOFT_NMS_METHODS)})")
    if method == "none":
        order = np.argsort(-current, kind="stable")
        order = order[current[order] >= score_threshold]
        return order, current[order]
    iou = box_iou(boxes, boxes)
    remaining = np.flatnonzero(current >= score_threshold)
    kept: list[int] = []
    while remaining.size:
        best = remaining[np.argmax(current[remaining])]
        kept.append(int(best))
        remaining = remaining[remaining != best]
        overlap = iou[best, remaining]
        if method == "linear":
            decay = np.where(overlap >= iou_threshold, 1.0 - overlap, 1.0)
        else:
            decay = np.exp(-(overlap**2) / sigma)
        current[remaining] *= decay
        remaining = remaining[current[remaining] >= score_threshold]
    kept_array = np.asarray(kept, dtype=np.int64)
    return kept_array, current[kept_array]


def aggregate_detections(
    teachers: Sequence[TeacherPredictions],
    *,
    strategy: Strategy = "consensus",
    iou_threshold: float = 0.5,
    soft_nms_method: SoftNMSMethod = "gaussian",
    sigma: float = 0.5,
    score_threshold: float = 0.001,
    image_ids: Iterable[int] | None = None,
    progress: bool = False,
) -> AggregationResult:
    """Algorithm 2: filter, group by object, vote and Soft-NMS the teachers' detections.

    ``progress`` shows a tqdm bar on an interactive stderr.

    ``image_ids`` is the unlabeled set; by default the union of the image ids the teachers report.
    A detection on an image outside ``image_ids`` is an error.
    """
    if not teachers:
        raise DetectionInputError("no detection files given")
    if strategy not in STRATEGIES:
        raise DetectionInputError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    if not 0.0 <= iou_threshold < 1.0:
        raise DetectionInputError(f"IoU threshold {iou_threshold} must be in [0, 1)")
    if not 0 < sigma < math.inf:  # NaN too
        raise DetectionInputError(f"Soft-NMS sigma {sigma} must be positive")
    categories = merge_category_lists(teachers)
    eligible = {cid: sum(cid in t.categories for t in teachers) for cid in categories}

    image_col, category_col, teacher_col, score_col, box_rows = [], [], [], [], []
    for index, teacher in enumerate(teachers):
        for det in teacher.detections:
            image_col.append(det["image_id"])
            category_col.append(det["category_id"])
            teacher_col.append(index)
            score_col.append(det["score"])
            box_rows.append(det["bbox"])
    images = np.asarray(image_col, dtype=np.int64)
    cats = np.asarray(category_col, dtype=np.int64)
    owner = np.asarray(teacher_col, dtype=np.int64)
    scores = np.asarray(score_col, dtype=np.float64)
    boxes = np.asarray(box_rows, dtype=np.float64).reshape(-1, 4)

    if image_ids is None:
        all_images = sorted(set(image_col))
    else:
        all_images = sorted(set(int(i) for i in image_ids))
        outside = sorted(set(image_col) - set(all_images))
        if outside:
            raise DetectionInputError(
                f"{len(outside)} detected image id(s) are not in the image list (first: {outside[0]})"
            )

    stats = {"teachers": len(teachers), "images": len(all_images), "input_detections": int(len(scores))}
    passed = scores >= score_threshold
    images, cats, owner, scores, boxes = images[passed], cats[passed], owner[passed], scores[passed], boxes[passed]
    stats["after_score_filter"] = int(len(scores))

    order = np.lexsort((cats, images))
    images, cats, owner, scores, boxes = images[order], cats[order], owner[order], scores[order], boxes[order]
    # Segments of equal (image, category): the unit GroupByObject works on.
    boundary = np.r_[True, (images[1:] != images[:-1]) | (cats[1:] != cats[:-1])] if len(images) else np.zeros(0, bool)
    starts = np.flatnonzero(boundary)
    ends = np.r_[starts[1:], len(images)].astype(np.int64) if len(starts) else starts

    output: list[dict[str, Any]] = []
    n_groups = n_kept = 0
    for start, end in tqdm(zip(starts, ends), total=len(starts), disable=None if progress else True, desc="aggregating"):
        seg_boxes, seg_scores, seg_owner = boxes[start:end], scores[start:end], owner[start:end]
        category = int(cats[start])
        for group in group_by_object(seg_boxes, seg_scores, iou_threshold):
            n_groups += 1
            if not keep_group(len(np.unique(seg_owner[group])), eligible[category], strategy):
                continue
            n_kept += 1
            kept, new_scores = soft_nms(
                seg_boxes[group], seg_scores[group], soft_nms_method, sigma, iou_threshold, score_threshold
            )
            for local, score in zip(kept, new_scores):
                output.append(
                    {
                        "image_id": int(images[start]),
                        "category_id": category,
                        "bbox": [float(v) for v in seg_boxes[group][local]],
                        "score": float(score),
                    }
                )
    output.sort(key=lambda d: (d["image_id"], -d["score"]))
    stats.update(groups=n_groups, groups_kept=n_kept, output_detections=len(output))
    return AggregationResult(detections=output, image_ids=all_images, categories=categories, stats=stats)


def merge_category_lists(teachers: Sequence[TeacherPredictions]) -> dict[int, str]:
    """Union of the teachers' categories by id; one id must mean one name across all teachers."""
    merged: dict[int, str] = {}
    origin: dict[int, str] = {}
    by_name: dict[str, int] = {}
    for teacher in teachers:
        for cid, name in teacher.categories.items():
            if cid in merged and merged[cid] != name:
                raise DetectionInputError(
                    f"category id {cid} is {merged[cid]!r} in {origin[cid]} but {name!r} in {teacher.source}"
                )
            if name in by_name and by_name[name] != cid:
                raise DetectionInputError(
                    f"category {name!r} has id {by_name[name]} in {origin[by_name[name]]} but id {cid} in {teacher.source}"
                )
            merged.setdefault(cid, name)
            origin.setdefault(cid, teacher.source)
            by_name.setdefault(name, cid)
    return dict(sorted(merged.items()))


# ----------------------------------------------------------------------------------------------
# COCO JSON input


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file, turning every failure into a one-line :class:`DetectionInputError`."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DetectionInputError(f"{name}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DetectionInputError(f"{name}: cannot read ({exc.__class__.__name__}: {exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DetectionInputError(f"{name}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_categories(data: Any, source: str) -> dict[int, str]:
    """Categories from a JSON list of ``{id, name}`` or a COCO dict with a ``categories`` key."""
    if isinstance(data, dict):
        if "categories" not in data:
            raise DetectionInputError(f"{source}: no 'categories' key (expected a list of {{id, name}} or a COCO file)")
        data = data["categories"]
    if not isinstance(data, list) or not data:
        raise DetectionInputError(f"{source}: expected a non-empty list of categories {{id, name}}")
    categories: dict[int, str] = {}
    for position, entry in enumerate(data):
        if not isinstance(entry, dict) or not _is_int(entry.get("id")) or not isinstance(entry.get("name"), str):
            raise DetectionInputError(f"{source}: category {position} needs an integer 'id' and a string 'name'")
        cid, name = entry["id"], entry["name"]
        if cid in categories:
            raise DetectionInputError(f"{source}: duplicate category id {cid}")
        if name in categories.values():
            raise DetectionInputError(f"{source}: duplicate category name {name!r}")
        categories[cid] = name
    return categories


def parse_detections(data: Any, source: str, categories: dict[int, str], categories_source: str) -> list[dict]:
    """Validate a COCO results list against the categories its teacher knows; returns clean dicts."""
    if not isinstance(data, list):
        raise DetectionInputError(f"{source}: expected a JSON list of detections (COCO results format)")
    detections: list[dict[str, Any]] = []
    for position, det in enumerate(data):
        where = f"{source}: detection {position}"
        if not isinstance(det, dict):
            raise DetectionInputError(f"{where} is not an object")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in det:
                raise DetectionInputError(f"{where} has no {key!r}")
        if not _is_int(det["image_id"]):
            raise DetectionInputError(f"{where} has a non-integer image_id {det['image_id']!r}")
        if not _is_int(det["category_id"]):
            raise DetectionInputError(f"{where} has a non-integer category_id {det['category_id']!r}")
        if det["category_id"] not in categories:
            raise DetectionInputError(
                f"{where} has category_id {det['category_id']}, which is not in its categories ({categories_source})"
            )
        bbox = det["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise DetectionInputError(f"{where} has a bbox that is not 4 finite numbers [x, y, w, h]: {bbox!r}")
        if bbox[2] <= 0 or bbox[3] <= 0:
            raise DetectionInputError(f"{where} has a zero or negative-area bbox {bbox!r} (width and height must be > 0)")
        if not all(math.isfinite(v) for v in (bbox[0] + bbox[2], bbox[1] + bbox[3], bbox[2] * bbox[3])):
            raise DetectionInputError(f"{where} has a bbox too large for 64-bit floats: {bbox!r}")
        if not _is_number(det["score"]) or not 0.0 <= det["score"] <= 1.0:
            raise DetectionInputError(f"{where} has score {det['score']!r}, expected a number in [0, 1]")
        detections.append(
            {
                "image_id": det["image_id"],
                "category_id": det["category_id"],
                "bbox": [float(v) for v in bbox],
                "score": float(det["score"]),
            }
        )
    return detections


def load_teachers(
    detection_paths: Sequence[str | os.PathLike], category_paths: Sequence[str | os.PathLike]
) -> list[TeacherPredictions]:
    """Read one detection file and one category file per teacher, paired in order, and validate them."""
    if len(detection_paths) != len(category_paths):
        raise DetectionInputError(
            f"{len(detection_paths)} detection file(s) but {len(category_paths)} --categories file(s): "
            "give one --categories per detection file, in the same order"
        )
    teachers = []
    for det_path, cat_path in zip(detection_paths, category_paths):
        categories = parse_categories(read_json(cat_path), str(cat_path))
        detections = parse_detections(read_json(det_path), str(det_path), categories, str(cat_path))
        teachers.append(TeacherPredictions(source=str(det_path), categories=categories, detections=detections))
    merge_category_lists(teachers)
    return teachers


def load_images(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Image entries from a COCO file (``images`` key) or a list of image objects / integer ids."""
    source = str(path)
    data = read_json(path)
    if isinstance(data, dict):
        if "images" not in data:
            raise DetectionInputError(f"{source}: no 'images' key")
        data = data["images"]
    if not isinstance(data, list):
        raise DetectionInputError(f"{source}: expected a list of images")
    images: list[dict[str, Any]] = []
    for position, entry in enumerate(data):
        entry = {"id": entry} if _is_int(entry) else entry
        if not isinstance(entry, dict) or not _is_int(entry.get("id")):
            raise DetectionInputError(f"{source}: image {position} has no integer 'id'")
        images.append(entry)
    if len({img["id"] for img in images}) != len(images):
        raise DetectionInputError(f"{source}: duplicate image ids")
    return images


def load_ground_truth(path: str | os.PathLike) -> dict[str, Any]:
    """A COCO annotations file, checked enough for COCOeval (fills missing area / iscrowd / id)."""
    source = str(path)
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise DetectionInputError(f"{source}: expected a COCO annotations file with 'images' and 'annotations' lists")
    parse_categories(data, source)
    image_ids = {img.get("id") for img in data["images"] if isinstance(img, dict)}
    annotations = []
    for position, ann in enumerate(data["annotations"]):
        where = f"{source}: annotation {position}"
        if not isinstance(ann, dict) or not all(k in ann for k in ("image_id", "category_id", "bbox")):
            raise DetectionInputError(f"{where} needs image_id, category_id and bbox")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise DetectionInputError(f"{where} has a bbox that is not 4 finite numbers: {bbox!r}")
        if ann["image_id"] not in image_ids:
            raise DetectionInputError(f"{where} refers to image_id {ann['image_id']!r}, which is not in 'images'")
        annotations.append(
            {"id": position + 1, "area": bbox[2] * bbox[3], "iscrowd": 0, **ann}
        )
    return {**data, "annotations": annotations}


# ----------------------------------------------------------------------------------------------
# Output and evaluation


def to_annotations_file(result: AggregationResult, images: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A COCO annotations file (images, annotations, categories) a detector can be trained on.

    ``images`` supplies full image entries (file_name, width, height); by default ``{"id": ...}``.
    Each annotation keeps its pseudo-label ``score`` as an extra field.
    """
    image_entries = list(images) if images is not None else [{"id": i} for i in result.image_ids]
    annotations = [
        {
            "id": number,
            "image_id": det["image_id"],
            "category_id": det["category_id"],
            "bbox": det["bbox"],
            "area": det["bbox"][2] * det["bbox"][3],
            "iscrowd": 0,
            "score": det["score"],
        }
        for number, det in enumerate(result.detections, start=1)
    ]
    categories = [{"id": cid, "name": name} for cid, name in result.categories.items()]
    return {"images": image_entries, "annotations": annotations, "categories": categories}


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary file next to ``path`` then rename it over ``path``, so no partial
    file is left (callers check for existing outputs before any work)."""
    from neuralmerge.io.onnx_files import write_bytes_atomic

    write_bytes_atomic(json.dumps(data).encode(), path, force=True)


def evaluate_map(ground_truth: dict[str, Any], detections: Sequence[dict[str, Any]]) -> dict[str, float]:
    """COCO box mAP@[.5:.95] and mAP@.5 of ``detections`` (results format) against ``ground_truth``.

    Also the precision and recall of the whole pseudo-label set at IoU 0.5 (COCOeval's one-to-one
    matching, every score counted): mAP ranks by score, but a student trains on every label kept.
    Only the ground truth's images are evaluated; detections on other images are ignored.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_images = {img["id"] for img in ground_truth["images"]}
    evaluated = [copy.deepcopy(d) for d in detections if d["image_id"] in gt_images]
    if detections and not evaluated:
        raise DetectionInputError("no pseudo-label is on an image of the ground truth (image ids do not match)")
    summary = {"images": len(gt_images), "detections": len(evaluated)}
    if not evaluated or not ground_truth["annotations"]:
        recall = 0.0 if ground_truth["annotations"] else 1.0
        return {"map": 0.0, "map50": 0.0, "precision50": 0.0, "recall50": recall, **summary}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on stdout
        gt = COCO()
        gt.dataset = copy.deepcopy(ground_truth)
        gt.createIndex()
        predictions = gt.loadRes(evaluated)
        evaluator = COCOeval(gt, predictions, iouType="bbox")
        # The match tables below keep the top maxDets[-1] detections per image and category; the
        # mAP figures read maxDets = 100 by value, so a last, larger entry leaves them standard.
        evaluator.params.maxDets = [1, 10, 100, max(101, len(evaluated))]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # Per (category, image) match tables for the "all" area range; row 0 of dtMatches is IoU 0.5.
    all_area = evaluator.params.areaRng[0]
    matched_dt = total_dt = matched_gt = total_gt = 0
    for entry in evaluator.evalImgs:
        if entry is None or entry["aRng"] != all_area:
            continue
        dt_used, gt_used = ~np.asarray(entry["dtIgnore"][0], bool), ~np.asarray(entry["gtIgnore"], bool)
        matched_dt += int((np.asarray(entry["dtMatches"][0])[dt_used] > 0).sum())
        total_dt += int(dt_used.sum())
        matched_gt += int((np.asarray(entry["gtMatches"][0])[gt_used] > 0).sum())
        total_gt += int(gt_used.sum())
    return {
        "map": float(evaluator.stats[0]),
        "map50": float(evaluator.stats[1]),
        "precision50": matched_dt / total_dt if total_dt else 0.0,
        "recall50": matched_gt / total_gt if total_gt else 0.0,
        **summary,
    }
