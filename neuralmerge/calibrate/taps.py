"""Which tensors calibration compares and trains: E-layer outputs paired with the originals' tensors.

The exporter names model i's tensors ``m{i}.<name>`` in the merged graph, except graph inputs and
outputs whose names no other model uses (docs/format.md). So the original (normalised) model's
tensor behind a merged E-layer output ``M`` is ``M`` without the ``m{i}.`` prefix, or ``M`` itself.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import onnx

from ..graph.layers import Layer


@dataclass(frozen=True)
class Tap:
    """One encoded layer of one model."""
    node: str       # merged E-layer node name
    student: str    # its output tensor in the merged graph
    teacher: str    # the same tensor in the normalised source model
    input: str      # its input tensor in the merged graph (int8 activation ranges are measured here)


@dataclass
class ModelView:
    """How model i appears in the merged graph."""
    index: int
    inputs: dict[str, str]      # original input name -> merged name
    outputs: dict[str, str]     # original output name -> merged name
    taps: list[Tap] = field(default_factory=list)


def metadata(model: onnx.ModelProto, key: str):
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props[f"neuralmerge.{key}"])


def model_views(merged: onnx.ModelProto) -> list[ModelView]:
    """Per source model: its I/O names and its E-layer taps, from the merged file's metadata."""
    nodes = {n.name: n for n in merged.graph.node}
    views = [ModelView(m["index"], {e["original"]: e["name"] for e in m["inputs"]},
                       {e["original"]: e["name"] for e in m["outputs"]}) for m in metadata(merged, "models")]
    for group in metadata(merged, "groups"):
        for member in group["members"]:
            i = member["model"]
            node = nodes[member["node"]]
            out = node.output[0]
            prefix = f"m{i}."
            teacher = out[len(prefix):] if out.startswith(prefix) else out
            views[i].taps.append(Tap(node.name, out, teacher, node.input[0]))
    return views


def trainable_names(merged: onnx.ModelProto, heads: list[Layer]) -> list[str]:
    """Initializers calibration trains: codebooks, E-layer biases and the dense heads' weights and biases.

    Codes stay fixed (they are integers); every other layer stays frozen.
    """
    initializers = {t.name for t in merged.graph.initializer}
    views = model_views(merged)
    names = [g["codebook"] for g in metadata(merged, "groups")]
    names += [n.input[5] for n in merged.graph.node if n.domain == "ai.neuralmerge"]
    for layer in heads:
        keep = {**views[layer.model].inputs, **views[layer.model].outputs}
        for name in (layer.weight_name, layer.bias_name):
            if name is not None:
                names.append(keep.get(name, f"m{layer.model}.{name}"))
    seen: set[str] = set()
    return [n for n in names if n in initializers and not (n in seen or seen.add(n))]
