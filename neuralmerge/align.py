"""Align the mergeable layers of N models into groups that share one codebook.

NeuralMerger (§3.1) pairs same-type layers with a strictly increasing mapping. We generalise it
to N models and let both sides leave layers unmatched: per kind (conv with conv, fc with fc) every
model is aligned to a reference model (the one with the most layers of that kind) by an
order-preserving dynamic programme (Needleman–Wunsch) that maximises the summed similarity of
matched pairs minus a cost per unmatched layer. Written by hand: it is a few lines over a tiny
matrix and no library scores layer pairs this way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from neuralmerge.graph.layers import Layer

# Similarity of two layers = MATCH_BONUS minus weighted log-ratio / position penalties.
MATCH_BONUS = 1.0
DEPTH_WEIGHT = 0.5      # per doubling of kernel depth: r is clipped to the smaller depth of a group
CHANNELS_WEIGHT = 0.25  # per doubling of output channels
POSITION_WEIGHT = 0.5   # per unit of relative-position difference (0 = first layer, 1 = last)
GAP_COST = 0.1          # per unmatched layer; a pair is matched only if similarity > -2 * GAP_COST

KINDS = ("conv", "fc")


@dataclass
class Group:
    """Layers (at most one per model) encoded with one shared codebook."""
    name: str                 # "conv1", "conv2", …, "fc1", …
    kind: str                 # "conv" | "fc"
    members: list[Layer]


def similarity(a: Layer, pos_a: float, b: Layer, pos_b: float) -> float:
    """How well two same-kind layers fit one codebook (higher is better; 1.0 for identical shapes)."""
    depth = abs(math.log2(a.depth / b.depth))
    channels = abs(math.log2(a.weight.shape[0] / b.weight.shape[0]))
    return MATCH_BONUS - DEPTH_WEIGHT * depth - CHANNELS_WEIGHT * channels - POSITION_WEIGHT * abs(pos_a - pos_b)


def _relative_positions(n: int) -> list[float]:
    return [i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def match_layers(reference: list[Layer], other: list[Layer]) -> list[int | None]:
    """Order-preserving alignment: for each layer of ``other``, the index of its reference partner or None."""
    n, m = len(reference), len(other)
    pos_r, pos_o = _relative_positions(n), _relative_positions(m)
    # score[i][j]: best total for reference[:i] vs other[:j]; move[i][j]: how it was reached
    score = [[-GAP_COST * (i + j) for j in range(m + 1)] for i in range(n + 1)]
    move = [["up" if j == 0 else "left" for j in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            options = (
                (score[i - 1][j - 1] + similarity(reference[i - 1], pos_r[i - 1], other[j - 1], pos_o[j - 1]), "diag"),
                (score[i - 1][j] - GAP_COST, "up"),
                (score[i][j - 1] - GAP_COST, "left"),
            )
            score[i][j], move[i][j] = max(options, key=lambda o: o[0])  # ties: first option (match) wins
    partner: list[int | None] = [None] * m
    i, j = n, m
    while i > 0 or j > 0:
        step = move[i][j] if i > 0 and j > 0 else ("up" if i > 0 else "left")
        if step == "diag":
            partner[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif step == "up":
            i -= 1
        else:
            j -= 1
    return partner


def align(layers_per_model: list[list[Layer]]) -> list[Group]:
    """Group the layers of N models (conv groups first, then fc groups), named in reference order."""
    groups: list[Group] = []
    for kind in KINDS if layers_per_model else ():
        per_model = [[layer for layer in layers if layer.kind == kind] for layers in layers_per_model]
        ref = max(range(len(per_model)), key=lambda k: (len(per_model[k]), -k))  # ties: lowest index
        if not per_model[ref]:
            continue
        slots = [[layer] for layer in per_model[ref]]           # one slot per reference layer
        after: list[list[Layer]] = [[] for _ in range(len(slots) + 1)]  # unmatched, placed after slot k-1
        for k, layers in enumerate(per_model):
            if k == ref:
                continue
            anchor = 0  # slot index + 1 of the nearest preceding matched layer (0 = before everything)
            for layer, partner in zip(layers, match_layers(per_model[ref], layers)):
                if partner is None:
                    after[anchor].append(layer)
                else:
                    slots[partner].append(layer)
                    anchor = partner + 1
        ordered = [[layer] for layer in after[0]]
        for k, slot in enumerate(slots):
            ordered.append(sorted(slot, key=lambda layer: layer.model))
            ordered.extend([layer] for layer in after[k + 1])
        groups.extend(Group(f"{kind}{i + 1}", kind, members) for i, members in enumerate(ordered))
    return groups
