"""``Session``: run a merged model (``.onnx`` or ``.nmpack``) on the native lookup-table runtime.

    from neuralmerge.runtime import Session
    s = Session("merged.onnx", lut="int8", threads=1)
    out = s.run({"m0.input": xa, "m1.input": xb})          # {output name: array}
    out = s.run({"m1.input": xb}, outputs=["m1.logits"])   # one task only

    s = Session("merged.onnx", lut="int8", profile=True)    # time every node of every run
    s.run(feeds); s.node_times()                            # [NodeTime(name, op, kernel, calls, seconds)]

An ``.onnx`` file is packed in memory first (needs ``onnx``, never torch). All validation
happens in C++: a bad file raises :class:`ModelError`, bad feeds raise :class:`FeedError`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from neuralmerge.errors import ConfigError, NeuralMergeError
from neuralmerge.runtime import _native
from neuralmerge.runtime.pack import ModelError, is_packed, model_path, pack_model

__all__ = ["Session", "TensorSpec", "NodeTime", "FeedError", "ModelError", "PRECISIONS"]

PRECISIONS = ("fp32", "fp16", "int16", "int8")


class FeedError(NeuralMergeError, ValueError):
    """Feeds do not match the model: unknown name, wrong dtype, rank or shape, or a missing input."""


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: ``shape`` has ``None`` where the size is chosen per call."""
    name: str
    shape: tuple[int | None, ...]
    dtype: str


@dataclass(frozen=True)
class NodeTime:
    """Time one node took over a profiling session's runs since it was created or reset."""
    name: str
    op: str
    kernel: str  # the kernel an E-layer runs on, "+ Relu" when one was folded into it ("" for other ops)
    calls: int
    seconds: float  # wall time inside the node, summed over its calls

    @property
    def mean_ms(self) -> float:
        return self.seconds / self.calls * 1e3


class Session:
    """A merged model loaded into the native runtime.

    ``model`` is the path of an ``.onnx`` or ``.nmpack`` file, or ``.nmpack`` bytes. ``lut`` is the
    table precision of the encoded layers: ``"fp32"`` (exact), ``"fp16"``, ``"int16"`` or
    ``"int8"``. ``threads`` is the number of threads a run may use: ops split their work over them,
    or, for a merged model whose tasks are independent, the tasks may run side by side (the
    session times both ways on its first runs and keeps the faster; see docs/runtime.md).
    ``profile=True`` times every node of every run (:meth:`node_times`), at the cost of two clock
    reads per node.
    """

    def __init__(self, model: str | os.PathLike | bytes, lut: str = "fp32", threads: int = 1, profile: bool = False):
        if lut not in PRECISIONS:
            raise ConfigError(f"lut must be one of {', '.join(PRECISIONS)}, got {lut!r}")
        if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 1024:
            raise ConfigError(f"threads must be an integer in [1, 1024], got {threads!r}")
        if not isinstance(profile, bool):
            raise ConfigError(f"profile must be True or False, got {profile!r}")
        lib = self._lib = _native.load()
        self.lut, self.threads, self.profile = lut, threads, profile
        try:
            if isinstance(model, (bytes, bytearray, memoryview)):
                self._native = lib.Session.from_buffer(bytes(model), lut, threads, profile)
            else:
                path = model_path(model)
                if is_packed(path):
                    self._native = lib.Session.from_file(str(path), lut, threads, profile)
                else:
                    self._native = lib.Session.from_buffer(pack_model(path), lut, threads, profile)
        except lib.ModelError as exc:
            raise ModelError(str(exc)) from None
        self.inputs = [_spec(*entry) for entry in self._native.inputs()]
        self.outputs = [_spec(*entry) for entry in self._native.outputs()]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the nodes ``outputs`` need (all outputs by default); return ``{name: float32 array}``.

        Feeds must be float32 numpy arrays whose shapes match :attr:`inputs`; feeds the requested
        outputs do not need may be left out.
        """
        if not isinstance(feeds, Mapping):
            raise FeedError(f"feeds must be a dict of input name -> numpy array, got {type(feeds).__name__}")
        if isinstance(outputs, str):
            outputs = [outputs]
        names = [spec.name for spec in self.outputs] if outputs is None else list(outputs)
        if not names or not all(isinstance(name, str) for name in names):
            raise FeedError(f"outputs must be a non-empty list of output names (or None for all), got {outputs!r}")
        lib = self._lib
        try:
            results = self._native.run(dict(feeds), names)
        except lib.InputError as exc:
            raise FeedError(str(exc)) from None
        except lib.ModelError as exc:
            raise ModelError(str(exc)) from None
        return dict(zip(names, results))

    def inputs_needed(self, output: str) -> list[str]:
        """The graph inputs ``output`` depends on: the feeds :meth:`run` needs for it alone."""
        if not isinstance(output, str):
            raise FeedError(f"output must be an output name, got {output!r}")
        try:
            return list(self._native.inputs_needed(output))
        except self._lib.InputError as exc:
            raise FeedError(str(exc)) from None

    def kernels(self) -> list[str]:
        """One line per encoded layer: node name, op and the kernel the runtime chose."""
        return list(self._native.describe_kernels())

    def node_times(self) -> list[NodeTime]:
        """Time per node over the runs since the session was created or :meth:`reset_node_times`.

        Nodes that did not run are left out; the order is the model's. With ``threads`` >= 2 a
        merged model's tasks may run side by side, so the times can add up to more than a run's.
        """
        self._require_profiling()
        return [NodeTime(*entry) for entry in self._native.profile()]

    def reset_node_times(self) -> None:
        """Forget the node times so far (e.g. those of warm-up runs)."""
        self._require_profiling()
        self._native.reset_profile()

    def _require_profiling(self) -> None:
        if not self.profile:
            raise ConfigError("this session does not profile: create it with Session(..., profile=True)")

    def __repr__(self) -> str:
        return (f"Session(inputs={[s.name for s in self.inputs]}, outputs={[s.name for s in self.outputs]}, "
                f"lut={self.lut!r}, threads={self.threads}{', profile=True' if self.profile else ''})")


def _spec(name: str, dtype: str, shape: list[int]) -> TensorSpec:
    return TensorSpec(name, tuple(None if d < 0 else d for d in shape), dtype)
