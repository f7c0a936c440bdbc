"""The student: build it, train it on pseudo-labels, fine-tune it on labels, export it as ONNX.

Training (Adam, cosine decay, best checkpoint by held-out agreement with the pseudo-labels) runs
through the data-parallel loop it shares with calibration (``neuralmerge.calibrate.loop``): one
process, or several under ``torchrun`` that each train a share of every batch.
"""
from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from neuralmerge.calibrate import distributed
from neuralmerge.calibrate.loop import new_state, progress as progress_bar, run_epochs, sharded_totals, train_step
from neuralmerge.compose import CompositionError
from neuralmerge.compose.labels import BACKPROP_METHODS, PseudoLabels, uhc_loss
from neuralmerge.compose.multilabel import MULTI_LABEL_KEY, TaskTargets
from neuralmerge.compose.transfer import FeatureTransfer

STUDENTS: tuple[str, ...] = ("lenet", "resnet", "mobilenet")
CLASSES_KEY = "neuralmerge.classes"
EVAL_BATCH = 512


@dataclass
class Student:
    """A trainable student; ``template`` is the resized ONNX graph of an ONNX-initialised student."""

    model: nn.Module
    template: onnx.ModelProto | None = None


# ----------------------------------------------------------------------------------- building


def _builtin_student(name: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    from neuralmerge.zoo.architectures import LeNet, MobileNetStyle, ResNetStyle

    if len(input_shape) != 3:
        raise CompositionError(f"--student {name} takes images (C, H, W); the teachers take {list(input_shape)}")
    channels, height, width = input_shape
    if name == "lenet":
        if height != width or height % 4:
            raise CompositionError(f"--student lenet needs square images with a side divisible by 4, got {height}x{width}")
        return LeNet(num_classes, in_channels=channels, image_size=height)
    if name == "resnet":
        return ResNetStyle(num_classes, in_channels=channels)
    return MobileNetStyle(num_classes, in_channels=channels)


def _declared_classes(model: onnx.ModelProto) -> list[str] | None:
    for prop in model.metadata_props:
        if prop.key == CLASSES_KEY:
            try:
                names = json.loads(prop.value)
            except json.JSONDecodeError:
                return None
            return names if isinstance(names, list) else None
    return None


def resize_gemm_head(model: onnx.ModelProto, classes: list[str], rng: np.random.Generator) -> onnx.ModelProto:
    """A copy of ``model`` whose final Gemm has one output per class of ``classes``.

    Rows of classes the file already knows (by its ``neuralmerge.classes`` metadata) are kept; a
    head that already has the right width and no metadata is kept whole; other rows get nn.Linear's
    default uniform initialisation.
    """
    model = copy.deepcopy(model)
    graph = model.graph
    output = graph.output[0].name
    producer = next((node for node in graph.node if output in node.output), None)
    if producer is None or producer.op_type != "Gemm":
        found = producer.op_type if producer is not None else "no node"
        raise CompositionError(f"--student ONNX: the output must come straight from a Gemm (found {found})")
    initializers = {init.name: init for init in graph.initializer}
    if producer.input[1] not in initializers:
        raise CompositionError("--student ONNX: the final Gemm's weight is not a stored initializer")
    trans_b = next((a.i for a in producer.attribute if a.name == "transB"), 0)
    weight = numpy_helper.to_array(initializers[producer.input[1]])
    weight = weight if trans_b else weight.T                                   # (K_old, F)
    has_bias = len(producer.input) > 2 and producer.input[2] in initializers
    bias = numpy_helper.to_array(initializers[producer.input[2]]) if has_bias else np.zeros(len(weight), weight.dtype)
    if bias.shape != (len(weight),):
        raise CompositionError("--student ONNX: the final Gemm's bias is not one value per output")

    old_names = _declared_classes(model)
    if old_names is None and len(weight) == len(classes):
        return model
    bound = 1.0 / np.sqrt(weight.shape[1])
    new_weight = rng.uniform(-bound, bound, (len(classes), weight.shape[1])).astype(weight.dtype)
    new_bias = rng.uniform(-bound, bound, len(classes)).astype(bias.dtype)
    old_rows = {name: row for row, name in enumerate(old_names or []) if row < len(weight)}
    for row, name in enumerate(classes):
        if name in old_rows:
            new_weight[row], new_bias[row] = weight[old_rows[name]], bias[old_rows[name]]
    initializers[producer.input[1]].CopyFrom(
        numpy_helper.from_array(new_weight if trans_b else new_weight.T, producer.input[1]))
    if has_bias:
        initializers[producer.input[2]].CopyFrom(numpy_helper.from_array(new_bias, producer.input[2]))
    for info in [*graph.output, *graph.value_info]:
        if info.name == output and len(info.type.tensor_type.shape.dim) == 2:
            info.type.tensor_type.shape.dim[1].Clear()
            info.type.tensor_type.shape.dim[1].dim_value = len(classes)
    return model


def build_student(spec: str, classes: list[str], input_shape: tuple[int, ...], seed: int = 0) -> Student:
    """``lenet`` / ``resnet`` / ``mobilenet`` (from zoo.architectures), or an ONNX file whose weights start the student."""
    torch.manual_seed(seed)
    if spec in STUDENTS:
        return Student(_builtin_student(spec, len(classes), input_shape))
    if not spec.endswith(".onnx") and not Path(spec).is_file():
        raise CompositionError(f"--student must be one of {', '.join(STUDENTS)} or an ONNX file, got '{spec}'")
    from neuralmerge.graph.importer import import_onnx
    from neuralmerge.io.onnx_files import load_model

    template = resize_gemm_head(load_model(spec), classes, np.random.default_rng(seed))
    declared = template.graph.input[0].type.tensor_type.shape.dim[1:]
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in declared)
    if all(d is not None for d in dims) and dims != tuple(input_shape):
        raise CompositionError(f"--student {spec} takes inputs {list(dims)} but the teachers take {list(input_shape)}")
    return Student(import_onnx(template), template)


# ----------------------------------------------------------------------------------- training


def _split_validation(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    n_val = int(round(n * fraction)) if n >= 20 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:  # BatchNorm cannot train on a batch of one
        batches.pop()
    return batches


def _agreement_sums(scores: torch.Tensor, labels: "PseudoLabels | TaskTargets", rows: np.ndarray) -> torch.Tensor:
    """(agreeing, out of) on ``rows``: top-1 matches with the pseudo-labels, or for tasks weighted yes/no matches."""
    if isinstance(labels, TaskTargets):
        weight = torch.from_numpy(labels.weight[rows]).double()
        same = (scores > 0) == torch.from_numpy(labels.soft[rows] > 0.5)
        return torch.stack([(same * weight).sum(), weight.sum()])
    matches = scores.argmax(dim=1).numpy() == labels.soft[rows].argmax(axis=1)
    return torch.tensor([float(matches.sum()), len(rows)], dtype=torch.float64)


def _check_step(batch_size: int, lr: float, flag: str) -> None:
    if batch_size < 1:
        raise CompositionError(f"--batch-size must be >= 1, got {batch_size}")
    if not 0 < lr < math.inf:  # NaN too
        raise CompositionError(f"--{flag}lr must be a positive number, got {lr}")


def train_student(model: nn.Module, x: np.ndarray, labels: "PseudoLabels | TaskTargets", *, epochs: int = 10,
                  batch_size: int = 64, lr: float = 1e-3, hard: bool = False, backprop: str | None = None,
                  val_fraction: float = 0.1, seed: int = 0, progress: bool = True,
                  transfer: "FeatureTransfer | None" = None, group: distributed.Group | None = None) -> dict[str, Any]:
    """Train on the kept samples ``x`` (aligned with ``labels.soft``); keep the best held-out checkpoint.

    The loss is KL to the soft labels (cross-entropy up to a constant), cross-entropy to their
    argmax with ``hard``, or the UHC objective of ``backprop`` through the student's output.
    Class weights from ``labels.class_weights`` scale every class's term. For multi-label
    :class:`TaskTargets` it is binary cross-entropy per task (to the probabilities, or to them
    thresholded at ½ with ``hard``), weighted by ``labels.weight``. With ``transfer`` the student
    runs through the transfer bridges, whose loss is added and whose weights train too. A random
    ``val_fraction`` of the samples is held out; after each epoch the student's agreement with
    the pseudo-labels there picks the checkpoint that is kept. Under ``torchrun`` (``group``,
    default: the current one) every process trains its share of each batch (calibrate/loop.py).
    """
    if epochs < 1:
        raise CompositionError(f"--epochs must be >= 1, got {epochs}")
    _check_step(batch_size, lr, "")
    if not 0.0 <= val_fraction < 1.0:
        raise CompositionError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if backprop is not None and backprop not in BACKPROP_METHODS:
        raise CompositionError(f"--backprop works with --method {', '.join(BACKPROP_METHODS)}, not '{backprop}'")
    multi_label = isinstance(labels, TaskTargets)
    if multi_label and backprop is not None:
        raise CompositionError("--backprop trains through UHC losses of softmax teachers, not multi-label ones")
    if backprop is not None and labels.class_weights is not None:
        raise CompositionError("--balance weights estimated soft labels; it does not apply with --backprop")
    group = group or distributed.current()
    rng = np.random.default_rng(seed)
    train_rows, val_rows = _split_validation(len(x), val_fraction, rng)
    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    soft = torch.from_numpy(labels.soft)
    if multi_label:
        weights = torch.from_numpy(labels.weight)
    else:
        weights = torch.ones(soft.shape[1]) if labels.class_weights is None else torch.from_numpy(
            labels.class_weights.astype(np.float32))
    if backprop is not None:
        teacher_logits = torch.from_numpy(labels.outputs.logits.astype(np.float32))
        teacher_probs = torch.from_numpy(labels.outputs.probs.astype(np.float32))
        mask = torch.from_numpy(labels.active[:, :, None] & labels.outputs.support[None]).float()

    def shard_loss(shard: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """(loss, transfer loss) of this process's ``shard`` of the global ``batch`` (rows), over the whole batch."""
        # every process runs the student, even on an empty shard: synchronized BatchNorm needs all of them
        if transfer is not None:
            out, transfer_loss = transfer(inputs[shard], shard)
            transfer_loss = transfer_loss * (len(shard) / len(batch))  # a per-sample mean (+ a penalty), reweighted
        else:
            out, transfer_loss = model(inputs[shard]), torch.zeros(())
        if multi_label:
            target = (soft[shard] > 0.5).float() if hard else soft[shard]
            loss = (nn.functional.binary_cross_entropy_with_logits(out, target, weight=weights[shard], reduction="sum")
                    / weights[batch].sum().clamp_min(1.0))
        elif backprop is not None:
            loss = (uhc_loss(backprop, out, teacher_logits[shard], teacher_probs[shard], mask[shard]) * len(shard)
                    / len(batch)) if len(shard) else out.sum()
        elif hard:
            target = soft[shard].argmax(dim=1)
            loss = (nn.functional.cross_entropy(out, target, weight=weights, reduction="sum")
                    / weights[soft[batch].argmax(dim=1)].sum())
        else:
            loss = -(weights * soft[shard] * torch.log_softmax(out, dim=1)).sum() / len(batch)
        return torch.stack([loss + transfer_loss, transfer_loss])

    generator = torch.Generator().manual_seed(seed)
    steps = epochs * len(_batches(len(train_rows), batch_size, torch.Generator().manual_seed(seed)))
    parameters = list(model.parameters()) + (list(transfer.parameters()) if transfer is not None else [])
    optimizer = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    train_index = torch.from_numpy(train_rows)

    def train_epoch(epoch: int) -> dict[str, float]:
        model.train()
        sums = torch.zeros(2, dtype=torch.float64)
        for batch in _batches(len(train_index), batch_size, generator):
            rows = train_index[batch]
            sums += train_step(group, optimizer, parameters, rows, shard_loss, schedule) * len(rows)
        sums = group.sum_(sums) / max(len(train_rows), 1)
        record = {"loss": round(float(sums[0]), 6)}
        if transfer is not None:
            record["transfer_loss"] = round(float(sums[1]), 6)
        return record

    def evaluate() -> tuple[dict[str, float], tuple | None]:
        if not len(val_rows):
            return {}, None
        model.eval()
        agree, total = sharded_totals(group, val_rows, 2, EVAL_BATCH,
                                      lambda part: _agreement_sums(model(inputs[part]), labels, part))
        agreement = float(agree) / max(float(total), 1.0)
        return {"val_agreement": round(agreement, 4)}, (agreement,)

    state = new_state(best_epoch=epochs)
    with distributed.synchronized_batch_norm(model, group):
        run_epochs(state, epochs, train_epoch=train_epoch, evaluate=evaluate,
                   snapshot=lambda: copy.deepcopy(model.state_dict()),
                   epoch_bar=lambda epochs: progress_bar(epochs, group, progress, desc="student", unit="epoch"))
    if state["best"] is not None:
        model.load_state_dict(state["best"])
    model.eval()
    return {"train_samples": int(len(train_rows)), "val_samples": int(len(val_rows)),
            "best_epoch": state["best_epoch"],
            "best_val_agreement": round(state["best_key"][0], 4) if len(val_rows) else None,
            "history": state["history"]}


def finetune(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 5, batch_size: int = 64,
             lr: float = 1e-4, seed: int = 0, progress: bool = True,
             group: distributed.Group | None = None) -> dict[str, Any]:
    """Semi-supervised step of Algorithm 1: cross-entropy on the few labeled samples (``y`` = union indices).

    Adam with a cosine decay to 0, seeded shuffles; data-parallel under ``torchrun`` like :func:`train_student`.
    """
    if epochs < 1:
        raise CompositionError(f"--finetune-epochs must be >= 1, got {epochs}")
    _check_step(batch_size, lr, "finetune-")
    group = group or distributed.current()
    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    targets = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * len(_batches(len(x), batch_size, torch.Generator().manual_seed(seed)))
    parameters = list(model.parameters())
    optimizer = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))

    def shard_loss(rows: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(inputs[rows]), targets[rows], reduction="sum") / len(batch)
        return loss.reshape(1)

    def train_epoch(epoch: int) -> dict[str, float]:
        model.train()
        total = torch.zeros(1, dtype=torch.float64)
        for batch in _batches(len(x), batch_size, generator):
            total += train_step(group, optimizer, parameters, batch, shard_loss, schedule) * len(batch)
        return {"loss": float(group.sum_(total)[0]) / len(x)}

    with distributed.synchronized_batch_norm(model, group):
        run_epochs(new_state(), epochs, train_epoch=train_epoch, evaluate=lambda: ({}, None), snapshot=lambda: None,
                   epoch_bar=lambda epochs: progress_bar(epochs, group, progress, desc="fine-tune", unit="epoch"))
    model.eval()
    correct, total = sharded_totals(group, np.arange(len(x)), 2, EVAL_BATCH, lambda part: torch.tensor(
        [float((model(inputs[part]).argmax(dim=1) == targets[part]).sum()), len(part)], dtype=torch.float64))
    return {"samples": int(len(x)), "epochs": epochs, "lr": lr, "train_accuracy": round(float(correct / total), 4)}


# ----------------------------------------------------------------------------------- export


def export_student(student: Student, path: str | os.PathLike, classes: list[str], input_shape: tuple[int, ...],
                   *, force: bool = False, multi_label: bool = False) -> int:
    """Write the student as ONNX with its class names under ``neuralmerge.classes``; return the byte size.

    A ``multi_label`` student (one sigmoid logit per task, the output is still logits) also gets
    ``neuralmerge.multi_label = "true"``.
    """
    from neuralmerge.io.onnx_files import save_model_atomic

    if student.template is not None:
        model = student.model.write_back(student.template)
    else:
        from neuralmerge.zoo.train import export_onnx

        with tempfile.TemporaryDirectory() as folder:
            model = onnx.load(str(export_onnx(student.model, Path(folder) / "student.onnx", input_shape)))
    kept = [p for p in model.metadata_props if p.key not in (CLASSES_KEY, MULTI_LABEL_KEY)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=CLASSES_KEY, value=json.dumps(classes))
    if multi_label:
        model.metadata_props.add(key=MULTI_LABEL_KEY, value="true")
    return save_model_atomic(model, path, force=force)


def read_classes(path: str | os.PathLike) -> list[str]:
    """The ``neuralmerge.classes`` list of a composed ONNX file."""
    from neuralmerge.io.onnx_files import load_model

    names = _declared_classes(load_model(path))
    if names is None:
        raise CompositionError(f"{path} has no '{CLASSES_KEY}' metadata")
    return names
