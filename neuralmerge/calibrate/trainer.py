"""The calibration trainer (NeuralMerger §3.3): fine-tune a merged model against its frozen originals.

Teachers are the normalised source models, students one ``OnnxModule`` of the merged graph.
Trainable: codebooks, E-layer biases and the dense heads; codes are fixed integers. Batches
alternate between models. A held-out slice of each model's calibration data measures fidelity
(top-1 agreement with the original, accuracy when labels exist) after every epoch; the best
epoch is kept (epoch 0, the uncalibrated encoding, included) and training stops early when
fidelity stops improving. With ``int8_aware`` the student's E-layers run on the int8 runtime's
table arithmetic (encode/int8_table.py) in training and in every fidelity measurement.
Deterministic for a given seed, in one process or many: the step, the held-out sums and the
epoch loop are the data-parallel ones of loop.py, shared with composition.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import onnx
import torch
from ..errors import NeuralMergeError
from ..graph.importer import OnnxModule
from ..graph.layers import Layer
from ..settings import CalibrationSettings
from . import distributed
from .checkpoint import Checkpoint, CheckpointMismatch
from .loop import new_state, progress, run_epochs, sharded_totals, train_step
from .data import CalibrationSet, split_holdout
from .losses import calibration_loss, is_class_scores
from .taps import ModelView, model_views, trainable_names

EVAL_BATCH = 256


class CalibrationInterrupted(NeuralMergeError):
    """Ctrl-C during calibration: the last finished epoch is in the checkpoint."""


@dataclass
class CalibrationOutcome:
    model: onnx.ModelProto                  # the merged model with the best parameters written back
    before: list[dict]                      # held-out fidelity per model, before calibration
    after: list[dict]                       # ... of the kept (best) epoch
    history: list[dict]                     # per epoch: mean training loss per model, held-out fidelity
    best_epoch: int
    stopped_early: bool
    int8_scales: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


class _Model:
    """One source model's teacher, data split and merged-graph names."""

    def __init__(self, teacher: onnx.ModelProto, view: ModelView, data: CalibrationSet, holdout: float, seed: int):
        self.teacher = OnnxModule(teacher).eval().requires_grad_(False)
        self.view = view
        self.data = data
        self.outputs = list(self.teacher.output_names)
        self.train, self.holdout = split_holdout(len(data), holdout, seed)
        probe = self.run_teacher(self.batch(self.holdout[:1])[0])[1][0]
        self.classifies = is_class_scores(probe)   # the first output is [N, K] class scores

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = torch.from_numpy(self.data.x[indices])
        y = None if self.data.y is None else torch.from_numpy(self.data.y[indices].astype(np.int64))
        return x, y

    def run_teacher(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with torch.no_grad():
            out = self.teacher.run({self.data.input_name: x}, [t.teacher for t in self.view.taps] + self.outputs)
        return [out[t.teacher] for t in self.view.taps], [out[o] for o in self.outputs]

    def run_student(self, student: OnnxModule, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        wanted = [t.student for t in self.view.taps] + [self.view.outputs[o] for o in self.outputs]
        out = student.run({self.view.inputs[self.data.input_name]: x}, wanted)
        return [out[t.student] for t in self.view.taps], [out[self.view.outputs[o]] for o in self.outputs]


class Calibrator:
    """Calibrate ``merged`` against ``teachers`` (normalised sources, in model order) on ``data``.

    ``heads`` are the dense layers that train along with the codebooks. ``train_limit`` caps the
    training samples per model and epoch (the budget search's short calibrations).
    """

    def __init__(self, teachers: list[onnx.ModelProto], merged: onnx.ModelProto, data: list[CalibrationSet],
                 heads: list[Layer], settings: CalibrationSettings, *, seed: int = 0, quiet: bool = False,
                 train_limit: int | None = None, group: distributed.Group | None = None, desc: str = "calibrate"):
        self.merged = merged
        self.settings = settings
        self.seed = seed
        self.quiet = quiet
        self.train_limit = train_limit
        self.group = group or distributed.current()
        self.desc = desc
        self.student = OnnxModule(merged).train()
        views = model_views(merged)
        self._elayers = {tap.node: self.student.elayer(tap.node) for view in views for tap in view.taps}
        self.models = [_Model(t, views[i], d, settings.holdout, seed + i) for i, (t, d) in enumerate(zip(teachers, data))]
        params = self.student.onnx_params
        self.names = trainable_names(merged, heads)
        for p in self.student.parameters():
            p.requires_grad_(False)
        self.params = [params[n].requires_grad_(True) for n in self.names]
        # Adam moves every entry by about lr per step whatever its scale, and codebooks differ in scale by
        # 10x between layers (fc1 weights ~ 1/sqrt(4096)): so the step is relative, lr × the tensor's RMS.
        self.optimizer = torch.optim.Adam(
            [{"params": [p], "base_lr": settings.lr * max(float(p.detach().pow(2).mean().sqrt()), 1e-8)}
             for p in self.params], lr=settings.lr)

    # ------------------------------------------------------------------ the loop

    def fit(self, checkpoint: Checkpoint | None = None) -> CalibrationOutcome:
        """Train up to ``settings.epochs`` epochs (continuing a checkpoint's run if it has one)."""
        # Several of torch's CPU backward ops (index_put_ / index_add_ accumulation) sum in an
        # order that varies between runs on several threads; the int8 rounding of --int8-aware
        # then magnified it to 4e-3 in the weights. Deterministic kernels make a seed's result
        # reproducible, and a resumed run equal to an uninterrupted one.
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return self._fit(checkpoint)
        finally:
            torch.use_deterministic_algorithms(deterministic)

    def _fit(self, checkpoint: Checkpoint | None) -> CalibrationOutcome:
        start = time.perf_counter()
        state = checkpoint.get("training") if checkpoint is not None else None
        if state is not None:
            # The learning-rate schedule spans the run's epoch count: once an epoch has trained,
            # continuing with another count would give a result that neither run would.
            planned = state.get("epochs", self.settings.epochs)
            if planned != self.settings.epochs and state["epoch"] > 0:
                raise CheckpointMismatch(f"--resume: {checkpoint.path} is a run of {planned} calibration epochs "
                                         f"({state['epoch']} done); resume it with --epochs {planned}")
            state = {**self._restore(state), "epochs": self.settings.epochs}
            self.measure_int8_ranges()
        else:
            self.measure_int8_ranges()
            before = self.evaluate()
            state = {**new_state(best_key=self._key(before), best=self._snapshot()), "step": 0, "before": before,
                     "epochs": self.settings.epochs}
            if checkpoint is not None:
                checkpoint.save("training", self._with_weights(state))
        total_steps = self.settings.epochs * self._steps_per_epoch()

        def measure() -> tuple[dict, tuple]:
            self.measure_int8_ranges()
            fidelity = self.evaluate()
            return {"fidelity": fidelity}, self._key(fidelity)

        try:
            stopped_early = run_epochs(
                state, self.settings.epochs, train_epoch=lambda epoch: {"loss": self._train_epoch(epoch, state,
                                                                                                total_steps)},
                evaluate=measure, snapshot=self._snapshot, patience=self.settings.patience,
                on_epoch=None if checkpoint is None else lambda s: checkpoint.save("training", self._with_weights(s)))
        except KeyboardInterrupt:
            where = f"; resume with --resume (checkpoint: {checkpoint.path})" if checkpoint is not None else ""
            raise CalibrationInterrupted(f"interrupted after {state['epoch']} of {self.settings.epochs} "
                                         f"calibration epochs{where}") from None
        self._load(state["best"])
        self.measure_int8_ranges()  # the kept epoch's ranges, which its evaluation used (int8-aware)
        after = state["before"] if state["best_epoch"] == 0 else state["history"][state["best_epoch"] - 1]["fidelity"]
        return CalibrationOutcome(self.student.write_back(self.merged), state["before"], after, state["history"],
                                  state["best_epoch"], stopped_early, seconds=time.perf_counter() - start)

    def _steps_per_epoch(self) -> int:
        return sum(math.ceil(self._epoch_size(m) / self.settings.batch_size) for m in self.models)

    def _epoch_size(self, model: _Model) -> int:
        return len(model.train) if self.train_limit is None else min(len(model.train), self.train_limit)

    def _schedule(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(model, global batch) steps of one epoch: each model's seeded shuffle, alternating between models."""
        per_model = []
        for i, m in enumerate(self.models):
            rng = np.random.default_rng([self.seed, epoch, i])
            order = m.train[rng.permutation(len(m.train))][:self._epoch_size(m)]
            per_model.append([order[k:k + self.settings.batch_size]
                              for k in range(0, len(order), self.settings.batch_size)])
        steps = []
        for k in range(max(len(b) for b in per_model)):
            steps += [(i, b[k]) for i, b in enumerate(per_model) if k < len(b)]
        return steps

    def _train_epoch(self, epoch: int, state: dict, total_steps: int) -> list[float]:
        sums = torch.zeros(len(self.models), dtype=torch.float64)
        counts = torch.zeros(len(self.models), dtype=torch.float64)
        steps = self._schedule(epoch)
        bar = progress(steps, self.group, not self.quiet, desc=f"{self.desc} {epoch}/{self.settings.epochs}",
                       unit="batch")
        for i, batch in bar:
            decay = 0.5 * (1 + math.cos(math.pi * state["step"] / max(total_steps, 1)))
            for g in self.optimizer.param_groups:  # cosine decay to 0 over all epochs (stateless: resumable)
                g["lr"] = g["base_lr"] * decay
            sums[i] += train_step(self.group, self.optimizer, self.params, batch,
                                  partial(self._shard_loss, self.models[i]))[0] * len(batch)
            counts[i] += len(self.group.shard(batch))
            state["step"] += 1
        self.group.sum_(sums)
        self.group.sum_(counts)
        return [float(s / max(c, 1.0)) for s, c in zip(sums, counts)]

    def _shard_loss(self, m: _Model, shard: np.ndarray, batch: np.ndarray) -> torch.Tensor:
        """This process's share of the batch's mean calibration loss (the student is not run on an empty share)."""
        if not len(shard):
            return torch.zeros(1)
        x, y = m.batch(shard)
        t_taps, t_out = m.run_teacher(x)
        s_taps, s_out = m.run_student(self.student, x)
        per_sample = calibration_loss(s_taps, t_taps, s_out, t_out, y, gamma=self.settings.gamma,
                                      temperature=self.settings.temperature)
        return (per_sample.sum() / len(batch)).reshape(1)

    # ------------------------------------------------------------------ measuring

    def evaluate(self) -> list[dict]:
        """Held-out fidelity per model: top-1 agreement with the original, accuracy (labels), mean loss."""
        results = []
        for i, m in enumerate(self.models):
            totals = sharded_totals(self.group, m.holdout, 4, EVAL_BATCH, lambda part: self._fidelity_sums(m, part))
            n = max(float(totals[3]), 1.0)
            results.append({"model": i, "samples": int(totals[3]), "loss": float(totals[0]) / n,
                            "top1_agreement": float(totals[1]) / n if m.classifies else None,
                            "accuracy": float(totals[2]) / n if m.classifies and m.data.y is not None else None})
        return results

    def _fidelity_sums(self, m: _Model, rows: np.ndarray) -> torch.Tensor:
        """Summed loss, agreeing top-1, correct top-1 and sample count on ``rows``."""
        x, y = m.batch(rows)
        t_taps, t_out = m.run_teacher(x)
        s_taps, s_out = m.run_student(self.student, x)
        loss = calibration_loss(s_taps, t_taps, s_out, t_out, y, gamma=self.settings.gamma,
                                temperature=self.settings.temperature)
        agree = correct = 0.0
        if m.classifies:
            pred = s_out[0].argmax(1)
            agree = float((pred == t_out[0].argmax(1)).sum())
            correct = float((pred == y).sum()) if y is not None else 0.0
        return torch.tensor([float(loss.sum()), agree, correct, len(x)], dtype=torch.float64)

    def reference(self) -> list[dict]:
        """The originals' own held-out accuracy (when labelled): what an accuracy drop is measured from."""
        results = []
        for i, m in enumerate(self.models):
            rows = m.holdout if m.classifies and m.data.y is not None else m.holdout[:0]
            totals = sharded_totals(self.group, rows, 2, EVAL_BATCH, lambda part: self._teacher_correct(m, part))
            results.append({"model": i, "top1_agreement": 1.0 if m.classifies else None,
                            "accuracy": float(totals[0] / totals[1]) if float(totals[1]) else None})
        return results

    @staticmethod
    def _teacher_correct(m: _Model, rows: np.ndarray) -> torch.Tensor:
        x, y = m.batch(rows)
        return torch.tensor([float((m.run_teacher(x)[1][0].argmax(1) == y).sum()), len(x)], dtype=torch.float64)

    @staticmethod
    def score(fidelity: list[dict]) -> float:
        """Mean over models of held-out accuracy (labelled) or top-1 agreement (unlabelled); 1 - loss otherwise."""
        values = []
        for f in fidelity:
            if f["accuracy"] is not None:
                values.append(f["accuracy"])
            elif f["top1_agreement"] is not None:
                values.append(f["top1_agreement"])
            else:
                values.append(-f["loss"])
        return float(np.mean(values))

    def _key(self, fidelity: list[dict]) -> tuple[float, float]:
        """Higher is better: fidelity first, then the held-out loss (ties are common near 100% agreement)."""
        return self.score(fidelity), -float(np.mean([f["loss"] for f in fidelity]))

    def int8_scales(self) -> dict[str, float]:
        """Max |input| of every E-layer call over all calibration data (ranges for the int8 runtime)."""
        scales: dict[str, float] = {}
        with torch.no_grad():
            for m in self.models:
                peak = torch.zeros(len(m.view.taps), dtype=torch.float64)
                shard = self.group.shard(np.arange(len(m.data)))
                for k in range(0, len(shard), EVAL_BATCH):
                    x, _ = m.batch(shard[k:k + EVAL_BATCH])
                    out = self.student.run({m.view.inputs[m.data.input_name]: x}, [t.input for t in m.view.taps])
                    for j, tap in enumerate(m.view.taps):
                        peak[j] = max(float(peak[j]), float(out[tap.input].abs().max()))
                self.group.max_(peak)
                scales.update({tap.node: float(peak[j]) for j, tap in enumerate(m.view.taps)})
        return scales

    def recorded_int8_scales(self) -> dict[str, float]:
        """The activation ranges the file records: with int8-aware calibration the ones the kept
        epoch was evaluated with, otherwise each E-layer input's max |value| in fp32."""
        if self.settings.int8_aware:
            return {node: float(layer.int8_peak) for node, layer in self._elayers.items()}
        return self.int8_scales()

    def measure_int8_ranges(self) -> None:
        """Int8-aware calibration: run the E-layers on the int8 table, with the activation ranges
        the exported file will record, measured with each input's own range. Measured from the
        parameters alone, never from the previous epoch's ranges: a resumed run (which has no
        previous ranges) then repeats an uninterrupted one exactly."""
        if not self.settings.int8_aware:
            return
        self._simulate_int8({})
        self._simulate_int8(self.int8_scales())

    def _simulate_int8(self, peaks: dict[str, float]) -> None:
        for node, layer in self._elayers.items():
            layer.int8_peak = peaks.get(node, 0.0)

    # ------------------------------------------------------------------ state

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in zip(self.names, self.params)}

    def _load(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(values[n])

    def _with_weights(self, state: dict) -> dict:
        return {**state, "best_key": list(state["best_key"]), "params": self._snapshot(),
                "optimizer": self.optimizer.state_dict()}

    def _restore(self, saved: dict) -> dict:
        """Load a checkpoint's weights and optimizer; return the loop state."""
        self._load(saved["params"])
        self.optimizer.load_state_dict(saved["optimizer"])
        return {k: v for k, v in saved.items() if k not in ("params", "optimizer")}
