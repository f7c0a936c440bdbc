"""Bring source graphs to one canonical form before they are analysed, encoded and merged.

After ``normalize``: one opset for the default domain, no local functions (other than
neuralmerge's own), Constant nodes are initializers, every node has a unique name, input
shapes are pinned, BatchNormalization that follows a Conv is folded into its weights, and
Conv ``auto_pad`` is replaced by explicit ``pads``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference, version_converter

from ..errors import ConfigError, ModelLoadError
from .importer import inline_foreign_functions


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple            # ints; None for a dynamic batch dimension
    dtype: np.dtype


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ModelLoadError("model declares no default-domain opset")


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers (IR < 4 lists both)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    specs = []
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        specs.append(TensorSpec(vi.name, shape, helper.tensor_dtype_to_np_dtype(tt.elem_type)))
    return specs


def output_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    specs = []
    for vi in model.graph.output:
        tt = vi.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        specs.append(TensorSpec(vi.name, shape, helper.tensor_dtype_to_np_dtype(tt.elem_type)))
    return specs


def normalize(model: onnx.ModelProto, *, opset: int | None = None,
              input_shapes: dict[str, tuple[int, ...]] | None = None, label: str = "model") -> onnx.ModelProto:
    """Return a normalised copy of ``model`` (see module docstring). ``label`` names it in errors."""
    _check_finite(model, label)
    model = inline_foreign_functions(model)
    if opset is not None and default_opset(model) != opset:
        model = _convert_opset(model, opset, label)
    else:
        model = _copy(model)
    _constants_to_initializers(model.graph)
    _name_nodes(model.graph)
    _pin_input_shapes(model, input_shapes or {}, label)
    model = shape_inference.infer_shapes(model)
    _fold_batchnorm(model.graph)
    _resolve_conv_padding(model, label)
    _remove_unused_initializers(model.graph)
    model = shape_inference.infer_shapes(model)
    _check_layer_inputs(model, label)
    return model


def _check_finite(model: onnx.ModelProto, label: str) -> None:
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            values = numpy_helper.to_array(t)
            if not np.isfinite(values).all():
                raise ModelLoadError(f"{label}: initializer '{t.name}' contains NaN or Inf values")


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _convert_opset(model: onnx.ModelProto, opset: int, label: str) -> onnx.ModelProto:
    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{label}: cannot convert from opset {default_opset(model)} to {opset}: {msg}") from exc


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            attr = node.attribute[0]
            value = None
            if attr.name == "value":
                value = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_int"):
                value = np.array(attr.f if attr.name == "value_float" else attr.i,
                                 dtype=np.float32 if attr.name == "value_float" else np.int64)
            elif attr.name in ("value_floats", "value_ints"):
                value = np.array(list(attr.floats) if attr.name == "value_floats" else list(attr.ints),
                                 dtype=np.float32 if attr.name == "value_floats" else np.int64)
            if value is not None:
                graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                continue
        keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _name_nodes(graph: onnx.GraphProto) -> None:
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def _pin_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], label: str) -> None:
    for vi in graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        given = shapes.get(vi.name)
        if given is not None:
            if len(given) != len(dims):
                raise ConfigError(f"--input-shape {vi.name}: {label} expects rank {len(dims)}, got {len(given)}")
            for k, (d, g) in enumerate(zip(dims, given)):
                if g is None:  # N: the batch as the model has it
                    if not d.HasField("dim_value") and not d.dim_param:
                        d.Clear()
                        d.dim_param = "N"
                    continue
                if d.HasField("dim_value") and d.dim_value != g:  # the graph's other shapes assume it
                    raise ConfigError(f"--input-shape {vi.name}: dimension {k} of {label} is fixed at "
                                      f"{d.dim_value}, not {g}")
                d.Clear()
                d.dim_value = int(g)
            continue
        for k, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            if d.HasField("dim_value"):
                raise ModelLoadError(f"input '{vi.name}' of {label} declares dimension {k} as {d.dim_value} (an empty tensor)")
            if k == 0:  # a dynamic batch dimension is fine everywhere; keep its name if it has one
                if not d.dim_param:
                    d.Clear()
                    d.dim_param = "N"
                continue
            shape = "x".join(str(x.dim_value) if x.HasField("dim_value") else "?" for x in dims)
            raise ConfigError(f"input '{vi.name}' of {label} has a dynamic dimension {k} ({shape}); "
                              f"pin it with --input-shape {vi.name}=...")


def _fold_batchnorm(graph: onnx.GraphProto) -> None:
    """Fold ``BN(Conv(x, W, b))`` into ``Conv(x, W', b')`` when the Conv feeds only that BN."""
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producer = {out: node for node in graph.node for out in node.output}
    graph_outputs = {o.name for o in graph.output}
    removed: set[str] = set()
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or any(bn.output[1:]):
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or conv.output[0] in graph_outputs:
            continue
        if len(consumers.get(conv.output[0], [])) != 1 or conv.input[1] not in inits:
            continue
        if any(name not in inits for name in bn.input[1:5]):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in bn.attribute}
        if attrs.get("training_mode", 0) or attrs.get("spatial", 1) != 1:
            continue
        eps = float(attrs.get("epsilon", 1e-5))
        scale, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        has_bias = len(conv.input) > 2 and conv.input[2] != ""
        if has_bias and conv.input[2] not in inits:
            continue
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if has_bias else np.zeros(w.shape[0])
        s = scale / np.sqrt(var + eps)
        w_name, b_name = f"{conv.name}.weight_bnfold", f"{conv.name}.bias_bnfold"
        graph.initializer.append(numpy_helper.from_array((w * s.reshape(-1, *[1] * (w.ndim - 1))).astype(np.float32), w_name))
        graph.initializer.append(numpy_helper.from_array(((b - mean) * s + beta).astype(np.float32), b_name))
        x = conv.input[0]
        del conv.input[:]
        conv.input.extend([x, w_name, b_name])
        conv.output[0] = bn.output[0]
        removed.add(bn.name)
    if removed:
        keep = [n for n in graph.node if n.name not in removed]
        del graph.node[:]
        graph.node.extend(keep)


def _resolve_conv_padding(model: onnx.ModelProto, label: str) -> None:
    """Replace Conv ``auto_pad`` with explicit pads and fill every default attribute."""
    shapes = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.input)}
    for node in model.graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        kernel = attrs.get("kernel_shape")
        if kernel is None:
            w = next((t for t in model.graph.initializer if t.name == node.input[1]), None)
            if w is None:
                continue  # a weight computed at run time: not mergeable, left as it is
            kernel = list(w.dims[2:])
        nd = len(kernel)
        strides = list(attrs.get("strides", [1] * nd))
        dilations = list(attrs.get("dilations", [1] * nd))
        pads = list(attrs.get("pads", [0] * 2 * nd))
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            vi = shapes.get(node.input[0])
            dims = [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim] if vi else []
            spatial = dims[2:] if len(dims) == nd + 2 else [0] * nd
            # At stride 1 the padding is (k - 1) * dilation whatever the size; only strided axes
            # need the size, which shape inference loses after a computed Pad or Resize.
            unknown = [k for k in range(nd) if strides[k] > 1 and spatial[k] <= 0]
            if unknown:
                raise ModelLoadError(
                    f"{label}: Conv '{node.name}' uses auto_pad={auto_pad} with stride {strides[unknown[0]]}, which "
                    "needs its input's spatial size, and shape inference cannot tell it (pin dynamic model inputs "
                    "with --input-shape; a size computed inside the model cannot be pinned: re-export with explicit pads)")
            pads = [0] * 2 * nd
            for k in range(nd):
                if strides[k] == 1:
                    total = (kernel[k] - 1) * dilations[k]
                else:
                    out = math.ceil(spatial[k] / strides[k])
                    total = max((out - 1) * strides[k] + (kernel[k] - 1) * dilations[k] + 1 - spatial[k], 0)
                small = total // 2
                pads[k], pads[k + nd] = (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
        elif auto_pad == "VALID":
            pads = [0] * 2 * nd
        del node.attribute[:]
        node.attribute.extend([
            helper.make_attribute("kernel_shape", list(kernel)),
            helper.make_attribute("strides", strides),
            helper.make_attribute("pads", pads),
            helper.make_attribute("dilations", dilations),
            helper.make_attribute("group", int(attrs.get("group", 1))),
        ])


def _check_layer_inputs(model: onnx.ModelProto, label: str) -> None:
    """A Conv or Gemm/MatMul whose weight does not fit its input's known channel or feature count:
    onnx's checker and shape inference let it pass, and onnxruntime fails only when run."""
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    dims = {}
    for vi in list(model.graph.value_info) + list(model.graph.input):
        shape = vi.type.tensor_type.shape
        dims[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[1] not in weights:
            continue
        x, w = dims.get(node.input[0]), weights[node.input[1]]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv" and x and len(x) > 1 and len(w) > 1:
            want, what, have = w[1] * int(attrs.get("group", 1)), "input channels", x[1]
        elif node.op_type == "Gemm" and x and len(x) == 2 and len(w) == 2:
            want, what = w[1] if attrs.get("transB", 0) else w[0], "input features"
            have = x[1 - int(attrs.get("transA", 0))]
        elif node.op_type == "MatMul" and x and len(w) >= 2:
            want, what, have = w[-2], "input features", x[-1]
        else:
            continue
        if have and want != have:  # None or 0: not known
            raise ModelLoadError(f"{label}: {node.op_type} '{node.name}' expects {want} {what} (weight "
                                 f"{'x'.join(map(str, w))}) but its input '{node.input[0]}' has {have}")


def _remove_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    used |= _subgraph_inputs(graph)
    unused = {t.name for t in graph.initializer} - used
    if not unused:
        return
    keep = [t for t in graph.initializer if t.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    keep_inputs = [vi for vi in graph.input if vi.name not in unused]  # IR < 4 lists initializers as inputs
    del graph.input[:]
    graph.input.extend(keep_inputs)


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names that nested graphs (If/Loop bodies) read from the outer scope."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                names |= {name for n in sub.node for name in n.input} | _subgraph_inputs(sub)
    return names
