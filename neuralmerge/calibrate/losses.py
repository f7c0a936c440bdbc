"""The calibration loss of NeuralMerger §3.3, per sample (so data-parallel shards sum to the global mean).

loss = Σ over the model's E-layers of mean |merged output − original output|
       + γ · task loss,
where the task loss is cross-entropy with labels, otherwise distillation: KL(original ‖ merged) of
the class scores softened at temperature T, times T² (Hinton et al.: keeps the gradient scale
independent of T). Outputs that are not [N, K] class scores get a mean L1 instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def is_class_scores(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.shape[1] > 1


def layer_mismatch(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute difference, shape [N]."""
    return (student - teacher).abs().reshape(len(student), -1).mean(dim=1)


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample KL(softmax(teacher/T) ‖ softmax(student/T)) · T², shape [N]."""
    target = F.log_softmax(teacher / temperature, dim=1)
    pred = F.log_softmax(student / temperature, dim=1)
    return (target.exp() * (target - pred)).sum(dim=1) * temperature ** 2


def task_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
              temperature: float) -> torch.Tensor:
    """Per-sample task loss of one output: CE with labels, KL distillation without, L1 for non-class outputs."""
    if not is_class_scores(student):
        return layer_mismatch(student, teacher)
    if labels is not None:
        return F.cross_entropy(student, labels, reduction="none")
    return distillation(student, teacher, temperature)


def calibration_loss(student_taps: list[torch.Tensor], teacher_taps: list[torch.Tensor],
                     student_outputs: list[torch.Tensor], teacher_outputs: list[torch.Tensor],
                     labels: torch.Tensor | None, *, gamma: float, temperature: float) -> torch.Tensor:
    """Per-sample loss [N] of one model. Labels, when given, apply to the first output only."""
    total = sum(layer_mismatch(s, t) for s, t in zip(student_taps, teacher_taps))
    for k, (s, t) in enumerate(zip(student_outputs, teacher_outputs)):
        total = total + gamma * task_loss(s, t, labels if k == 0 else None, temperature)
    return total
