"""``neuralmerge compose``: black-box classifiers + unlabeled data → one student ONNX for all their classes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from neuralmerge.compose import CompositionError
from neuralmerge.cli_support import POSITIVE, SEED, user_errors

_METHODS = ("vote", "sd", "ce", "mf-p", "mf-lu", "mf-lf")  # = labels.METHODS, kept here so --help stays light
_STRATEGIES = ("unanimous", "consensus", "affirmative")


def read_class_file(path: str) -> list[str]:
    """Class names, one per line, in output order; trailing blank lines are ignored, inner ones are an error."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CompositionError(f"{path}: cannot read class list ({exc.__class__.__name__})") from None
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise CompositionError(f"{path}: the class list is empty")
    if "" in names:
        raise CompositionError(f"{path}: line {names.index('') + 1} is blank")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CompositionError(f"{path}: class '{duplicates[0]}' is listed twice")
    return names


@click.argument("teachers", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--classes", "class_files", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="A teacher's class names, one per line in output order; once per teacher, same order.")
@click.option("--unlabeled", required=True, type=click.Path(),
              help="Unlabeled inputs: .npy, .npz with key x, or a folder of images; prepared for each teacher and "
                   "the student as --config says (default: as they are, or images at the teachers' input size).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML: preprocess (one mapping for all teachers, or one per teacher) and student, each with "
                   "resize, channels, scale, mean, std.")
@click.option("--student", default="lenet", show_default=True,
              help="lenet, resnet, mobilenet, or an ONNX file whose weights start the student (final Gemm resized).")
@click.option("--method", type=click.Choice(_METHODS), default=None,
              help="How teachers' outputs become soft labels: vote, or the UHC estimators sd/ce/mf-p/mf-lu/mf-lf "
                   "[default: ce; sd, the only choice, for --multi-label teachers].")
@click.option("--strategy", type=click.Choice(_STRATEGIES), default="consensus", show_default=True,
              help="--method vote: keep a sample when all / at least half / any of the teachers knowing its class agree.")
@click.option("--tau", type=float, default=None,
              help="Entropy filter: ignore a teacher's prediction whose normalised entropy (0..1) exceeds this.")
@click.option("--temperature", type=POSITIVE, default=1.0, show_default=True, help="Softmax temperature of teacher logits.")
@click.option("--balance", is_flag=True, help="Weight classes by the inverse mean soft label (UHC's BS).")
@click.option("--select", type=click.Choice(["none", "least-entropy"]), default="none", show_default=True,
              help="least-entropy: learn each sample from the most certain teacher that knows its class.")
@click.option("--multi-label", "multi_label", type=int, multiple=True, metavar="POSITION",
              help="Teacher at this 0-based position (in TEACHERS order) outputs independent sigmoid logits, one "
                   "per task name in its --classes file; repeat for each (all teachers or none).")
@click.option("--tasks", help="Comma-separated task names the multi-label student learns [default: all].")
@click.option("--feature-transfer", is_flag=True,
              help="Also learn the teachers' block features through 1x1 transfer bridges (AKA); ONNX teachers are "
                   "imported as white boxes, blocks paired by spatial size.")
@click.option("--transfer-weight", type=POSITIVE, default=0.1, show_default=True,
              help="Weight of the feature-transfer loss (bridge MSE + weight-norm regulariser).")
@click.option("--transfer-pair", "transfer_pairs", multiple=True, metavar="POSITION:STUDENT=TEACHER",
              help="Pair these blocks instead of pairing by spatial size: teacher position, student block name, "
                   "teacher tensor name (as the report's feature_transfer lists them); repeatable.")
@click.option("--backprop", is_flag=True, help="Train through the UHC loss of --method directly (the -BP variants).")
@click.option("--hard", is_flag=True, help="Train with cross-entropy to the labels' argmax instead of KL to soft labels.")
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--lr", type=POSITIVE, default=1e-3, show_default=True)
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Held-out share of the pseudo-labelled samples used to pick the best epoch.")
@click.option("--labeled", type=click.Path(dir_okay=False),
              help=".npz with x and y (class names or indices into the output class list): fine-tune afterwards.")
@click.option("--finetune-epochs", type=click.IntRange(1), default=5, show_default=True)
@click.option("--finetune-lr", type=POSITIVE, default=1e-4, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Where teacher outputs are cached [default: $XDG_CACHE_HOME/neuralmerge/teachers].")
@click.option("--no-cache", is_flag=True, help="Always run the teachers; store nothing.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True, help="torch / onnxruntime threads (0 = their default).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Student ONNX file to write.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write settings, label stats and training history as JSON.")
@click.option("--force", is_flag=True, help="Overwrite existing output/report files.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@user_errors
def _compose(teachers: tuple[str, ...], class_files: tuple[str, ...], unlabeled: str, verbose: bool, **options: Any
             ) -> None:
    """Compose black-box classifiers (TEACHERS, ONNX files) into one student for the union of their classes.

    Model Composition (BMVC 2021) Algorithm 1 with UHC (CVPR 2019) soft labels: run the teachers on
    the unlabeled data, filter by entropy, aggregate, train the student, optionally fine-tune on a
    few labels, and write it as ONNX with its class names in the metadata key neuralmerge.classes.
    """
    _run(teachers, class_files, unlabeled, verbose=verbose, **options)


def _run(teacher_paths: tuple[str, ...], class_files: tuple[str, ...], unlabeled: str, *, config_path: str | None,
         student: str,
         method: str | None, strategy: str, tau: float | None, temperature: float, balance: bool, select: str,
         multi_label: tuple[int, ...], tasks: str | None, feature_transfer: bool, transfer_weight: float,
         transfer_pairs: tuple[str, ...],
         backprop: bool, hard: bool,
         epochs: int, batch_size: int, lr: float, val_fraction: float, labeled: str | None, finetune_epochs: int,
         finetune_lr: float, cache_dir: str | None, no_cache: bool, threads: int, seed: int, output: str,
         report_path: str | None, force: bool, quiet: bool, verbose: bool) -> None:
    # Check every input before the slow parts, and write nothing until everything has succeeded.
    from neuralmerge.io.onnx_files import check_output_paths, write_bytes_atomic

    check_output_paths([output, report_path], [*teacher_paths, *class_files, unlabeled, labeled, config_path],
                       force=force)
    if len(class_files) != len(teacher_paths):
        raise CompositionError(f"got {len(teacher_paths)} teachers but {len(class_files)} --classes files")
    classes = [read_class_file(path) for path in class_files]
    from neuralmerge.compose.inputs import load_pool, pool_inputs, read_array_file, read_input_config

    config = read_input_config(config_path)
    pool = load_pool(unlabeled)
    labeled_data = None
    if labeled:
        arrays = read_array_file(labeled, ("x", "y"))
        labeled_data = (arrays["x"], arrays["y"])

    from neuralmerge.compose.transfer import parse_transfer_pair

    pairs = [parse_transfer_pair(text) for text in transfer_pairs] or None

    import torch

    from neuralmerge.calibrate import distributed
    from neuralmerge.compose import compose
    from neuralmerge.compose.teachers import default_cache_dir, onnx_teacher

    if threads > 0:
        torch.set_num_threads(threads)
    teachers = [onnx_teacher(path, threads=threads) for path in teacher_paths]
    for teacher, names, path in zip(teachers, classes, class_files):
        if teacher.output_width is not None and teacher.output_width != len(names):
            raise CompositionError(f"{path} has {len(names)} class names but {teacher.name} outputs "
                                   f"{teacher.output_width} logits")
    x, teacher_x = pool_inputs(pool, teachers, config)
    result = compose(
        teachers, classes, x, teacher_inputs=teacher_x, method=method, strategy=strategy, tau=tau, temperature=temperature, balance=balance,
        select=select, multi_label=multi_label, tasks=tasks.split(",") if tasks is not None else None,
        feature_transfer=feature_transfer, transfer_weight=transfer_weight,
        transfer_pairs=pairs, backprop=backprop, hard=hard,
        student=student, epochs=epochs, batch_size=batch_size, lr=lr,
        val_fraction=val_fraction, labeled=labeled_data, finetune_epochs=finetune_epochs, finetune_lr=finetune_lr,
        output=output, force=force, cache_dir=None if no_cache else (cache_dir or default_cache_dir()),
        seed=seed, progress=not quiet,
    )
    if not distributed.current().is_main:  # under torchrun rank 0 reports; the model is written already
        return
    report = result.report
    report["unlabeled"] = str(unlabeled)
    if config_path:
        report["config"] = str(config_path)
    for entry, path in zip(report["teachers"], class_files):
        entry["class_file"] = str(path)
    if report_path:
        write_bytes_atomic(json.dumps(report, indent=1).encode(), report_path, force=True)
    if quiet:
        return
    stats, training = report["labels"], report["training"]
    cached = sum(t["cached"] for t in report["teachers"])
    method = report["settings"]["method"]
    kind = "multi-label tasks" if multi_label else "classes"
    click.echo(f"{len(teachers)} teachers ({cached} from cache), {len(result.classes)} {kind}; "
               f"{stats['samples']} unlabeled samples -> {stats['after_entropy_filter']} after --tau -> "
               f"{stats['kept']} pseudo-labelled ({method}{'-bp' if backprop else ''}{', balanced' if balance else ''})")
    if feature_transfer:
        click.echo(f"feature transfer: {len(report['feature_transfer'])} block pairs "
                   f"({', '.join(p['student_block'] + '->' + p['teacher_block'] for p in report['feature_transfer'])})")
    if verbose:
        for record in training["history"]:
            click.echo(f"  epoch {record['epoch']}: loss {record['loss']:.4f}"
                       + (f", transfer {record['transfer_loss']:.4f}" if "transfer_loss" in record else "")
                       + (f", held-out agreement {record['val_agreement']:.4f}" if "val_agreement" in record else ""))
    agreement = training["best_val_agreement"]
    click.echo(f"student {student}: best epoch {training['best_epoch']}/{epochs}"
               + (f", held-out agreement with pseudo-labels {agreement:.4f}" if agreement is not None else ""))
    if "finetune" in report:
        click.echo(f"fine-tuned on {report['finetune']['samples']} labeled samples "
                   f"(train accuracy {report['finetune']['train_accuracy']:.4f})")
    click.echo(f"wrote {output}" + (f" and {report_path}" if report_path else ""))


compose_cmd = click.command("compose")(_compose)
