"""Registry of ONNX op converters for the torch importer.

A converter turns one ONNX node into torch computation: ``convert(ctx, inputs) -> outputs``, where
``inputs`` holds one tensor per node input (``None`` for an omitted optional input) and ``outputs``
one tensor per node output (trailing optional outputs may be left off). Attributes are parsed once
at construction into ``ctx.attrs``. A converter may also register

- ``validate(ctx)``: construction-time check of attribute values it cannot handle; it raises
  through ``ctx.unsupported(...)`` so a bad model fails when it is imported, not when it first runs;
- ``build(ctx, store) -> nn.Module``: a submodule made once from the node's constant inputs (the
  neuralmerge E-layers); the importer registers it and hands it back in ``ctx.module``.

The converters themselves live in ``ops_nn`` (layers, activations, pooling, resizing),
``ops_tensor`` (arithmetic, shape and indexing ops) and ``ops_neuralmerge`` (``ai.neuralmerge``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from neuralmerge.errors import ModelLoadError, UnsupportedOpError

DEFAULT_DOMAIN = ""
NEURALMERGE_DOMAIN = "ai.neuralmerge"

Tensor = torch.Tensor


class ConstantStore(Protocol):
    """What a ``build`` hook may read: the importer's parameters and constant buffers by ONNX name."""

    def parameter(self, name: str) -> nn.Parameter: ...

    def constant(self, name: str) -> Tensor: ...


@dataclass
class NodeContext:
    """One ONNX node as a converter sees it."""

    name: str
    op_type: str
    domain: str
    opset: int                      # version of the node's domain imported by the model
    attrs: dict[str, Any]
    input_names: list[str]
    output_names: list[str]
    module: Optional[nn.Module] = field(default=None, repr=False)

    def unsupported(self, detail: str) -> UnsupportedOpError:
        """An error for an attribute value (or input form) this converter does not handle."""
        return UnsupportedOpError(f"unsupported ONNX op {describe_op(self.op_type, self.domain)} "
                                  f"(node '{self.name}'): {detail}")


Converter = Callable[[NodeContext, list[Optional[Tensor]]], Sequence[Optional[Tensor]]]


@dataclass(frozen=True)
class OpSpec:
    convert: Converter
    validate: Optional[Callable[[NodeContext], None]] = None
    build: Optional[Callable[[NodeContext, ConstantStore], nn.Module]] = None


_REGISTRY: dict[tuple[str, str], OpSpec] = {}


def _canonical_domain(domain: str) -> str:
    return DEFAULT_DOMAIN if domain in ("", "ai.onnx") else domain


def register(*op_types: str, domain: str = DEFAULT_DOMAIN,
             validate: Optional[Callable[[NodeContext], None]] = None,
             build: Optional[Callable[[NodeContext, ConstantStore], nn.Module]] = None):
    """Decorator: register a converter for one or more op types of ``domain``."""

    def decorate(fn: Converter) -> Converter:
        for op_type in op_types:
            _REGISTRY[(_canonical_domain(domain), op_type)] = OpSpec(fn, validate, build)
        return fn

    return decorate


def lookup(op_type: str, domain: str) -> Optional[OpSpec]:
    """The converter registered for ``(domain, op_type)``, or None."""
    return _REGISTRY.get((_canonical_domain(domain), op_type))


def supported_ops() -> list[str]:
    """Sorted names of every supported op (``domain::Op`` outside the default domain)."""
    return sorted(op if not dom else f"{dom}::{op}" for dom, op in _REGISTRY)


def describe_op(op_type: str, domain: str) -> str:
    domain = _canonical_domain(domain)
    return f"'{op_type}'" + (f" in domain '{domain}'" if domain else "")


def unsupported_op_error(op_type: str, domain: str, node_name: str) -> UnsupportedOpError:
    """The one-line error for an op with no converter."""
    return UnsupportedOpError(f"unsupported ONNX op {describe_op(op_type, domain)} (node '{node_name}'); "
                              f"{len(_REGISTRY)} ops are supported, see neuralmerge.graph.ops.supported_ops()")


# ---------------------------------------------------------------- tensors and attributes

_ONNX_TO_TORCH = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.BOOL: torch.bool,
    # torch has only partial arithmetic for wide unsigned types: hold them in signed ones
    onnx.TensorProto.UINT16: torch.int32,
    onnx.TensorProto.UINT32: torch.int64,
    onnx.TensorProto.UINT64: torch.int64,
}

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16)


def torch_dtype(onnx_type: int, what: str = "tensor") -> torch.dtype:
    """torch dtype holding values of an ONNX element type."""
    try:
        return _ONNX_TO_TORCH[onnx_type]
    except KeyError:
        name = onnx.TensorProto.DataType.Name(onnx_type)
        raise ModelLoadError(f"{what} has element type {name}, which the importer cannot hold") from None


def tensor_from_proto(proto: onnx.TensorProto) -> Tensor:
    """A TensorProto as a torch tensor (bfloat16 goes through float32: numpy has no bfloat16)."""
    dtype = torch_dtype(proto.data_type, f"tensor '{proto.name}'")
    array = numpy_helper.to_array(proto)
    if proto.data_type == onnx.TensorProto.BFLOAT16:
        array = array.astype("float32")
    return torch.from_numpy(array.copy()).to(dtype)


def parse_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """Node attributes as Python values: ints, floats, str, lists of them, or torch tensors."""
    attrs: dict[str, Any] = {}
    for attr in node.attribute:
        if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise UnsupportedOpError(f"unsupported ONNX op '{node.op_type}' (node '{node.name}'): "
                                     "ops with subgraphs are not supported")
        if attr.ref_attr_name:
            raise ModelLoadError(f"node '{node.name}' has an unresolved function attribute '{attr.name}'")
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = tensor_from_proto(value)
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        attrs[attr.name] = value
    return attrs


def ints(t: Optional[Tensor]) -> list[int]:
    """A 1-D (or scalar) integer tensor as a Python list; shape tensors are small and on CPU."""
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def present(inputs: list[Optional[Tensor]], i: int) -> Optional[Tensor]:
    """Optional input ``i`` or None when omitted (missing, empty name, or an empty tensor)."""
    if i >= len(inputs) or inputs[i] is None or inputs[i].numel() == 0:
        return None
    return inputs[i]


# importing the converter modules fills the registry
from neuralmerge.graph import ops_nn, ops_tensor, ops_neuralmerge  # noqa: E402,F401
