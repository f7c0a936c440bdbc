"""Detection pseudo-label aggregation (Model Composition, Algorithm 2): algorithm, I/O, CLI, bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from neuralmerge.compose.cli_detection import aggregate_detections as aggregate_command
from neuralmerge.compose.detection import (
    DetectionInputError,
    TeacherPredictions,
    aggregate_detections,
    box_iou,
    evaluate_map,
    group_by_object,
    keep_group,
    load_teachers,
    soft_nms,
    to_annotations_file,
    write_json_atomic,
)
from neuralmerge.errors import NeuralMergeError
from neuralmerge.zoo.scenes import make_scenes, simulate_teacher

PERSON, CAR, DOG = 1, 2, 3
NAMES = {PERSON: "person", CAR: "car", DOG: "dog"}


def det(image_id: int, category_id: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def teacher(name: str, known: list[int], detections: list[dict]) -> TeacherPredictions:
    return TeacherPredictions(name, {c: NAMES[c] for c in known}, detections)


# ------------------------------------------------------------------------------ geometry and grouping


def test_box_iou_matches_hand_values():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 8], [5, 0, 10, 10], [20, 20, 5, 5], [0, 0, 10, 10]])
    np.testing.assert_allclose(box_iou(a, b), [[0.8, 50 / 150, 0.0, 1.0]])


def test_group_by_object_is_greedy_by_score_and_strict_on_threshold():
    boxes = np.array([
        [0, 0, 10, 10],     # 0: seed of object A
        [0, 0, 10, 8],      # 1: IoU 0.8 with 0 -> object A
        [100, 0, 10, 10],   # 2: seed of object B
        [105, 0, 10, 10],   # 3: IoU 1/3 with 2 -> its own group
        [0, 0, 10, 5],      # 4: IoU exactly 0.5 with 0 -> not grouped (strictly above only)
    ], dtype=float)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    groups = [g.tolist() for g in group_by_object(boxes, scores, 0.5)]
    assert groups == [[0, 1], [2], [3], [4]]
    # The best-scoring box seeds the group even when it is listed last.
    groups = [g.tolist() for g in group_by_object(boxes[[1, 0]], np.array([0.8, 0.9]), 0.5)]
    assert groups == [[1, 0]]


# ------------------------------------------------------------------------------ voting


def test_keep_group_inequalities_follow_the_paper():
    assert keep_group(3, 3, "unanimous") and not keep_group(2, 3, "unanimous")
    assert keep_group(2, 3, "consensus") and not keep_group(1, 3, "consensus")  # K >= N/2
    assert keep_group(1, 2, "consensus") and keep_group(2, 4, "consensus") and not keep_group(1, 4, "consensus")
    assert keep_group(1, 5, "affirmative")


def hand_made_teachers() -> list[TeacherPredictions]:
    """Three teachers: all know person, t0/t1 know car, t2 alone knows dog (so N = 3, 2, 1)."""
    p1, p2, p3 = [0, 0, 50, 100], [200, 0, 50, 100], [400, 0, 50, 100]
    c1, d1 = [0, 300, 80, 40], [300, 300, 40, 40]
    nudge = lambda box, dx: [box[0] + dx, box[1], box[2], box[3]]  # noqa: E731 - IoU stays > 0.8
    return [
        teacher("t0", [PERSON, CAR], [det(1, PERSON, p1, 0.9), det(1, PERSON, p2, 0.8), det(1, PERSON, p3, 0.7),
                                      det(1, PERSON, nudge(p3, 2), 0.6), det(1, CAR, c1, 0.9)]),
        teacher("t1", [PERSON, CAR], [det(1, PERSON, nudge(p1, 2), 0.85), det(1, PERSON, nudge(p2, 2), 0.75)]),
        teacher("t2", [PERSON, DOG], [det(1, PERSON, nudge(p1, 4), 0.8), det(1, DOG, d1, 0.6)]),
    ]


def kept_objects(strategy: str) -> list[tuple[int, float]]:
    result = aggregate_detections(hand_made_teachers(), strategy=strategy, soft_nms_method="none")
    return sorted((d["category_id"], d["bbox"][0]) for d in result.detections)


def test_strategies_on_a_hand_made_case():
    # person p1: K=3/N=3; p2: K=2/N=3; p3: K=1/N=3 (two boxes, one teacher); car: K=1/N=2; dog: K=1/N=1.
    assert kept_objects("unanimous") == [(PERSON, 0), (PERSON, 2), (PERSON, 4), (DOG, 300)]
    assert kept_objects("consensus") == [(PERSON, 0), (PERSON, 2), (PERSON, 4), (PERSON, 200), (PERSON, 202),
                                         (CAR, 0), (DOG, 300)]
    assert len(kept_objects("affirmative")) == 9  # every box of every group
    stats = aggregate_detections(hand_made_teachers(), strategy="consensus").stats
    assert (stats["groups"], stats["groups_kept"]) == (5, 4)


def test_n_ij_counts_only_teachers_that_know_the_class():
    # The dog is detected by its only teacher: kept even by "unanimous" although 3 teachers exist;
    # the car, seen by one of its two teachers, is kept by "consensus" (1 >= 2/2) and not "unanimous".
    unanimous = {d["category_id"] for d in aggregate_detections(hand_made_teachers(), strategy="unanimous").detections}
    consensus = {d["category_id"] for d in aggregate_detections(hand_made_teachers(), strategy="consensus").detections}
    assert DOG in unanimous and CAR not in unanimous
    assert CAR in consensus
    # Adding a third teacher that knows cars but saw none makes N=3, and one vote no longer suffices.
    teachers = hand_made_teachers() + [teacher("t3", [CAR], [])]
    consensus = {d["category_id"] for d in aggregate_detections(teachers, strategy="consensus").detections}
    assert CAR not in consensus


# ------------------------------------------------------------------------------ Soft-NMS

BOXES = np.array([[0, 0, 10, 10], [0, 0, 10, 8], [5, 0, 10, 10]], dtype=float)  # IoU: AB .8, AC 1/3, BC 2/7
SCORES = np.array([0.9, 0.8, 0.7])


def test_soft_nms_linear_matches_hand_computation():
    kept, scores = soft_nms(BOXES, SCORES, "linear", iou_threshold=0.5)
    # A kept; B (IoU .8 > .5) decays to .8 * (1 - .8); C (IoU 1/3) untouched, then C vs B (2/7) untouched.
    assert kept.tolist() == [0, 2, 1]
    np.testing.assert_allclose(scores, [0.9, 0.7, 0.8 * 0.2])


def test_soft_nms_linear_decays_at_the_threshold_itself():
    # Bodla et al.: s_i(1 - IoU) when IoU >= N_t. Two boxes at IoU exactly 0.5.
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5]], dtype=np.float64)
    kept, scores = soft_nms(boxes, np.array([0.9, 0.8]), "linear", iou_threshold=0.5)
    assert kept.tolist() == [0, 1] and scores.tolist() == pytest.approx([0.9, 0.4])


def test_soft_nms_gaussian_matches_hand_computation():
    kept, scores = soft_nms(BOXES, SCORES, "gaussian", sigma=0.5)
    c = 0.7 * math.exp(-(1 / 3) ** 2 / 0.5)
    b = 0.8 * math.exp(-(0.8**2) / 0.5) * math.exp(-(2 / 7) ** 2 / 0.5)
    assert kept.tolist() == [0, 2, 1]
    np.testing.assert_allclose(scores, [0.9, c, b])


def test_soft_nms_drops_scores_below_threshold_and_none_keeps_all():
    kept, _ = soft_nms(BOXES, SCORES, "linear", iou_threshold=0.5, score_threshold=0.2)
    assert kept.tolist() == [0, 2]  # B fell to 0.16
    kept, scores = soft_nms(BOXES, SCORES, "none")
    assert kept.tolist() == [0, 1, 2] and scores.tolist() == SCORES.tolist()


# ------------------------------------------------------------------------------ I/O and evaluation


def write(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def teacher_files(tmp_path: Path) -> tuple[list[str], list[str]]:
    dets, cats = [], []
    for t in hand_made_teachers():
        dets.append(write(tmp_path / f"{t.source}.json", t.detections))
        cats.append(write(tmp_path / f"{t.source}_cats.json", {"categories": [{"id": i, "name": n} for i, n in t.categories.items()]}))
    return dets, cats


def test_coco_round_trip(tmp_path):
    dets, cats = teacher_files(tmp_path)
    loaded = load_teachers(dets, cats)
    assert [t.detections for t in loaded] == [t.detections for t in hand_made_teachers()]
    result = aggregate_detections(loaded)
    write_json_atomic(tmp_path / "out.json", to_annotations_file(result))
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["categories"] == [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}, {"id": 3, "name": "dog"}]
    assert written["images"] == [{"id": 1}]
    assert [a["bbox"] for a in written["annotations"]] == [d["bbox"] for d in result.detections]
    assert [a["id"] for a in written["annotations"]] == list(range(1, len(result.detections) + 1))
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed, not left behind


def test_map_of_perfect_prediction_is_one_and_teacher_noise_lowers_it():
    gt = make_scenes(20, seed=3)
    perfect = [det(a["image_id"], a["category_id"], a["bbox"], 1.0) for a in gt["annotations"]]
    scores = evaluate_map(gt, perfect)
    assert scores["map"] == pytest.approx(1.0) and scores["map50"] == pytest.approx(1.0)
    assert scores["precision50"] == 1.0 and scores["recall50"] == 1.0
    noisy = evaluate_map(gt, simulate_teacher(gt, [1, 2, 3, 4, 5, 6], seed=1))
    assert 0.2 < noisy["map"] < 0.95


def test_precision_and_recall_count_every_label_not_cocos_top_100():
    # COCOeval keeps the top 100 detections per image and category for its mAP; the pseudo-label
    # set's precision counts all of them (one hit among 150 labels, not among 100).
    gt = {"images": [{"id": 1, "width": 1000, "height": 1000}], "categories": [{"id": 1, "name": "person"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100,
                           "iscrowd": 0}]}
    labels = [det(1, 1, [0, 0, 10, 10], 0.9)] + [det(1, 1, [20 + 5 * k, 500, 4, 4], 0.5) for k in range(149)]
    scores = evaluate_map(gt, labels)
    assert scores["precision50"] == pytest.approx(1 / 150) and scores["recall50"] == 1.0
    assert scores["map50"] == pytest.approx(1.0)  # the hit ranks first: COCO's own figure is unchanged


def test_scenes_and_teachers_are_deterministic_and_respect_known_categories():
    gt = make_scenes(10, seed=7)
    assert gt == make_scenes(10, seed=7) and gt != make_scenes(10, seed=8)
    assert all(a["bbox"][2] > 0 and a["bbox"][3] > 0 for a in gt["annotations"])
    t = simulate_teacher(gt, [1, 2], seed=0)
    assert t == simulate_teacher(gt, [1, 2], seed=0) and t != simulate_teacher(gt, [1, 2], seed=1)
    assert {d["category_id"] for d in t} <= {1, 2}
    exact = simulate_teacher(gt, [1, 2, 3, 4, 5, 6], seed=0, jitter=0, miss_rate=0, false_positive_rate=0)
    np.testing.assert_allclose(sorted(d["bbox"] for d in exact), sorted(a["bbox"] for a in gt["annotations"]))


# ------------------------------------------------------------------------------ CLI


def test_cli_success_with_ground_truth_and_report(tmp_path):
    gt = make_scenes(15, seed=0)
    subsets = [[1, 2, 3, 4], [1, 2, 5, 6], [1, 3, 4, 5]]
    args = []
    for i, known in enumerate(subsets):
        args.append(write(tmp_path / f"d{i}.json", simulate_teacher(gt, known, seed=i)))
    for i, known in enumerate(subsets):
        args += ["--categories", write(tmp_path / f"c{i}.json", [c for c in gt["categories"] if c["id"] in known])]
    gt_path = write(tmp_path / "gt.json", gt)
    out, report = tmp_path / "pseudo.json", tmp_path / "report.json"
    result = CliRunner().invoke(aggregate_command, args + ["--strategy", "consensus", "-o", str(out),
                                                           "--ground-truth", gt_path, "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "mAP@[.5:.95]" in result.output
    labels = json.loads(out.read_text())
    stored = json.loads(report.read_text())
    assert len(labels) == stored["stats"]["output_detections"] > 0
    assert 0.3 < stored["evaluation"]["map"] <= stored["evaluation"]["map50"] <= 1.0

    # Perfect teacher through the CLI -> mAP 1.0; --format annotations writes a trainable COCO file.
    perfect = [det(a["image_id"], a["category_id"], a["bbox"], 1.0) for a in gt["annotations"]]
    p = write(tmp_path / "perfect.json", perfect)
    images = write(tmp_path / "images.json", {"images": gt["images"]})
    result = CliRunner().invoke(aggregate_command, [p, "--categories", gt_path, "--ground-truth", gt_path, "-o", str(out),
                                                    "--force", "--format", "annotations", "--images", images,
                                                    "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["evaluation"]["map"] == pytest.approx(1.0)
    written = json.loads(out.read_text())
    assert written["images"] == gt["images"] and len(written["annotations"]) == len(gt["annotations"])


def run_failing(args: list[str], *, verbose: bool = False):
    result = CliRunner().invoke(aggregate_command, args + (["-v"] if verbose else []))
    assert result.exit_code == 1, result.output
    return result


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("unknown_category", ["t0.json", "category_id 9", "t0_cats.json"]),
        ("negative_box", ["t0.json", "negative-area bbox"]),
        ("zero_area_box", ["t0.json", "zero or negative-area"]),
        ("malformed_json", ["t0.json", "not valid JSON"]),
        ("count_mismatch", ["3 detection file(s) but 2 --categories"]),
        ("duplicate_category_ids", ["t1_cats.json", "duplicate category id 1"]),
        ("conflicting_names", ["category id 1", "t0.json", "t2.json"]),
        ("output_exists", ["pseudo.json", "--force"]),
        ("huge_box", ["t0.json", "too large for 64-bit floats"]),
        ("output_is_an_input", ["would overwrite the input", "t0.json"]),
    ],
)
def test_cli_bad_input_is_one_line_error_and_writes_nothing(tmp_path, case, fragments):
    dets, cats = teacher_files(tmp_path)
    out = tmp_path / "pseudo.json"
    first = json.loads(Path(dets[0]).read_text())
    if case == "unknown_category":
        write(Path(dets[0]), first + [det(1, 9, [0, 0, 5, 5], 0.5)])
    elif case == "negative_box":
        write(Path(dets[0]), first + [det(1, PERSON, [0, 0, -5, 5], 0.5)])
    elif case == "zero_area_box":
        write(Path(dets[0]), first + [det(1, PERSON, [0, 0, 5, 0], 0.5)])
    elif case == "malformed_json":
        Path(dets[0]).write_text('[{"image_id": 1,')
    elif case == "count_mismatch":
        cats = cats[:2]
    elif case == "duplicate_category_ids":
        write(Path(cats[1]), [{"id": 1, "name": "person"}, {"id": 1, "name": "car"}])
    elif case == "conflicting_names":
        write(Path(cats[2]), [{"id": 1, "name": "pedestrian"}, {"id": 3, "name": "dog"}])
    elif case == "output_exists":
        out.write_text("keep me")
    elif case == "huge_box":
        write(Path(dets[0]), first + [det(1, PERSON, [1e308, 0, 1e308, 5], 0.5)])
    elif case == "output_is_an_input":
        out = Path(dets[0])
    args = dets + [a for c in cats for a in ("--categories", c)] + ["-o", str(out)]
    result = run_failing(args + (["--force"] if case == "output_is_an_input" else []))
    assert_one_line_error(result, *fragments)
    if case == "output_exists":
        assert out.read_text() == "keep me"
    elif case == "output_is_an_input":
        assert json.loads(out.read_text()) == first
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("option, value", [("--score-threshold", "nan"), ("--score-threshold", "2"),
                                           ("--sigma", "nan"), ("--iou", "inf")])
def test_cli_refuses_numbers_out_of_range_or_not_finite(tmp_path, option, value):
    dets, cats = teacher_files(tmp_path)
    args = dets + [a for c in cats for a in ("--categories", c)] + ["-o", str(tmp_path / "out.json"), option, value]
    result = CliRunner().invoke(aggregate_command, args)
    assert result.exit_code == 2 and option in result.output, result.output
    assert not (tmp_path / "out.json").exists()


def test_bad_input_raises_neuralmerge_error_from_the_library(tmp_path):
    dets, cats = teacher_files(tmp_path)
    write(Path(cats[0]), [{"id": 1, "name": "person"}, {"id": 1, "name": "car"}])
    with pytest.raises(NeuralMergeError, match="duplicate category id 1"):
        load_teachers(dets, cats)
    with pytest.raises(DetectionInputError, match="not in the image list"):
        aggregate_detections(hand_made_teachers(), image_ids=[2, 3])


def test_verbose_error_shows_traceback(tmp_path):
    dets, cats = teacher_files(tmp_path)
    result = run_failing(dets + ["--categories", cats[0], "-o", str(tmp_path / "x.json")], verbose=True)
    # -v lets the error propagate with its traceback (the project-wide convention, neuralmerge.cli_support)
    assert isinstance(result.exception, DetectionInputError) and result.exc_info[2] is not None
