"""Budgeted r/C search: the paper's manual per-layer sweep (§4.1), automated.

For each aligned group, candidates (r ∈ {4, 8, 16, 32} clipped to the depth, r = 1 for depth-1
inputs; C ∈ {64, 128, 256}) are ordered by compression (bytes of codebook + codes) and searched by
bisection for the most compressive one that fits. A candidate is scored by merging *only that
group*, calibrating it (a proxy of the final calibration: several epochs over a small subset at a
higher learning rate) and measuring the drop on the held-out calibration slice, worst model
counted, in percentage points (``fidelity_drop``). A candidate fits when its drop is within the
group's share of the budget, which is proportional to the group's weights: the bytes a group can
save grow with its size, so budget spent on a tiny layer buys almost nothing. If none fits, the
tried candidate with the smallest drop is taken. Groups are searched independently, as in the
paper, so the whole model's drop is only approximately the sum: the report shows the measured
result after the final calibration.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Callable

import onnx
import torch
from tqdm.auto import tqdm

from ..align import Group
from ..graph.layers import Layer
from ..settings import CalibrationSettings, GroupSetting
from . import distributed
from .data import CalibrationSet
from .losses import calibration_loss
from .trainer import EVAL_BATCH, Calibrator

R_CHOICES = (4, 8, 16, 32)
C_CHOICES = (64, 128, 256)
# A candidate's proxy calibration. One merged group has few parameters and converges within tens of
# steps, so many small steps over a small subset at a higher rate measure what the full calibration
# recovers far better than one epoch at the normal rate (which overstated drops ~10x on the LeNet pair).
PROXY_SAMPLES = 512      # training samples per model and epoch
PROXY_EPOCHS = 2
PROXY_BATCH = 32
PROXY_LR_SCALE = 3.0     # × the calibration's lr


def candidates(group: Group) -> list[GroupSetting]:
    """The r/C settings tried for ``group``."""
    depth = min(m.depth for m in group.members)
    rs = [1] if depth == 1 else sorted({min(r, depth) for r in R_CHOICES})
    return [GroupSetting(r, c) for r in rs for c in C_CHOICES]


def encoded_bytes(group: Group, setting: GroupSetting, codebook_itemsize: int = 4) -> int:
    """Bytes of the group's codebook and codes at ``setting`` (what the candidates are ordered by)."""
    r, c = setting.r, setting.codewords
    book = math.ceil(max(m.depth for m in group.members) / r) * c * r * codebook_itemsize
    code_size = 1 if c <= 256 else 2
    codes = sum(m.weight.size // m.depth * math.ceil(m.depth / r) * code_size for m in group.members)
    return int(book + codes)


def budget_shares(groups: list[Group], budget: float) -> dict[str, float]:
    """Each group's share of ``budget``: proportional to its number of weights."""
    sizes = {g.name: sum(m.weight.size for m in g.members) for g in groups}
    total = sum(sizes.values())
    return {name: budget * size / total for name, size in sizes.items()}


def search(groups: list[Group], teachers: list[onnx.ModelProto], data: list[CalibrationSet], heads: list[Layer],
           settings: CalibrationSettings, budget: float, build: Callable[[Group, GroupSetting], onnx.ModelProto], *,
           seed: int = 0, quiet: bool = False, codebook_itemsize: int = 4, done: dict | None = None,
           on_group: Callable[[dict], None] | None = None, group: distributed.Group | None = None) -> dict:
    """Choose r/C for every group within ``budget`` (percentage points of fidelity drop).

    ``build(group, setting)`` returns a merged model with only that group encoded. ``done`` holds
    results of groups already searched (a resumed run); ``on_group`` gets the results so far after
    each group. Returns the search report (chosen setting, share and every scored candidate per group).
    """
    start = time.perf_counter()
    shares = budget_shares(groups, budget)
    proxy = replace(settings, epochs=PROXY_EPOCHS, patience=PROXY_EPOCHS, batch_size=PROXY_BATCH,
                    lr=settings.lr * PROXY_LR_SCALE)
    results = dict(done or {})
    for g in tqdm(groups, desc="budget search", unit="group", disable=quiet or not (group or distributed.current()).is_main):
        if g.name in results:
            continue
        share = shares[g.name]
        ordered = sorted(candidates(g), key=lambda s: (encoded_bytes(g, s, codebook_itemsize), -s.codewords))
        tried = []

        def fits(k: int) -> bool:
            s = ordered[k]
            calibrator = Calibrator(teachers, build(g, s), data, heads, proxy, seed=seed, quiet=True,
                                    train_limit=PROXY_SAMPLES, group=group, desc=f"search {g.name}")
            calibrator.measure_int8_ranges()  # with --int8-aware, score every candidate on the int8 tables
            drop = fidelity_drop(calibrator)
            calibrated = drop > share   # an encoding that already fits needs no calibration
            if calibrated:
                calibrator.fit()
                drop = fidelity_drop(calibrator)
            tried.append({"r": s.r, "codewords": s.codewords, "bytes": encoded_bytes(g, s, codebook_itemsize),
                          "drop": drop, "calibrated": calibrated, "fits": drop <= share})
            return drop <= share

        # Binary search for the most compressive fitting candidate, assuming more bytes never fit worse
        # (roughly true: larger C or smaller r quantizes finer); ~log2(12) proxy calibrations per group.
        low, high = 0, len(ordered) - 1
        while low < high:
            mid = (low + high) // 2
            if fits(mid):
                high = mid
            else:
                low = mid + 1
        if not any(t["r"] == ordered[low].r and t["codewords"] == ordered[low].codewords for t in tried):
            fits(low)
        fitting = [t for t in tried if t["fits"]]
        chosen = min(fitting, key=lambda t: t["bytes"]) if fitting else min(tried, key=lambda t: (t["drop"], t["bytes"]))
        results[g.name] = {"name": g.name, "r": chosen["r"], "codewords": chosen["codewords"], "share": share,
                           "fits": chosen["fits"], "drop": chosen["drop"], "candidates": tried}
        if on_group is not None:
            on_group(results)
    return {"budget": budget, "seconds": round(time.perf_counter() - start, 1),
            "groups": [results[g.name] for g in groups]}


def fidelity_drop(calibrator: Calibrator) -> float:
    """The worst model's drop on the held-out slice, in percentage points.

    With labels: the original's accuracy minus the merged model's. Without: the *expected* accuracy
    drop with the original's probabilities as soft labels, mean of p(original's class) − p(merged
    model's class). Unlike 1 − top-1 agreement it counts a flip between two near-tied classes as
    the little it costs (on the LeNet pair it tracks the test accuracy drop; 1 − agreement is
    3–20× larger). Outputs that are not class scores: 100 × the held-out calibration loss.
    """
    drops = []
    with torch.no_grad():
        for m in calibrator.models:
            totals = torch.zeros(2, dtype=torch.float64)   # summed per-sample drop, samples
            shard = calibrator.group.shard(m.holdout)
            for k in range(0, len(shard), EVAL_BATCH):
                x, y = m.batch(shard[k:k + EVAL_BATCH])
                t_taps, t_out = m.run_teacher(x)
                s_taps, s_out = m.run_student(calibrator.student, x)
                if not m.classifies:
                    per_sample = calibration_loss(s_taps, t_taps, s_out, t_out, None, gamma=calibrator.settings.gamma,
                                                  temperature=calibrator.settings.temperature)
                else:
                    per_sample = _expected_accuracy_drop(t_out[0], s_out[0], y)
                totals += torch.tensor([float(per_sample.double().sum()), len(x)], dtype=torch.float64)
            calibrator.group.sum_(totals)
            drops.append(100.0 * float(totals[0]) / max(float(totals[1]), 1.0))
    return max(drops)


def _expected_accuracy_drop(teacher: torch.Tensor, student: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Per sample: correct(original) − correct(merged), with the original's softmax as labels when there are none."""
    predicted = student.argmax(1)
    if labels is not None:
        return (teacher.argmax(1) == labels).double() - (predicted == labels).double()
    p = torch.softmax(teacher.double(), dim=1)
    return p.max(dim=1).values - p.gather(1, predicted[:, None]).squeeze(1)
