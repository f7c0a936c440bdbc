"""``neuralmerge aggregate-detections``: teachers' COCO results -> one set of detection pseudo-labels."""
from __future__ import annotations

import click

from neuralmerge.compose.detection import (
    SOFT_NMS_METHODS,
    STRATEGIES,
    aggregate_detections as run_aggregation,
    evaluate_map,
    load_ground_truth,
    load_images,
    load_teachers,
    to_annotations_file,
    write_json_atomic,
)
from neuralmerge.cli_support import POSITIVE, FiniteFloat, user_errors
from neuralmerge.io.onnx_files import check_output_paths


@click.argument("detections", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--categories", "categories", multiple=True, type=click.Path(dir_okay=False),
              help="Categories one teacher knows (list of {id, name} or a COCO file); once per detection file, same order.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="consensus", show_default=True,
              help="Keep a group when all (unanimous), at least half (consensus) or any (affirmative) of the teachers that know its class detected it.")
@click.option("--iou", "iou_threshold", type=FiniteFloat(0.0, 1.0, max_open=True), default=0.5, show_default=True,
              help="Boxes of one category with IoU above this are the same object; also the linear Soft-NMS threshold.")
@click.option("--soft-nms", "soft_nms_method", type=click.Choice(SOFT_NMS_METHODS), default="gaussian", show_default=True,
              help="Soft-NMS applied inside each kept group.")
@click.option("--sigma", type=POSITIVE, default=0.5, show_default=True, help="Gaussian Soft-NMS sigma.")
@click.option("--score-threshold", type=FiniteFloat(0.0, 1.0), default=0.001, show_default=True,
              help="Drop teacher detections below this score, and pseudo-labels whose Soft-NMS score falls below it.")
@click.option("--images", "images_path", type=click.Path(dir_okay=False),
              help="COCO file listing the unlabeled images (default: every image id the teachers report).")
@click.option("--ground-truth", "ground_truth_path", type=click.Path(dir_okay=False),
              help="COCO annotations to score the pseudo-labels against (mAP@[.5:.95] and mAP@.5).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Pseudo-label JSON to write.")
@click.option("--format", "output_format", type=click.Choice(["results", "annotations"]), default="results", show_default=True,
              help="COCO results list, or a COCO annotations file (images, annotations, categories) to train a detector on.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write settings, counts and mAP as JSON.")
@click.option("--force", is_flag=True, help="Overwrite existing output/report files.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@user_errors
def _aggregate_detections(
    detections: tuple[str, ...],
    categories: tuple[str, ...],
    strategy: str,
    iou_threshold: float,
    soft_nms_method: str,
    sigma: float,
    score_threshold: float,
    images_path: str | None,
    ground_truth_path: str | None,
    output: str,
    output_format: str,
    report_path: str | None,
    force: bool,
    quiet: bool,
    verbose: bool,
) -> None:
    """Aggregate several detectors' COCO results (DETECTIONS, one file per teacher) into pseudo-labels.

    Implements Model Composition's Algorithm 2: score filtering, grouping by object, voting among
    the teachers that know each class, and Soft-NMS.
    """
    _run(detections, categories, strategy, iou_threshold, soft_nms_method, sigma, score_threshold,
         images_path, ground_truth_path, output, output_format, report_path, force, quiet, verbose)


def _run(detections, categories, strategy, iou_threshold, soft_nms_method, sigma, score_threshold,
         images_path, ground_truth_path, output, output_format, report_path, force, quiet, verbose) -> None:
    # Refuse to overwrite before doing any work, and load every input before writing anything.
    check_output_paths([output, report_path], [*detections, *categories, images_path, ground_truth_path], force=force)
    teachers = load_teachers(detections, categories)
    images = load_images(images_path) if images_path else None
    ground_truth = load_ground_truth(ground_truth_path) if ground_truth_path else None

    result = run_aggregation(
        teachers,
        strategy=strategy,
        iou_threshold=iou_threshold,
        soft_nms_method=soft_nms_method,
        sigma=sigma,
        score_threshold=score_threshold,
        image_ids=[img["id"] for img in images] if images is not None else None,
        progress=not quiet,
    )
    scores = evaluate_map(ground_truth, result.detections) if ground_truth is not None else None

    payload = to_annotations_file(result, images) if output_format == "annotations" else result.detections
    write_json_atomic(output, payload)
    if report_path:
        report = {
            "teachers": [
                {"detections": t.source, "categories": c, "count": len(t.detections)}
                for t, c in zip(teachers, categories)
            ],
            "settings": {
                "strategy": strategy, "iou": iou_threshold, "soft_nms": soft_nms_method, "sigma": sigma,
                "score_threshold": score_threshold, "format": output_format,
            },
            "stats": result.stats,
            "output": str(output),
        }
        if scores is not None:
            report["evaluation"] = {"ground_truth": str(ground_truth_path), **scores}
        write_json_atomic(report_path, report)

    if quiet:
        return
    if verbose:
        for teacher in teachers:
            click.echo(f"  {teacher.source}: {len(teacher.detections)} detections, {len(teacher.categories)} categories")
    s = result.stats
    click.echo(
        f"{s['teachers']} teachers, {s['images']} images: {s['input_detections']} detections -> "
        f"{s['after_score_filter']} above score {score_threshold} -> {s['groups_kept']}/{s['groups']} object groups kept "
        f"({strategy}) -> {s['output_detections']} pseudo-labels ({soft_nms_method} Soft-NMS)"
    )
    click.echo(f"wrote {output}" + (f" and {report_path}" if report_path else ""))
    if scores is not None:
        click.echo(f"mAP@[.5:.95] {scores['map']:.4f}  mAP@.5 {scores['map50']:.4f}  "
                   f"precision@.5 {scores['precision50']:.4f}  recall@.5 {scores['recall50']:.4f}  "
                   f"({scores['images']} images of {ground_truth_path})")


aggregate_detections = click.command("aggregate-detections")(_aggregate_detections)
