"""Composition: train one student from black-box teachers' predictions on unlabeled data.

``compose(teachers, classes, unlabeled, ...)`` is the whole classification pipeline (teacher
inference → filtering → aggregation / UHC soft labels → student training → ONNX export); the
pieces live in ``teachers``, ``labels`` and ``student``, multi-label (sigmoid) teachers in
``multilabel`` and AKA's feature transfer bridges in ``transfer``. Detection pseudo-label aggregation is in
``detection``. This module stays light (the CLI imports it): heavy imports happen on first call.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from neuralmerge.errors import NeuralMergeError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


class CompositionError(NeuralMergeError):
    """Bad composition input: class lists, teachers, unlabeled or labeled data, or settings."""


@dataclass
class CompositionResult:
    """What :func:`compose` produced: the trained student and everything worth reporting."""

    model: Any                     # the trained torch module
    classes: list[str]             # output k of the student is classes[k]
    report: dict[str, Any]         # settings, label statistics, training history (JSON-ready)


def _check_inputs(teachers: Sequence[Any], classes: Sequence[Sequence[str]], unlabeled: Any,
                  teacher_inputs: Sequence[Any]) -> tuple[list[str], list[Any], tuple[int, ...]]:
    """Validate what can be checked before running anything; return (union, supports, the student's input shape)."""
    import numpy as np

    from neuralmerge.compose.labels import union_classes

    if not teachers:
        raise CompositionError("no teachers given")
    if len(classes) != len(teachers):
        raise CompositionError(f"got {len(teachers)} teachers but {len(classes)} class lists")
    for names, teacher in zip(classes, teachers):
        if not names:
            raise CompositionError(f"the class list of teacher {teacher.name} is empty")
        if teacher.output_width is not None and teacher.output_width != len(names):
            raise CompositionError(f"teacher {teacher.name} outputs {teacher.output_width} logits but its class "
                                   f"list has {len(names)} names")
    union, supports = union_classes(classes)
    if len(teacher_inputs) != len(teachers):
        raise CompositionError(f"got {len(teachers)} teachers but {len(teacher_inputs)} teacher inputs")
    for x, who in [(unlabeled, None), *((xi, t) for xi, t in zip(teacher_inputs, teachers) if xi is not unlabeled)]:
        what = "the unlabeled data" if who is None else f"the input of teacher {who.name}"
        if not isinstance(x, np.ndarray) or x.ndim < 2:
            raise CompositionError(f"{what} must be an array of shape (N, ...) with one sample per row")
        if len(x) == 0:
            raise CompositionError("the unlabeled set is empty")
        if len(x) != len(unlabeled):
            raise CompositionError(f"{what} has {len(x)} samples, the unlabeled data {len(unlabeled)}")
        if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
            raise CompositionError(f"{what} must be finite numbers")
    for teacher, x in zip(teachers, teacher_inputs):
        if teacher.input_shape is not None and teacher.input_shape != tuple(x.shape[1:]):
            raise CompositionError(f"teacher {teacher.name} takes inputs {list(teacher.input_shape)} but the "
                                   f"unlabeled samples are {list(x.shape[1:])}")
    return union, supports, tuple(unlabeled.shape[1:])


def _label_indices(y: Any, union: list[str]) -> Any:
    """Labels as union indices: integers already are, class names are looked up."""
    import numpy as np

    y = np.asarray(y)
    if y.dtype.kind in "US":
        lookup = {name: k for k, name in enumerate(union)}
        unknown = sorted({str(v) for v in y if str(v) not in lookup})
        if unknown:
            raise CompositionError(f"labeled data uses classes no teacher knows: {', '.join(unknown[:5])}")
        return np.array([lookup[str(v)] for v in y], dtype=np.int64)
    if y.dtype.kind not in "iu" or (len(y) and (y.min() < 0 or y.max() >= len(union))):
        raise CompositionError(f"labeled y must be class names or indices in 0..{len(union) - 1}")
    return y.astype(np.int64)


def _check_multi_label(multi_label: Sequence[int], count: int, method: str | None, tasks: Sequence[str] | None,
                       backprop: bool, balance: bool, labeled: Any) -> str:
    """Validate the multi-label settings; return the method to use (``sd`` for multi-label teachers)."""
    indices = sorted({int(i) for i in multi_label})
    if any(not 0 <= i < count for i in indices):
        raise CompositionError(f"--multi-label takes teacher positions 0..{count - 1}, got {list(multi_label)}")
    if not indices:
        if tasks is not None:
            raise CompositionError("--tasks selects attributes of --multi-label teachers; no teacher is multi-label")
        return method or "ce"
    if len(indices) != count:
        single = next(i for i in range(count) if i not in indices)
        raise CompositionError(f"teacher {single} is single-label (softmax) but teachers {indices} are multi-label; "
                               f"they cannot be mixed")
    if method not in (None, "sd"):
        raise CompositionError(f"multi-label teachers are averaged per task (--method sd); --method {method} is for "
                               f"softmax teachers")
    if backprop or balance:
        raise CompositionError(f"--{'backprop' if backprop else 'balance'} applies to softmax teachers, not "
                               f"multi-label ones")
    if labeled is not None:
        raise CompositionError("--labeled fine-tuning takes single-label classes; not with multi-label teachers")
    return "sd"


def compose(teachers: Sequence[Any], classes: Sequence[Sequence[str]], unlabeled: "np.ndarray", *,
            method: str | None = None, strategy: str = "consensus", tau: float | None = None,
            temperature: float = 1.0, balance: bool = False, select: str = "none", backprop: bool = False,
            hard: bool = False, multi_label: Sequence[int] = (), tasks: Sequence[str] | None = None,
            feature_transfer: bool = False, transfer_weight: float = 0.1,
            transfer_pairs: Sequence[tuple[int, str, str]] | None = None, student: str = "lenet", epochs: int = 10,
            batch_size: int = 64, lr: float = 1e-3, val_fraction: float = 0.1,
            labeled: tuple[Any, Any] | None = None, finetune_epochs: int = 5, finetune_lr: float = 1e-4,
            output: str | os.PathLike | None = None, force: bool = False,
            cache_dir: str | os.PathLike | None = None, teacher_batch_size: int = 256, seed: int = 0,
            progress: bool = True, teacher_inputs: "Sequence[np.ndarray] | None" = None) -> CompositionResult:
    """Model Composition's Algorithm 1 for classifiers: one student for the union of the teachers' classes.

    ``teachers``: ONNX paths, :class:`teachers.Teacher` objects or callables (float32 batch →
    logits). ``classes``: each teacher's class names, in output order. ``unlabeled``: the student's
    inputs (N, ...); ``teacher_inputs``: one array per teacher with the same N samples prepared for
    it (default: every teacher takes ``unlabeled``; :func:`inputs.pool_inputs` prepares them from a
    pool and a config). Teachers run once per (teacher, data) and are cached in ``cache_dir`` if given.
    Labels come from :func:`labels.make_pseudo_labels` (``method`` default ``ce``, ``strategy``,
    ``tau``, ``temperature``, ``balance``, ``select``); the student is trained by
    :func:`student.train_student` (with the UHC loss of ``method`` when ``backprop``), then
    fine-tuned on ``labeled`` = (x, y) if given, and written to ``output`` (ONNX with the
    ``neuralmerge.classes`` metadata) if given. Nothing is written when any step fails.

    ``multi_label``: positions of teachers whose outputs are independent sigmoids (all teachers
    or none); their class names are task names, ``tasks`` selects what the student learns
    (default all) and targets come from :func:`multilabel.make_task_targets`. ``feature_transfer``
    adds AKA's transfer bridges to white-box ONNX teachers (:class:`transfer.FeatureTransfer`),
    weighted by ``transfer_weight``, between blocks of equal spatial size or, with
    ``transfer_pairs``, only the (teacher position, student block, teacher tensor) pairs listed.

    Under ``torchrun`` rank 0 runs the teachers and makes the labels, which every process then gets;
    the student (and the fine-tuning) trains data-parallel, and only rank 0 writes ``output`` while the
    others wait for it.
    """
    import numpy as np

    from neuralmerge.calibrate import distributed
    from neuralmerge.compose import labels as pseudo
    from neuralmerge.compose import student as students
    from neuralmerge.compose.teachers import as_teacher, teacher_logits

    if output is not None:
        from neuralmerge.io.onnx_files import check_output_paths

        check_output_paths([output], [t for t in teachers if isinstance(t, (str, os.PathLike))], force=force)
    method = _check_multi_label(multi_label, len(teachers), method, tasks, backprop, balance, labeled)
    is_multi_label = bool(multi_label)
    if backprop and method not in pseudo.BACKPROP_METHODS:
        raise CompositionError(f"--backprop works with --method {', '.join(pseudo.BACKPROP_METHODS)}, not '{method}'")
    if backprop and balance:
        raise CompositionError("--balance weights estimated soft labels; it does not apply with --backprop")
    if feature_transfer and not 0 < transfer_weight < math.inf:  # NaN too
        raise CompositionError(f"--transfer-weight must be > 0, got {transfer_weight}")
    if transfer_pairs is not None and not feature_transfer:
        raise CompositionError("--transfer-pair needs --feature-transfer")
    teacher_list = [as_teacher(t, i) for i, t in enumerate(teachers)]
    teacher_inputs = [unlabeled] * len(teacher_list) if teacher_inputs is None else list(teacher_inputs)
    union, supports, input_shape = _check_inputs(teacher_list, classes, unlabeled, teacher_inputs)
    if feature_transfer and any(xi is not unlabeled and not np.array_equal(xi, unlabeled) for xi in teacher_inputs):
        raise CompositionError("--feature-transfer runs the teachers on the student's input; it needs teachers that "
                               "take the same input as the student")
    if is_multi_label:
        from neuralmerge.compose.multilabel import resolve_tasks

        union = resolve_tasks(classes, tasks)
    imported = []
    if feature_transfer:
        from neuralmerge.compose.transfer import import_teacher

        imported = [import_teacher(t) for t in teacher_list]
    labeled_x = labeled_y = None
    if labeled is not None:
        labeled_x = np.asarray(labeled[0], dtype=np.float32)
        labeled_y = _label_indices(labeled[1], union)
        if labeled_x.shape[1:] != input_shape or len(labeled_x) != len(labeled_y) or not len(labeled_x):
            raise CompositionError(f"labeled data must be x {['N', *input_shape]} with one label per sample, got "
                                   f"x {list(labeled_x.shape)} and {len(labeled_y)} labels")
        if not np.isfinite(labeled_x).all():
            raise CompositionError("labeled x must be finite numbers")
    model = students.build_student(student, union, input_shape, seed)
    bridges = None
    if feature_transfer:  # pair blocks now, so a teacher that pairs with nothing fails before the teachers run
        from neuralmerge.compose.transfer import FeatureTransfer

        bridges = FeatureTransfer(model.model, model.template, teacher_list, imported, input_shape, transfer_weight,
                                  explicit=transfer_pairs)

    x = np.ascontiguousarray(unlabeled, dtype=np.float32)
    teacher_x = [x if xi is unlabeled else np.ascontiguousarray(xi, dtype=np.float32) for xi in teacher_inputs]

    def label() -> tuple[list[bool], Any, Any]:
        """(cache hits, labels, feature owners): teachers run once, by one process (they may write the cache)."""
        logits, cached = teacher_logits(teacher_list, teacher_x, batch_size=teacher_batch_size, cache_dir=cache_dir,
                                        progress=progress)
        for teacher, names, z in zip(teacher_list, classes, logits):
            if z.shape[1] != len(names):
                raise CompositionError(f"teacher {teacher.name} outputs {z.shape[1]} logits but its class list has "
                                       f"{len(names)} names")
        if is_multi_label:
            from neuralmerge.compose.multilabel import make_task_targets

            targets = make_task_targets(logits, classes, union, tau=tau, temperature=temperature, select=select)
            return cached, targets, targets.owner
        soft = pseudo.make_pseudo_labels(logits, supports, len(union), method=method, strategy=strategy, tau=tau,
                                         temperature=temperature, balance=balance, select=select)
        # the features of each sample come from its least-entropy teacher among those knowing its class (AKA §3.3)
        return cached, soft, pseudo.select_least_entropy(soft.outputs, soft.active, soft.soft)[1]

    group = distributed.current()
    cached, labels, owners = group.run_on_main(label)
    try:
        if bridges is not None:
            bridges.set_owners(owners)
        training = students.train_student(model.model, x[labels.keep], labels, epochs=epochs,
                                          batch_size=batch_size, lr=lr, hard=hard,
                                          backprop=method if backprop else None, val_fraction=val_fraction,
                                          seed=seed, progress=progress, transfer=bridges, group=group)
    finally:
        if bridges is not None:
            bridges.close()
    report: dict[str, Any] = {
        "teachers": [{"name": t.name, "classes": list(c), "cached": hit}
                     for t, c, hit in zip(teacher_list, classes, cached)],
        "classes": union,
        "settings": {"method": method, "strategy": strategy if method == "vote" else None, "tau": tau,
                     "temperature": temperature, "balance": balance, "select": select, "backprop": backprop,
                     "hard": hard, "multi_label": is_multi_label, "feature_transfer": feature_transfer,
                     "transfer_weight": transfer_weight if feature_transfer else None, "student": student,
                     "epochs": epochs, "batch_size": batch_size, "lr": lr, "val_fraction": val_fraction,
                     "seed": seed},
        "inputs": {"student": list(input_shape), "teachers": [list(xi.shape[1:]) for xi in teacher_x]},
        "labels": labels.stats,
        "training": training,
    }
    if bridges is not None:
        report["feature_transfer"] = bridges.describe()
    if labeled_x is not None:
        report["finetune"] = students.finetune(model.model, labeled_x, labeled_y, epochs=finetune_epochs,
                                               lr=finetune_lr, seed=seed, progress=progress, group=group)
    if output is not None:
        report["output"] = str(output)
        try:
            if group.is_main:
                report["output_bytes"] = students.export_student(model, output, union, input_shape, force=force,
                                                                 multi_label=is_multi_label)
        finally:
            group.barrier()
    return CompositionResult(model.model, union, report)


__all__ = ["CompositionError", "CompositionResult", "compose"]
