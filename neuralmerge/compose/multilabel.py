"""Multi-label teachers: independent sigmoid outputs (attributes such as face attributes) → soft targets.

A multi-label teacher's output k is the logit of an independent yes/no *task* named by line k of
its class list; the student learns the tasks the user selects (``--tasks``, default all), with one
sigmoid output per task. Per sample and task, the teachers that know the task speak unless the
entropy filter silences them (``tau`` on the binary entropy / log 2, so 0 = certain, 1 = p = ½);
the target is the mean of their probabilities or, with ``select="least-entropy"``, the probability
of the most certain one (AKA's selective learning, Shen et al. ICCV 2019 §3.3, applied per task).
A (sample, task) no teacher speaks for gets weight 0; a sample with no task left is dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from neuralmerge.compose import CompositionError
from neuralmerge.compose.labels import SELECTIONS, union_classes

MULTI_LABEL_KEY = "neuralmerge.multi_label"


@dataclass(eq=False)
class TaskTargets:
    """Soft per-task targets for the kept samples."""

    soft: np.ndarray      # (n_kept, T) float32 probabilities of "yes"
    weight: np.ndarray    # (n_kept, T) float32: 1 where some active teacher speaks for the task, else 0
    keep: np.ndarray      # (n,) bool over the unlabeled set
    owner: np.ndarray     # (n_kept,) teacher with the least mean binary entropy over its active tasks
    stats: dict[str, Any] = field(default_factory=dict)


def resolve_tasks(class_lists: Sequence[Sequence[str]], tasks: Sequence[str] | None) -> list[str]:
    """The tasks the student learns: ``tasks`` checked against the teachers' names, or all of them in order."""
    known, _ = union_classes(class_lists)
    if tasks is None:
        return known
    tasks = [t.strip() for t in tasks]
    if not tasks or "" in tasks:
        raise CompositionError("--tasks needs a comma-separated list of task names without blanks")
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        raise CompositionError(f"--tasks names '{repeated[0]}' twice")
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise CompositionError(f"--tasks: no teacher has a task '{unknown[0]}' (known: {', '.join(known)})")
    return tasks


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy of Bernoulli(p) divided by log 2: 0 = certain, 1 = p = ½."""
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p)) / np.log(2)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # tanh form: no overflow for large |z|


def make_task_targets(teacher_logits: Sequence[np.ndarray], class_lists: Sequence[Sequence[str]], tasks: list[str],
                      *, tau: float | None = None, temperature: float = 1.0, select: str = "none") -> TaskTargets:
    """Teachers' sigmoid logits (n, K_i) → filtered, aggregated per-task targets for ``tasks``."""
    if select not in SELECTIONS:
        raise CompositionError(f"unknown --select '{select}' (choose from {', '.join(SELECTIONS)})")
    if tau is not None and not 0.0 <= tau <= 1.0:
        raise CompositionError(f"--tau is a normalised entropy in [0, 1], got {tau}")
    if not 0 < temperature < math.inf:  # NaN too
        raise CompositionError(f"--temperature must be > 0, got {temperature}")
    n, count, width = len(teacher_logits[0]), len(teacher_logits), len(tasks)
    column = {name: t for t, name in enumerate(tasks)}
    probs = np.zeros((n, count, width))
    entropy = np.ones((n, count, width))
    knows = np.zeros((count, width), dtype=bool)
    for i, (z, names) in enumerate(zip(teacher_logits, class_lists)):
        for k, name in enumerate(names):
            if name in column:
                t = column[name]
                probs[:, i, t] = _sigmoid(np.asarray(z[:, k], dtype=np.float64) / temperature)
                entropy[:, i, t] = binary_entropy(_sigmoid(np.asarray(z[:, k], dtype=np.float64)))
                knows[i, t] = True
    active = np.broadcast_to(knows[None], probs.shape).copy()
    if tau is not None:
        active &= entropy <= tau
    weight = active.any(axis=1)                                                  # (n, T)
    keep = weight.any(axis=1)
    if not keep.any():
        best = np.where(knows[None], entropy, np.inf).min(axis=(1, 2))
        raise CompositionError(f"--tau {tau} filters out every sample (per-sample lowest binary teacher entropy: "
                               f"median {np.median(best):.3f}, min {best.min():.3f})")
    if select == "least-entropy":
        chosen = np.where(active, entropy, np.inf).argmin(axis=1)                # (n, T)
        soft = np.take_along_axis(probs, chosen[:, None, :], axis=1)[:, 0]
    else:
        counts = active.sum(axis=1)
        soft = np.divide((probs * active).sum(axis=1), counts, out=np.zeros((n, width)), where=counts > 0)
    soft = np.where(weight, soft, 0.0)
    spoken = active.sum(axis=2)
    mean_entropy = np.divide((entropy * active).sum(axis=2), spoken, out=np.full((n, count), np.inf),
                             where=spoken > 0)
    owner = mean_entropy.argmin(axis=1)
    soft, weight, owner = soft[keep], weight[keep], owner[keep]
    stats: dict[str, Any] = {
        "samples": int(n),
        "after_entropy_filter": int(keep.sum()),
        "kept": int(keep.sum()),
        "tasks": {name: {"teachers": int(knows[:, t].sum()), "covered": round(float(weight[:, t].mean()), 4),
                         "positive_rate": round(float((soft[:, t] > 0.5)[weight[:, t]].mean())
                                                if weight[:, t].any() else 0.0, 4)}
                  for t, name in enumerate(tasks)},
        "owner_counts": [int(c) for c in np.bincount(owner, minlength=count)],
    }
    return TaskTargets(soft.astype(np.float32), weight.astype(np.float32), keep, owner, stats)
