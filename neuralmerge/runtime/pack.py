"""Write a merged ONNX file as a ``.nmpack``: the flat file the native runtime reads without protobuf.

Layout (all integers little-endian; docs/runtime.md has the full contract)::

    0   8 bytes  magic b"NMPACK\\r\\n"
    8   uint32   version (1)
    12  uint32   flags (0)
    16  uint64   header size in bytes
    24  uint64   data offset (64-byte aligned, >= 32 + header size)
    32  header   UTF-8 JSON: opset, inputs, outputs, tensors, nodes, elayers, metadata
    ..  zero padding, then tensor blobs at data offset + tensor["offset"] (each 64-byte aligned)

Packing uses only ``onnx`` and numpy. It folds everything that depends only on initializers
(``Constant`` nodes included) with onnx's reference evaluator, so the runtime sees constants,
not constant subgraphs; shape arithmetic on the batch size is left to the runtime's planner.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from neuralmerge.errors import NeuralMergeError

__all__ = ["ModelError", "MAGIC", "VERSION", "is_packed", "model_path", "pack_model"]

MAGIC = b"NMPACK\r\n"
VERSION = 1
_ALIGN = 64
_PREFIX = struct.Struct("<8sIIQQ")
# Element types the runtime reads; int32 shape constants are widened to int64 when packing.
_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(np.int64): "int64",
           np.dtype(np.uint8): "uint8", np.dtype(np.uint16): "uint16"}
_ELAYER_DOMAIN = "ai.neuralmerge"
# The runtime's smallest int8 input_scale but 0 (valid_input_scale in csrc/kernels/lut_internal.h).
_SMALLEST_INPUT_SCALE = 1e-30


class ModelError(NeuralMergeError, ValueError):
    """A model file is malformed, inconsistent, or uses an op the neuralmerge runtime cannot run."""


def model_path(model: str | os.PathLike) -> Path:
    """``model`` as the path of a non-empty file, or a one-line ModelError saying what it is instead."""
    path = Path(model)
    if not str(model):
        raise ModelError("no model file given (an empty path)")
    if path.is_dir():
        raise ModelError(f"{path} is a directory, not a model file")
    if not path.is_file():
        raise ModelError(f"no such model file: {path}")
    if path.stat().st_size == 0:
        raise ModelError(f"model file {path} is empty")
    return path


def is_packed(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` is an ``.nmpack`` (by its magic bytes, whatever its name)."""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def pack_model(model) -> bytes:
    """The ``.nmpack`` bytes of ``model`` (an ``onnx.ModelProto`` or the path of an ONNX file)."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        path = model_path(model)
        if is_packed(path):
            raise ModelError(f"{path} is already a .nmpack file (Session loads it as it is)")
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # protobuf raises its own untyped errors for corrupt files
            raise ModelError(f"cannot read ONNX file {path}: {_first_line(exc)}") from None
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 7:
        raise ModelError(f"the model imports ONNX opset {opset}; the neuralmerge runtime needs opset 7 or later")

    constants = {t.name: _tensor_array(t) for t in graph.initializer}
    nodes = _fold_constants(list(graph.node), constants, opset)
    used = {name for node in nodes for name in node.input if name} | {o.name for o in graph.output}
    constants = {name: array for name, array in constants.items() if name in used}

    outputs = list(graph.output)
    if any(not vi.type.tensor_type.HasField("shape") for vi in outputs):
        try:  # the runtime needs every output's rank; onnx can often infer what the file leaves out
            outputs = list(onnx.shape_inference.infer_shapes(model).graph.output)
        except Exception:  # noqa: BLE001 - then _io_spec names the output without a shape
            pass
    metadata = {p.key: p.value for p in model.metadata_props}
    header = {
        "format": "neuralmerge-pack",
        "opset": int(opset),
        "inputs": [_io_spec(vi) for vi in graph.input if vi.name not in constants and vi.name in used],
        "outputs": [_io_spec(vi) for vi in outputs],
        "tensors": [],
        "nodes": [_node_spec(node) for node in nodes],
        "elayers": _elayer_specs(nodes, metadata),
        "metadata": {k: v for k, v in metadata.items() if k in ("neuralmerge.format_version", "neuralmerge.models")},
    }
    if not header["inputs"]:
        raise ModelError("the model has no inputs the runtime could feed")
    blobs, offset = [], 0
    for name, array in constants.items():
        raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header["tensors"].append({"name": name, "dtype": _DTYPES[array.dtype], "shape": list(array.shape),
                                  "offset": offset, "size": len(raw)})
        blobs.append((offset, raw))
        offset = _aligned(offset + len(raw))

    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    data_offset = _aligned(_PREFIX.size + len(header_bytes))
    out = bytearray(data_offset + offset)
    _PREFIX.pack_into(out, 0, MAGIC, VERSION, 0, len(header_bytes), data_offset)
    out[_PREFIX.size:_PREFIX.size + len(header_bytes)] = header_bytes
    for blob_offset, raw in blobs:
        out[data_offset + blob_offset:data_offset + blob_offset + len(raw)] = raw
    return bytes(out)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _tensor_array(tensor) -> np.ndarray:
    from onnx import numpy_helper

    array = numpy_helper.to_array(tensor)
    if array.dtype == np.int32:
        array = array.astype(np.int64)
    if array.dtype not in _DTYPES:
        raise ModelError(f"tensor '{tensor.name}' has dtype {array.dtype}, which the neuralmerge runtime does not "
                         "store (float32, float16, int64, uint8, uint16)")
    return array


# Folding is for shape arithmetic and small constants. Ops whose output can dwarf their inputs
# are sized before they run: a file of a few bytes must not make packing allocate gigabytes.
_MAX_FOLDED_ELEMENTS = 1 << 24


def _folded_elements(node, constants: dict[str, np.ndarray]) -> int:
    """An upper bound on the elements of the node's output, for the ops that make large tensors
    out of small ones (0 for the others)."""
    ins = [constants[n] if n else None for n in node.input]
    if node.op_type == "ConstantOfShape":
        return _product(ins[0])
    if node.op_type in ("Expand", "Tile"):  # broadcast to a shape, or repeat
        return ins[0].size * _product(ins[1])
    if node.op_type == "Range":
        start, limit, delta = (float(np.ravel(v)[0]) for v in ins[:3])
        return math.ceil(abs((limit - start) / delta)) if delta else 0
    return 0


def _label(node) -> str:
    """How errors name a node: its name, or the first output of an unnamed one, and its op."""
    return f"'{node.name}' ({node.op_type})" if node.name else f"{node.op_type} -> '{node.output[0]}'"


def _product(values: np.ndarray) -> int:
    """Product of the magnitudes, in Python integers (an int64 product could wrap)."""
    return math.prod(abs(int(v)) for v in np.ravel(values))


def _fold_constants(nodes: list, constants: dict[str, np.ndarray], opset: int) -> list:
    """Evaluate every node whose inputs are all constants; return the nodes that remain."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    remaining = []
    for node in nodes:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            graph = helper.make_graph([node], "fold", [], [helper.make_empty_tensor_value_info(node.output[0])])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
            values = [ReferenceEvaluator(model).run(None, {})[0]]
        elif node.domain in ("", "ai.onnx") and node.input and all(not n or n in constants for n in node.input):
            try:
                elements = _folded_elements(node, constants)
                if elements > _MAX_FOLDED_ELEMENTS:
                    raise ModelError(f"constant node {_label(node)} would make {elements} elements "
                                     f"(at most {_MAX_FOLDED_ELEMENTS} are folded when packing)")
                graph = helper.make_graph(
                    [node], "fold", [], [helper.make_empty_tensor_value_info(o) for o in node.output if o],
                    initializer=[numpy_helper.from_array(constants[n], n) for n in set(node.input) if n])
                model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
                values = ReferenceEvaluator(model).run(None, {})
            except ModelError:
                raise
            except Exception as exc:  # the reference evaluator reports bad nodes with its own errors
                raise ModelError(f"cannot evaluate constant node {_label(node)}: "
                                 f"{_first_line(exc)}") from None
        else:
            remaining.append(node)
            continue
        for name, value in zip([o for o in node.output if o], values):
            array = np.asarray(value)
            constants[name] = array.astype(np.int64) if array.dtype == np.int32 else array
            if constants[name].dtype not in _DTYPES:
                raise ModelError(f"constant '{name}' has dtype {array.dtype}, which the runtime does not store")
    return remaining


def _io_spec(value_info) -> dict:
    from onnx import TensorProto

    tensor_type = value_info.type.tensor_type
    if tensor_type.elem_type != TensorProto.FLOAT:
        raise ModelError(f"graph input/output '{value_info.name}' is not float32; the neuralmerge runtime "
                         "runs float32 graphs only")
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor_type.shape.dim]
    if not tensor_type.HasField("shape"):
        raise ModelError(f"graph input/output '{value_info.name}' has no shape")
    return {"name": value_info.name, "dtype": "float32", "shape": shape}


def _node_spec(node) -> dict:
    from onnx import AttributeProto, helper

    attrs = {}
    for attr in node.attribute:
        if attr.ref_attr_name:
            raise ModelError(f"node '{node.name}' refers to a function attribute; pack the model, not a function")
        if attr.type in (AttributeProto.INT, AttributeProto.FLOAT, AttributeProto.INTS, AttributeProto.FLOATS):
            value = helper.get_attribute_value(attr)
            attrs[attr.name] = list(value) if isinstance(value, (list, tuple)) else value
        elif attr.type == AttributeProto.STRING:
            attrs[attr.name] = attr.s.decode("utf-8", errors="replace")
        else:
            raise ModelError(f"op '{node.op_type}' (node '{node.name}') has a {AttributeProto.AttributeType.Name(attr.type)} "
                             f"attribute '{attr.name}', which the neuralmerge runtime does not support; run this file "
                             "with onnxruntime.InferenceSession")
    return {"name": node.name, "op": node.op_type, "domain": node.domain, "inputs": list(node.input),
            "outputs": list(node.output), "attrs": attrs}


def _elayer_specs(nodes: list, metadata: dict[str, str]) -> dict:
    """Per E-layer node: C_v of each of its segments (from ``neuralmerge.groups``) and its int8 scale."""
    try:
        groups = json.loads(metadata.get("neuralmerge.groups", "[]"))
        scales = json.loads(metadata.get("neuralmerge.int8_scales", "{}"))
        codewords = {m["node"]: [int(c) for c in g["segment_codewords"][:int(m["segments"])]]
                     for g in groups for m in g["members"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"invalid neuralmerge metadata: {_first_line(exc)}") from None
    specs = {}
    for node in nodes:
        if node.domain != _ELAYER_DOMAIN:
            continue
        spec = {}
        if node.name in codewords:
            spec["segment_codewords"] = codewords[node.name]
        if node.name in scales:
            # The metadata holds the largest |input| seen in calibration; the kernels want the
            # quantisation step. /127 fits both of their modes (uint8 for inputs >= 0, int8 around
            # a zero point otherwise): the sign of an input is only known at run time.
            step = float(scales[node.name]) / 127.0
            # A step too small to invert (an input that was ~0 throughout calibration) would be
            # refused at load; 0 has the kernels take each call's own range instead.
            spec["input_scale"] = step if step >= _SMALLEST_INPUT_SCALE else 0.0
        if spec:
            specs[node.name] = spec
    return specs
