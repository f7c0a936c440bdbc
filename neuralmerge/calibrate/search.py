"""Budgeted r/C search: the paper's manual per-layer sweep (§4.1), automated.

For each aligned group, candidates (r ∈ {4, 8, 16, 32} clipped to the depth, r = 1 for depth-1
inputs; C ∈ {64, 128, 256}) are ordered by compression (bytes of codebook + codes) and searched by
bisection for the most compressive one that fits. A candidate is scored by merging *only that
group*, calibrating briefly (one epoch on a subset) and measuring the fidelity drop on the
held-out calibration slice: 1 − top-1 agreement with the original, or the accuracy drop when
labels exist, worst model counted. A candidate fits when its drop is within the group's share of
the budget: budget / number of groups, in percentage points. If none fits, the one with the
smallest drop is taken. Groups are searched independently, as in the paper, so the whole model's
drop is only approximately the sum: the report shows the measured result after the final
calibration.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Callable

import numpy as np
import onnx
from tqdm.auto import tqdm

from ..align import Group
from ..graph.layers import Layer
from ..settings import CalibrationSettings, GroupSetting
from . import distributed
from .data import CalibrationSet
from .trainer import Calibrator

R_CHOICES = (4, 8, 16, 32)
C_CHOICES = (64, 128, 256)
SHORT_SAMPLES = 512   # training samples per model in a candidate's short calibration


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


def search(groups: list[Group], teachers: list[onnx.ModelProto], data: list[CalibrationSet], heads: list[Layer],
           settings: CalibrationSettings, budget: float, build: Callable[[Group, GroupSetting], onnx.ModelProto], *,
           seed: int = 0, quiet: bool = False, codebook_itemsize: int = 4, done: dict | None = None,
           on_group: Callable[[dict], None] | None = None, group: distributed.Group | None = None) -> dict:
    """Choose r/C for every group within ``budget`` (percentage points of fidelity drop).

    ``build(group, setting)`` returns a merged model with only that group encoded. ``done`` holds
    results of groups already searched (a resumed run); ``on_group`` gets the results so far after
    each group. Returns the search report (chosen setting and every scored candidate per group).
    """
    start = time.perf_counter()
    share = budget / len(groups)
    short = replace(settings, epochs=1, patience=1)
    results = dict(done or {})
    for g in tqdm(groups, desc="budget search", unit="group", disable=quiet or not (group or distributed.current()).is_main):
        if g.name in results:
            continue
        ordered = sorted(candidates(g), key=lambda s: (encoded_bytes(g, s, codebook_itemsize), -s.codewords))
        tried = []

        def fits(k: int) -> bool:
            s = ordered[k]
            calibrator = Calibrator(teachers, build(g, s), data, heads, short, seed=seed, quiet=True,
                                    train_limit=SHORT_SAMPLES, group=group, desc=f"search {g.name}")
            outcome = calibrator.fit()
            drop = 100.0 * max(_drop(ref, got) for ref, got in zip(calibrator.reference(), outcome.after))
            tried.append({"r": s.r, "codewords": s.codewords, "bytes": encoded_bytes(g, s, codebook_itemsize),
                          "drop": drop, "fits": drop <= share})
            return drop <= share

        # Binary search for the most compressive fitting candidate, assuming more bytes never fit worse
        # (roughly true: larger C or smaller r quantizes finer); ~log2(12) short calibrations per group.
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
        results[g.name] = {"name": g.name, "r": chosen["r"], "codewords": chosen["codewords"],
                           "fits": chosen["fits"], "drop": chosen["drop"], "candidates": tried}
        if on_group is not None:
            on_group(results)
    return {"budget": budget, "share_per_group": share, "seconds": round(time.perf_counter() - start, 1),
            "groups": [results[g.name] for g in groups]}


def _drop(reference: dict, measured: dict) -> float:
    """Fidelity drop of one model: accuracy drop with labels, else 1 − agreement, else the loss."""
    if measured["accuracy"] is not None:
        return reference["accuracy"] - measured["accuracy"]
    if measured["top1_agreement"] is not None:
        return 1.0 - measured["top1_agreement"]
    return float(np.float64(measured["loss"]))
