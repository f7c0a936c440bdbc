"""Feature transfer from white-box teachers: AKA's transfer bridge (Shen et al., ICCV 2019, §3.2).

White-box teachers are ONNX files imported as torch modules (``graph.importer.OnnxModule``), so
their intermediate feature maps can be read. Blocks are paired by spatial size: for the teacher
and the student alike, the feature maps (4-D float tensors wider than 1×1) are listed in execution
order, a *resolution stage* is a maximal run of maps with the same (H, W), and its last map is the
stage's block output. A teacher stage and a student stage with the same (H, W) form a pair.
Explicit pairs (teacher position, student block, teacher tensor) replace this rule when given.

Per pair a bias-free 1×1 conv (the bridge, eq. 1) maps the student's block output into the
teacher's channels; the transfer loss is eq. 2, the mean squared difference over C·H·W, divided
by the teacher block's mean squared activation (so blocks and teachers of any activation scale
weigh alike; with raw eq. 2 large teacher activations killed the student's deeper ReLUs in our
tests), and the bridge's weights carry eq. 4's soft unit-norm constraint, mean_j (Σ_i w_ij² − 1)²,
which keeps the bridge from absorbing the features' scale. As in AKA's selective learning, each sample learns only
from the features of its *owner*, the teacher chosen for it (least prediction entropy).

The AKA paper puts a 1×1 alignment on both sides; here only the student's side is transformed and
the teacher's raw block output is the target, so the loss cannot collapse to zero and the
student's own features are pulled toward the teacher's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from neuralmerge.compose import CompositionError
from neuralmerge.compose.teachers import Teacher


@dataclass(frozen=True)
class Stage:
    """One resolution stage's block output: where to read it and its shape (C, H, W)."""

    name: str
    channels: int
    size: tuple[int, int]


@dataclass(frozen=True)
class BlockPair:
    """A teacher stage and the student stage of the same spatial size."""

    teacher: int       # index in the composition's teacher list
    student_stage: Stage
    teacher_stage: Stage


def last_map_per_stage(maps: Sequence[tuple[str, torch.Tensor]]) -> list[Stage]:
    """The last 4-D map of each run of equal spatial size, in execution order (1×1 maps are skipped)."""
    stages: list[Stage] = []
    previous: tuple[int, int] | None = None
    for name, value in maps:
        if value.ndim != 4 or not value.is_floating_point() or tuple(value.shape[2:]) == (1, 1):
            continue
        stage = Stage(name, int(value.shape[1]), (int(value.shape[2]), int(value.shape[3])))
        if stage.size == previous:
            stages[-1] = stage
        else:
            stages.append(stage)
        previous = stage.size
    return stages


def import_teacher(teacher: Teacher) -> Any:
    """The teacher's ONNX file as an ``OnnxModule`` in eval mode, frozen; a one-line error for a black box."""
    from neuralmerge.graph.importer import import_onnx

    if teacher.onnx_path is None:
        raise CompositionError(f"--feature-transfer needs white-box ONNX teachers; teacher {teacher.name} is a "
                               f"black-box callable")
    try:
        module = import_onnx(teacher.onnx_path)
    except Exception as error:  # importer errors (unsupported op, bad file) become this flag's one-line error
        message = (str(error).strip() or type(error).__name__).splitlines()[0][:200]
        raise CompositionError(f"--feature-transfer cannot import teacher {teacher.name}: {message}") from error
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def _run_all(module: Any, names: list[str], example: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    with torch.no_grad():
        values = module.run({module.input_names[0]: example}, names)
    return [(name, values[name]) for name in names]


def onnx_maps(module: Any, model_path: str, example: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Every node output of an imported ONNX model on ``example``, in graph (topological) order."""
    from neuralmerge.io.onnx_files import load_model

    names = [name for node in load_model(model_path).graph.node for name in node.output
             if name and name not in module.output_names]
    return _run_all(module, names, example)


class _ModuleTap:
    """Forward hooks on a torch student: discovers its stages, then records the chosen ones while armed."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.recorded: dict[str, torch.Tensor] = {}
        self.wanted: set[str] = set()
        self.armed = False
        self._handles = [module.register_forward_hook(self._hook(name))
                         for name, module in model.named_modules() if name]

    def _hook(self, name: str):
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if self.armed and isinstance(output, torch.Tensor) and (name in self.wanted or not self.wanted):
                self.recorded[name] = output   # a module called twice keeps its last output
        return record

    def maps(self, example: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        self.wanted, self.recorded, self.armed = set(), {}, True
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(example)
        finally:
            self.armed = False
            self.model.train(was_training)
        return list(self.recorded.items())  # dicts keep insertion order = completion order of the hooks

    def forward(self, x: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.wanted, self.recorded, self.armed = set(names), {}, True
        try:
            logits = self.model(x)
        finally:
            self.armed = False
        return logits, {name: self.recorded[name] for name in names}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


class _OnnxTap:
    """The same for an ONNX-initialised student (an ``OnnxModule``): named intermediate outputs."""

    def __init__(self, model: Any, model_proto: Any):
        self.model = model
        self.node_outputs = [n for node in model_proto.graph.node for n in node.output if n]

    def maps(self, example: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return _run_all(self.model, [n for n in self.node_outputs if n not in self.model.output_names], example)

    def forward(self, x: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        output = self.model.output_names[0]
        values = self.model.run({self.model.input_names[0]: x}, [output, *names])
        return values[output], {name: values[name] for name in names}

    def close(self) -> None:
        pass


def weight_norm_penalty(weight: torch.Tensor) -> torch.Tensor:
    """AKA eq. 4: mean over output channels j of (Σ_i w_ij² − 1)² for a 1×1 conv weight (C_out, C_in, 1, 1)."""
    return ((weight.flatten(1) ** 2).sum(dim=1) - 1.0).pow(2).mean()


class FeatureTransfer(nn.Module):
    """Bridges between a student and its white-box teachers, and the per-batch transfer loss.

    ``template`` is the student's ONNX graph when it is an ``OnnxModule`` (else None), ``imported``
    the teachers as ``OnnxModule``s (:func:`import_teacher`). Blocks are paired on construction,
    by spatial size, or only as ``explicit`` lists them: (teacher position, student block name,
    teacher tensor name) triples, names as :meth:`describe` reports them.
    :meth:`set_owners` gives, for every training sample, the index of the teacher it learns from;
    then call :meth:`forward` instead of the student: it returns the student's logits and
    ``weight · Σ_pairs (relative eq. 2 on the owned samples + eq. 4)``. :meth:`close` removes the hooks
    this puts on a torch student.
    """

    def __init__(self, student: nn.Module, template: Any, teachers: Sequence[Teacher], imported: Sequence[Any],
                 input_shape: tuple[int, ...], weight: float = 0.1,
                 explicit: Sequence[tuple[int, str, str]] | None = None):
        super().__init__()
        if not 0 < weight < math.inf:  # NaN too
            raise CompositionError(f"--transfer-weight must be > 0, got {weight}")
        self.weight = weight
        self.owners = torch.zeros(0, dtype=torch.int64)
        self.teachers = list(imported)   # plain list: the frozen teachers are not this module's parameters
        self._tap = _OnnxTap(student, template) if template is not None else _ModuleTap(student)
        example = torch.zeros((1, *input_shape), dtype=torch.float32)
        student_maps = self._tap.maps(example)
        student_stages = last_map_per_stage(student_maps)
        by_size = {stage.size: stage for stage in student_stages}
        self.pairs: list[BlockPair] = []
        unknown = sorted({i for i, _, _ in explicit or () if not 0 <= i < len(imported)})
        if unknown:
            raise CompositionError(f"--transfer-pair: no teacher at position {unknown[0]} (0..{len(imported) - 1})")
        for index, (teacher, module) in enumerate(zip(teachers, imported)):
            teacher_maps = onnx_maps(module, teacher.onnx_path, example)
            teacher_stages = last_map_per_stage(teacher_maps)
            if explicit is not None:
                pairs = [_explicit_pair(index, teacher.name, s, t, student_maps, teacher_maps)
                         for i, s, t in explicit if i == index]
            else:
                pairs = [BlockPair(index, by_size[t.size], t) for t in teacher_stages if t.size in by_size]
            if not pairs and explicit is not None:
                raise CompositionError(f"--transfer-pair names no block of teacher {index} ({teacher.name}); "
                                       f"give at least one per teacher")
            if not pairs:
                raise CompositionError(
                    f"--feature-transfer: no block of teacher {teacher.name} pairs with the student (teacher feature "
                    f"sizes {_sizes(teacher_stages)}, student {_sizes(student_stages)})")
            self.pairs.extend(pairs)
        self.bridges = nn.ModuleList(nn.Conv2d(p.student_stage.channels, p.teacher_stage.channels, 1, bias=False)
                                     for p in self.pairs)
        for bridge in self.bridges:  # start on eq. 3's constraint: unit-norm rows
            with torch.no_grad():
                bridge.weight.div_(bridge.weight.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None])
        self._student_names = sorted({p.student_stage.name for p in self.pairs})

    def set_owners(self, owners: np.ndarray) -> None:
        """The teacher index each training sample learns its features from (rows of ``forward``'s ``rows``)."""
        owners = np.asarray(owners, dtype=np.int64)
        if len(owners) and (owners.min() < 0 or owners.max() >= len(self.teachers)):
            raise CompositionError(f"feature-transfer owners must be teacher indices 0..{len(self.teachers) - 1}")
        self.owners = torch.from_numpy(owners)

    def forward(self, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's logits on ``x`` (training samples ``rows``) and the weighted transfer loss."""
        logits, features = self._tap.forward(x, self._student_names)
        owners = self.owners[rows]
        loss = x.new_zeros(())
        for teacher, module in enumerate(self.teachers):
            owned = torch.nonzero(owners == teacher).flatten()
            if not len(owned):
                continue
            names = [p.teacher_stage.name for p in self.pairs if p.teacher == teacher]
            with torch.no_grad():
                targets = module.run({module.input_names[0]: x[owned]}, names)
            for pair, bridge in zip(self.pairs, self.bridges):
                if pair.teacher == teacher:
                    aligned = bridge(features[pair.student_stage.name][owned])
                    target = targets[pair.teacher_stage.name]
                    # eq. 2 per sample, relative to the teacher block's mean energy (scale-free across blocks and
                    # teachers), averaged over the whole batch so each teacher weighs by its share of samples
                    energy = target.pow(2).mean().clamp_min(1e-12)
                    loss = loss + (aligned - target).pow(2).mean(dim=(1, 2, 3)).sum() / (energy * len(x))
        for bridge in self.bridges:
            loss = loss + weight_norm_penalty(bridge.weight)
        return logits, self.weight * loss

    def describe(self) -> list[dict[str, Any]]:
        """The pairs, for the report."""
        return [{"teacher": p.teacher, "student_block": p.student_stage.name, "teacher_block": p.teacher_stage.name,
                 "size": list(p.teacher_stage.size), "channels": [p.student_stage.channels, p.teacher_stage.channels]}
                for p in self.pairs]

    def close(self) -> None:
        """Remove the forward hooks from a torch student (it runs as before)."""
        self._tap.close()


def _named_map(maps: list[tuple[str, torch.Tensor]], name: str, owner: str) -> Stage:
    found = [s for s in last_map_per_stage([m for m in maps if m[0] == name])]
    if not found:
        candidates = ", ".join(s.name for s in last_map_per_stage(maps))
        raise CompositionError(f"--transfer-pair: {owner} has no feature map '{name}' (stage outputs: {candidates})")
    return found[0]


def _explicit_pair(index: int, teacher_name: str, student_block: str, teacher_block: str,
                   student_maps: list[tuple[str, torch.Tensor]], teacher_maps: list[tuple[str, torch.Tensor]]
                   ) -> BlockPair:
    """A user-named pair, checked: both maps exist and have the same spatial size."""
    student_stage = _named_map(student_maps, student_block, "the student")
    teacher_stage = _named_map(teacher_maps, teacher_block, f"teacher {teacher_name}")
    if student_stage.size != teacher_stage.size:
        raise CompositionError(f"--transfer-pair: student block {student_block} is {_sizes([student_stage])[1:-1]} "
                               f"but teacher block {teacher_block} is {_sizes([teacher_stage])[1:-1]}")
    return BlockPair(index, student_stage, teacher_stage)


def parse_transfer_pair(text: str) -> tuple[int, str, str]:
    """``POSITION:STUDENT_BLOCK=TEACHER_TENSOR`` → (position, student block, teacher tensor)."""
    position, _, rest = text.partition(":")
    student_block, _, teacher_block = rest.partition("=")
    if not position.strip().isdigit() or not student_block or not teacher_block:
        raise CompositionError(f"--transfer-pair takes POSITION:STUDENT_BLOCK=TEACHER_TENSOR, got '{text}'")
    return int(position), student_block, teacher_block


def _sizes(stages: Sequence[Stage]) -> str:
    return "[" + ", ".join(f"{h}x{w}" for h, w in (s.size for s in stages)) + "]"
