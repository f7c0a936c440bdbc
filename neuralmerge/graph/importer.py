"""ONNX -> torch: an executable, differentiable ``nn.Module`` from an ONNX CNN.

Float initializers become ``nn.Parameter``s (one per initializer, however many nodes read it),
integer and bool initializers and ``Constant`` node values become buffers. Nodes run in
topological order through the converter registry of ``neuralmerge.graph.ops``; ``run`` evaluates
only the nodes that the requested tensors depend on, so one model of a merged graph, or one
intermediate layer output, can be computed alone. ``write_back`` puts trained values back into a
copy of an ONNX model.

fp16 / bf16 initializers are held as float32 Parameters (a master copy that trains well) and cast
to their stored type whenever a node reads them, so the graph computes with the types it declares.
"""
from __future__ import annotations

import heapq
import os
import re
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import onnx
import onnx.inliner
import torch
from onnx import numpy_helper
from torch import nn

from neuralmerge.errors import ModelLoadError, NeuralMergeError
from neuralmerge.graph.ops import (FLOAT_TYPES, Converter, NodeContext, OpSpec, lookup, parse_attributes,
                                   tensor_from_proto, unsupported_op_error)
from neuralmerge.io.onnx_files import load_model

Tensor = torch.Tensor


def import_onnx(model: Union[str, os.PathLike, onnx.ModelProto]) -> "OnnxModule":
    """Load an ONNX file (or take a ModelProto) and return it as an ``OnnxModule``."""
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    return OnnxModule(model)


def inline_foreign_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inline every model-local function that has no converter of its own (E-layer calls stay calls)."""
    keep = [(f.domain, f.name) for f in model.functions if lookup(f.name, f.domain) is not None]
    if len(keep) == len(model.functions):
        return model
    return onnx.inliner.inline_selected_functions(model, keep, exclude=True)


def _attribute_name(onnx_name: str, taken: nn.Module) -> str:
    """A valid, unused attribute name for an ONNX tensor or node name."""
    name = re.sub(r"\W", "_", onnx_name) or "_"
    if name[0].isdigit():
        name = "_" + name
    while hasattr(taken, name):
        name += "_"
    return name


def _topological_order(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Nodes in an order where each runs after the producers of its inputs (stable Kahn's algorithm)."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting_on = [{n for n in node.input if n and n not in available} for node in nodes]
    for node, deps in zip(nodes, waiting_on):
        undefined = [n for n in deps if n not in producer]
        if undefined:
            raise ModelLoadError(f"node '{node.name or node.op_type}' reads undefined tensor '{undefined[0]}'")
    consumers: dict[int, list[int]] = {}
    for i, deps in enumerate(waiting_on):
        for name in deps:
            consumers.setdefault(producer[name], []).append(i)
    blocked = [len({producer[n] for n in deps}) for deps in waiting_on]
    ready = [i for i, count in enumerate(blocked) if count == 0]  # a heap: the file's order among ready nodes
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in set(consumers.get(i, [])):
            blocked[j] -= 1
            if blocked[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ModelLoadError("the ONNX graph has a cycle")
    return [nodes[i] for i in order]


@dataclass
class _Step:
    ctx: NodeContext
    convert: Converter


@dataclass
class _Plan:
    steps: list[_Step]
    release: list[list[str]]   # tensors whose last reader is steps[i]: dropped after it runs
    feeds: list[str]           # graph inputs the plan reads


class _Store:
    """The importer's constants by ONNX name, as ``build`` hooks see them."""

    def __init__(self, module: "OnnxModule"):
        self._module = module

    def parameter(self, name: str) -> nn.Parameter:
        if name not in self._module._param_keys:
            raise ModelLoadError(f"'{name}' must be a float initializer")
        return self._module.params[self._module._param_keys[name]]

    def constant(self, name: str) -> Tensor:
        if name not in self._module._buffer_keys:
            raise ModelLoadError(f"'{name}' must be a constant integer initializer")
        return getattr(self._module.constants, self._module._buffer_keys[name])


def _node_context(node: onnx.NodeProto, name: str, opsets: dict[str, int]) -> tuple[OpSpec, NodeContext]:
    """The converter of ``node`` and its parsed context; unsupported ops and attributes raise here."""
    spec = lookup(node.op_type, node.domain)
    if spec is None:
        raise unsupported_op_error(node.op_type, node.domain, name)
    domain = "" if node.domain == "ai.onnx" else node.domain
    ctx = NodeContext(name=name, op_type=node.op_type, domain=domain, opset=opsets.get(domain, 1),
                      attrs=parse_attributes(node), input_names=list(node.input), output_names=list(node.output))
    if spec.validate is not None:
        spec.validate(ctx)
    return spec, ctx


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}


def check_supported(model: onnx.ModelProto) -> None:
    """Raise ``UnsupportedOpError`` for the first node the importer cannot convert, building nothing."""
    model = inline_foreign_functions(model)
    opsets = _opsets(model)
    for index, node in enumerate(model.graph.node):
        _node_context(node, node.name or f"{node.op_type}_{index}", opsets)


class OnnxModule(nn.Module):
    """An ONNX graph as a torch module.

    ``forward(*inputs)`` takes the graph inputs in order and returns the single output or a tuple;
    ``run(feeds, outputs)`` returns any named tensors, computing only what they need.
    """

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        model = inline_foreign_functions(model)
        graph = model.graph
        opsets = _opsets(model)
        self.params = nn.ParameterDict()
        self.constants = nn.Module()   # holds integer / bool initializers and Constant values as buffers
        self.elayers = nn.ModuleDict()  # submodules built by converters (the E-layers)
        self._param_keys: dict[str, str] = {}
        self._buffer_keys: dict[str, str] = {}
        self._elayer_keys: dict[str, str] = {}  # node name -> key in self.elayers
        self._stored_dtype: dict[str, torch.dtype] = {}  # float initializers not stored as float32/64
        for proto in graph.initializer:
            self._add_initializer(proto)

        self.input_names = [i.name for i in graph.input if i.name not in self._param_keys
                            and i.name not in self._buffer_keys]
        self.output_names = [o.name for o in graph.output]

        store = _Store(self)
        available = set(self.input_names) | set(self._param_keys) | set(self._buffer_keys)
        self._steps: list[_Step] = []
        for index, node in enumerate(_topological_order(list(graph.node), available)):
            self._add_node(node, node.name or f"{node.op_type}_{index}", opsets, store)
        self._producer = {out: i for i, step in enumerate(self._steps) for out in step.ctx.output_names if out}
        self._plans: dict[tuple[str, ...], _Plan] = {}

    # ------------------------------------------------------------ construction

    def _add_initializer(self, proto: onnx.TensorProto) -> None:
        value = tensor_from_proto(proto)
        if proto.data_type in FLOAT_TYPES:
            if value.dtype in (torch.float16, torch.bfloat16):
                self._stored_dtype[proto.name] = value.dtype
                value = value.float()
            key = _attribute_name(proto.name, self.params)
            self.params[key] = nn.Parameter(value)
            self._param_keys[proto.name] = key
        else:
            self._add_buffer(proto.name, value)

    def _add_buffer(self, onnx_name: str, value: Tensor) -> None:
        key = _attribute_name(onnx_name, self.constants)
        self.constants.register_buffer(key, value)
        self._buffer_keys[onnx_name] = key

    def _add_node(self, node: onnx.NodeProto, name: str, opsets: dict[str, int], store: _Store) -> None:
        spec, ctx = _node_context(node, name, opsets)
        if node.op_type == "Constant" and not ctx.domain:  # fold: its value is known now
            self._add_buffer(node.output[0], spec.convert(ctx, [])[0])
            return
        if spec.build is not None:
            ctx.module = spec.build(ctx, store)
            self._elayer_keys[name] = _attribute_name(name, self.elayers)
            self.elayers[self._elayer_keys[name]] = ctx.module
        self._steps.append(_Step(ctx, spec.convert))

    # ------------------------------------------------------------ parameters

    def elayer(self, node_name: str) -> nn.Module:
        """The E-layer module built for the ONNX node ``node_name``."""
        return self.elayers[self._elayer_keys[node_name]]

    @property
    def onnx_params(self) -> dict[str, nn.Parameter]:
        """ONNX initializer name -> its Parameter (float initializers only)."""
        return {name: self.params[key] for name, key in self._param_keys.items()}

    def write_back(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``model`` whose float initializers hold this module's current parameter values,
        each in the initializer's stored element type."""
        result = onnx.ModelProto()
        result.CopyFrom(model)
        for proto in result.graph.initializer:
            key = self._param_keys.get(proto.name)
            if key is None:
                continue
            value = self.params[key].detach().cpu()
            if tuple(value.shape) != tuple(proto.dims):
                raise NeuralMergeError(f"initializer '{proto.name}' has shape {list(proto.dims)} in the model "
                                       f"but {list(value.shape)} in the module")
            np_dtype = onnx.helper.tensor_dtype_to_np_dtype(proto.data_type)
            wide = value.to(torch.float64).numpy()
            with np.errstate(over="ignore"):
                array = wide.astype(np_dtype)
            if not np.isfinite(array).all() and np.isfinite(wide).all():  # e.g. a float16 codebook trained past 65504
                raise NeuralMergeError(f"initializer '{proto.name}' now holds values up to {np.abs(wide).max():.6g}, "
                                       f"beyond {np.dtype(np_dtype).name}'s range")
            proto.CopyFrom(numpy_helper.from_array(array, proto.name))
        return result

    # ------------------------------------------------------------ execution

    def forward(self, *inputs: Tensor):
        if len(inputs) != len(self.input_names):
            raise NeuralMergeError(f"the model takes {len(self.input_names)} inputs "
                                   f"({', '.join(self.input_names)}), got {len(inputs)}")
        results = self.run(dict(zip(self.input_names, inputs)), self.output_names)
        values = tuple(results[name] for name in self.output_names)
        return values[0] if len(values) == 1 else values

    def run(self, feeds: dict[str, Tensor], outputs: Optional[list[str]] = None) -> dict[str, Tensor]:
        """Compute the tensors named in ``outputs`` (default: the graph outputs) from ``feeds``.

        Only the nodes the requested tensors depend on run, and only the graph inputs they read
        must be fed.
        """
        wanted = tuple(outputs if outputs is not None else self.output_names)
        plan = self._plans.get(wanted)
        if plan is None:
            plan = self._plans[wanted] = self._make_plan(wanted)
        missing = [name for name in plan.feeds if name not in feeds]
        if missing:
            raise NeuralMergeError(f"missing model input '{missing[0]}' (inputs: {', '.join(self.input_names)})")
        env = {name: feeds[name] for name in plan.feeds}
        for step, release in zip(plan.steps, plan.release):
            args = [self._value(name, env) if name else None for name in step.ctx.input_names]
            for name, value in zip(step.ctx.output_names, step.convert(step.ctx, args)):
                if name:
                    env[name] = value
            for name in release:
                env.pop(name, None)
        return {name: self._value(name, env) for name in wanted}

    def _value(self, name: str, env: dict[str, Tensor]) -> Tensor:
        if name in env:
            return env[name]
        if name in self._param_keys:
            value = self.params[self._param_keys[name]]
            stored = self._stored_dtype.get(name)
            return value if stored is None else value.to(stored)
        if name in self._buffer_keys:
            value = getattr(self.constants, self._buffer_keys[name])
            # shape arithmetic happens on the CPU (Shape's outputs are CPU tensors) even if the module moved
            return value if value.is_floating_point() else value.cpu()
        raise NeuralMergeError(f"tensor '{name}' was not computed (an optional output its node did not produce)")

    def _make_plan(self, wanted: tuple[str, ...]) -> _Plan:
        needed: set[int] = set()
        seen: set[str] = set()
        stack = list(wanted)
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            index = self._producer.get(name)
            if index is not None:
                if index not in needed:
                    needed.add(index)
                    stack.extend(n for n in self._steps[index].ctx.input_names if n)
            elif name not in self._param_keys and name not in self._buffer_keys and name not in self.input_names:
                raise NeuralMergeError(f"no tensor named '{name}' in the model")
        steps = [self._steps[i] for i in sorted(needed)]
        last_reader: dict[str, int] = {}
        for position, step in enumerate(steps):
            for name in step.ctx.input_names:
                last_reader[name] = position
        release: list[list[str]] = [[] for _ in steps]
        for name, position in last_reader.items():
            if name and name not in wanted:
                release[position].append(name)
        return _Plan(steps, release, [name for name in self.input_names if name in seen])
