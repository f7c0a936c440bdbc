"""Build the one merged ONNX file from N normalised graphs and their encoded groups (docs/format.md)."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import __version__
from ..encode.kmeans import stored_as
from ..graph.layers import Layer
from ..graph.normalize import graph_inputs
from .functions import DOMAIN, VERSION, econv_function, egemm_function

FORMAT_VERSION = "1"


@dataclass
class EncodedMember:
    """One source layer's share of an encoded group."""
    layer: Layer
    codes: np.ndarray          # conv [p, kh, kw, rho], fc [n_out, rho]
    offsets: np.ndarray        # [rho] int64


@dataclass
class GroupArtifact:
    """What the exporter needs of one encoded group."""
    name: str
    kind: str
    r: int
    codebook: np.ndarray       # [K, r] float32
    segment_codewords: list
    members: list              # list[EncodedMember]
    info: dict                 # extra metadata (codewords asked, errors, ...)


def io_names(models: list[onnx.ModelProto]) -> list[dict[str, str]]:
    """Per model: original graph input/output name -> name in the merged graph.

    Names stay as they are unless several models use them; then every such name is ``m{i}.name``.
    """
    per_model = [{vi.name for vi in graph_inputs(m)} | {o.name for o in m.graph.output} for m in models]
    counts = Counter(name for names in per_model for name in names)
    taken = {name for name, count in counts.items() if count == 1}
    result = []
    for i, names in enumerate(per_model):
        mapping = {}
        for name in sorted(names):
            if counts[name] == 1:
                mapping[name] = name
                continue
            merged, k = f"m{i}.{name}", 0
            while merged in taken:  # another model may call its own tensor 'm0.input'
                k += 1
                merged = f"m{i}.{name}.{k}"
            taken.add(merged)
            mapping[name] = merged
        result.append(mapping)
    return result


def build_merged_model(models: list[onnx.ModelProto], sources: list[str], groups: list[GroupArtifact], *,
                       opset: int, codebook_dtype: str = "float32") -> onnx.ModelProto:
    """Union of the graphs, each encoded layer replaced by an ``EConv``/``EGemm`` call."""
    names = io_names(models)
    by_node = {(m.layer.model, m.layer.node): (g, m) for g in groups for m in g.members}
    nodes, initializers, inputs, outputs = [], [], [], []
    used_functions: set[str] = set()

    for g in groups:
        # Calibration may have moved the codewords since encoding: check float16's range again.
        cb = stored_as(g.codebook.astype(np.float32), codebook_dtype, g.name).astype(
            np.float16 if codebook_dtype == "float16" else np.float32)
        initializers.append(numpy_helper.from_array(cb, f"nm.{g.name}.codebook"))

    taken = {f"nm.{g.name}.codebook" for g in groups} | {
        f"m{m.layer.model}.{m.layer.node}.{part}" for g in groups for m in g.members
        for part in ("codes", "offsets", "depth", "bias")} | {merged for n in names for merged in n.values()}
    for i, model in enumerate(models):
        rename = _renamer(i, names[i], taken)
        graph = model.graph
        consumers = Counter(name for node in graph.node for name in node.input)
        fused_adds: dict[str, str] = {}   # Add node name -> output the EGemm takes over
        for node in graph.node:
            hit = by_node.get((i, node.name))
            if hit is None:
                continue
            g, member = hit
            if member.layer.op_type == "MatMul" and member.layer.bias_name is not None:
                add = _bias_add(graph, node, member.layer.bias_name, consumers)
                if add is not None:
                    fused_adds[add.name] = add.output[0]

        for node in graph.node:
            if node.name in fused_adds:
                continue
            hit = by_node.get((i, node.name))
            if hit is None:
                nodes.append(_renamed_node(node, rename))
                continue
            g, member = hit
            layer = member.layer
            prefix = f"m{i}.{layer.node}"
            out = node.output[0]
            bias = layer.bias
            if layer.op_type == "MatMul":
                add = _bias_add(graph, node, layer.bias_name, consumers) if layer.bias_name else None
                if add is not None:
                    out = add.output[0]
                else:
                    bias = None
            if bias is None:
                bias = np.zeros(layer.weight.shape[0], np.float32)
            initializers += [
                numpy_helper.from_array(np.ascontiguousarray(member.codes), f"{prefix}.codes"),
                numpy_helper.from_array(member.offsets.astype(np.int64), f"{prefix}.offsets"),
                numpy_helper.from_array(np.array([layer.depth], np.int64), f"{prefix}.depth"),
                numpy_helper.from_array(bias.astype(np.float32).reshape(-1), f"{prefix}.bias"),
            ]
            call_inputs = [rename(node.input[0]), f"nm.{g.name}.codebook", f"{prefix}.codes",
                           f"{prefix}.offsets", f"{prefix}.depth", f"{prefix}.bias"]
            if g.kind == "conv":
                a = layer.attrs
                nodes.append(helper.make_node("EConv", call_inputs, [rename(out)], name=rename(node.name),
                                              domain=DOMAIN, strides=list(a["strides"]), pads=list(a["pads"]),
                                              dilations=list(a["dilations"]), group=int(a["group"])))
                used_functions.add("EConv")
            else:
                nodes.append(helper.make_node("EGemm", call_inputs, [rename(out)], name=rename(node.name),
                                              domain=DOMAIN))
                used_functions.add("EGemm")

        for t in graph.initializer:
            copy = onnx.TensorProto()
            copy.CopyFrom(t)
            copy.name = rename(t.name)
            initializers.append(copy)
        for vi in graph_inputs(model):
            inputs.append(_renamed_value_info(vi, rename, i))
        for vi in graph.output:
            outputs.append(_renamed_value_info(vi, rename, i))

    initializers = _drop_unused(initializers, nodes, outputs)
    merged_graph = helper.make_graph(nodes, "neuralmerge_merged", inputs, outputs, initializers)
    functions = [f(opset) for name, f in (("EConv", econv_function), ("EGemm", egemm_function)) if name in used_functions]
    merged = helper.make_model(
        merged_graph, functions=functions, producer_name="neuralmerge", producer_version=__version__,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, VERSION)],
        ir_version=max(8, max(m.ir_version for m in models)))
    _add_metadata(merged, models, sources, names, groups, codebook_dtype)
    return merged


def _renamer(i: int, keep: dict[str, str], taken: set[str]):
    """Model i's names in the merged graph: ``m{i}.name``, unless ``keep`` keeps an input/output
    name, and never one of the names the E-layers' constants take (``taken``: a source node
    'conv1' with an initializer 'conv1.bias' would give the E-layer's bias name again)."""
    def rename(name: str) -> str:
        if not name or name in keep:
            return keep.get(name, name)
        renamed = f"m{i}.{name}"
        while renamed in taken:
            renamed += ".src"
        return renamed
    return rename


def _renamed_node(node: onnx.NodeProto, rename) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = rename(node.name)
    del copy.input[:]
    copy.input.extend(rename(n) for n in node.input)
    del copy.output[:]
    copy.output.extend(rename(n) for n in node.output)
    for attr in copy.attribute:  # nested graphs (If/Loop bodies) read and write names too
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            _rename_subgraph(sub, rename)
    return copy


def _rename_subgraph(graph: onnx.GraphProto, rename) -> None:
    for node in graph.node:
        renamed = _renamed_node(node, rename)
        node.CopyFrom(renamed)
    for coll in (graph.input, graph.output, graph.value_info):
        for vi in coll:
            vi.name = rename(vi.name)
    for t in graph.initializer:
        t.name = rename(t.name)


def _renamed_value_info(vi: onnx.ValueInfoProto, rename, model_index: int) -> onnx.ValueInfoProto:
    """Rename the tensor and prefix its symbolic dimensions: one model's batch size is not another's."""
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(vi)
    copy.name = rename(vi.name)
    for dim in copy.type.tensor_type.shape.dim:
        if dim.HasField("dim_param"):
            dim.dim_param = f"m{model_index}.{dim.dim_param}"
    return copy


def _bias_add(graph: onnx.GraphProto, matmul: onnx.NodeProto, bias_name: str | None, consumers: Counter):
    """The ``Add(matmul_out, bias)`` that follows a MatMul, if the EGemm can absorb it."""
    out = matmul.output[0]
    if bias_name is None or consumers[out] != 1:
        return None
    for node in graph.node:
        if node.op_type == "Add" and out in node.input and bias_name in node.input and len(node.input) == 2:
            return node
    return None


def _drop_unused(initializers: list, nodes: list, outputs: list) -> list:
    used = {name for n in nodes for name in n.input} | {o.name for o in outputs}
    for n in nodes:
        for attr in n.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                used |= {name for sn in sub.node for name in sn.input}
    return [t for t in initializers if t.name in used]


def _add_metadata(merged: onnx.ModelProto, models, sources, names, groups, codebook_dtype) -> None:
    model_info = []
    for i, (model, src) in enumerate(zip(models, sources)):
        model_info.append({
            "index": i, "prefix": f"m{i}.", "source": src,
            "inputs": [{"name": names[i][vi.name], "original": vi.name} for vi in graph_inputs(model)],
            "outputs": [{"name": names[i][vi.name], "original": vi.name} for vi in model.graph.output],
        })
    group_info = []
    for g in groups:
        group_info.append({
            "name": g.name, "kind": g.kind, "r": g.r, "segment_codewords": list(map(int, g.segment_codewords)),
            "segments": len(g.segment_codewords), "codebook": f"nm.{g.name}.codebook",
            "members": [{"model": m.layer.model, "node": f"m{m.layer.model}.{m.layer.node}",
                         "source_node": m.layer.node, "depth": m.layer.depth, "segments": int(m.codes.shape[-1])}
                        for m in g.members],
            **g.info,
        })
    props = {
        "neuralmerge.format_version": FORMAT_VERSION,
        "neuralmerge.models": json.dumps(model_info),
        "neuralmerge.groups": json.dumps(group_info),
        "neuralmerge.codebook_dtype": codebook_dtype,
    }
    helper.set_model_props(merged, props)
