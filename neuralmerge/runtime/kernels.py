"""Lookup-table kernels for encoded layers: a thin numpy front of ``neuralmerge._lut``.

Arrays follow docs/format.md (``EConv`` / ``EGemm`` inputs). :func:`econv` / :func:`egemm` are
the exact fp32 reference kernels; :class:`EConv` / :class:`EGemm` are prepared layers on the fast
kernels (docs/runtime.md, "Kernels and where the time goes"), with a table precision (``lut``) and an instruction set chosen at
construction. This module converts dtypes and layouts once, allocates outputs with ``np.empty``
and hands everything to C++, which checks shapes, offsets and every code.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from neuralmerge.errors import NeuralMergeError
from neuralmerge.runtime import _native

_lut = _native.load()

__all__ = ["EConv", "EGemm", "KernelInputError", "cpu_features", "econv", "egemm", "set_isa"]

LUT_PRECISIONS = ("fp32", "fp16", "int16", "int8")
ISAS = ("auto", "avx512", "avx2", "scalar")
_default_isa = "auto"
_SHAPES_KEPT = 64  # input shapes whose output shape an EConv remembers


class KernelInputError(NeuralMergeError, ValueError):
    """Arrays handed to a LUT kernel are inconsistent (dtype, shape, offsets or code range)."""


@contextmanager
def _as_kernel_errors() -> Iterator[None]:
    # The C++ side raises ValueError (std::invalid_argument); give it the project's error type.
    try:
        yield
    except KernelInputError:
        raise
    except ValueError as exc:
        raise KernelInputError(str(exc)) from None


def _run_layer(layer, x: np.ndarray, out: np.ndarray) -> None:
    """``layer.run(x, out)`` with _as_kernel_errors' mapping, without a context manager's ~0.7 us
    (the prepared layers' calls are a hot path)."""
    try:
        layer.run(x, out)
    except ValueError as exc:  # the C++ side's std::invalid_argument
        raise KernelInputError(str(exc)) from None


def _floats(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise KernelInputError(f"{name} must be a floating-point array, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _codebook(codebook: np.ndarray, *, keep_fp16: bool = False) -> np.ndarray:
    codebook = np.asarray(codebook)
    if codebook.dtype not in (np.float32, np.float16):
        raise KernelInputError(f"codebook must be float32 or float16, got dtype {codebook.dtype}")
    if keep_fp16 and codebook.dtype == np.float16:
        return np.ascontiguousarray(codebook)  # the prepared layers widen it once in C++
    return np.ascontiguousarray(codebook, dtype=np.float32)  # fp16 is widened once, here


def _codes(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype not in (np.uint8, np.uint16):
        raise KernelInputError(f"codes must be uint8 or uint16, got dtype {codes.dtype}")
    return np.ascontiguousarray(codes)


def _offsets(offsets: np.ndarray) -> np.ndarray:
    offsets = np.asarray(offsets)
    if not np.issubdtype(offsets.dtype, np.integer):
        raise KernelInputError(f"offsets must be an integer array, got dtype {offsets.dtype}")
    return np.ascontiguousarray(offsets, dtype=np.int64)


def _depth(depth: int | np.ndarray) -> int:
    depth_array = np.asarray(depth)
    if depth_array.size != 1 or not np.issubdtype(depth_array.dtype, np.integer):
        raise KernelInputError(f"depth must be one integer, got {depth!r}")
    return int(depth_array.reshape(()))


def _ints(values: Sequence[int], count: int, name: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if len(values) != count:
        raise KernelInputError(f"{name} must have {count} values, got {len(values)}")
    return values


def econv(x: np.ndarray, codebook: np.ndarray, codes: np.ndarray, offsets: np.ndarray, depth: int | np.ndarray,
          bias: np.ndarray, strides: Sequence[int] = (1, 1), pads: Sequence[int] = (0, 0, 0, 0),
          dilations: Sequence[int] = (1, 1), group: int = 1) -> np.ndarray:
    """Encoded 2-D convolution (``ai.neuralmerge::EConv``), exact in fp32.

    ``x`` is ``[N, C_in, H, W]``; ``codebook`` ``[K, r]`` (float32 or float16); ``codes``
    ``[p, kh, kw, rho]`` (uint8 or uint16); ``offsets`` ``[rho]``; ``depth`` = ``C_in / group``;
    ``bias`` ``[p]``; ``pads`` are ``[top, left, bottom, right]``. Returns ``[N, p, OH, OW]``
    float32. Raises KernelInputError (a ValueError) when the inputs are inconsistent.
    """
    arrays = (_floats(x, "x"), _codebook(codebook), _codes(codes), _offsets(offsets), _depth(depth),
              _floats(bias, "bias"))
    geometry = (_ints(strides, 2, "strides"), _ints(pads, 4, "pads"), _ints(dilations, 2, "dilations"), int(group))
    with _as_kernel_errors():
        out = np.empty(_lut.econv_output_shape(*arrays, *geometry), dtype=np.float32)
        _lut.econv(*arrays, *geometry, out)
    return out


def egemm(x: np.ndarray, codebook: np.ndarray, codes: np.ndarray, offsets: np.ndarray, depth: int | np.ndarray,
          bias: np.ndarray) -> np.ndarray:
    """Encoded fully-connected layer (``ai.neuralmerge::EGemm``): ``x @ W.T + bias``, exact in fp32.

    ``x`` is ``[..., n_in]``; ``codes`` ``[n_out, rho]``; ``depth`` = ``n_in``; the other arrays
    as in :func:`econv`. Returns ``[..., n_out]`` float32.
    """
    x, codes = _floats(x, "x"), _codes(codes)
    if x.ndim < 1 or codes.ndim != 2:
        raise KernelInputError(f"egemm needs x [..., n_in] and codes [n_out, rho], got {x.shape} and {codes.shape}")
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty((rows.shape[0], codes.shape[0]), dtype=np.float32)
    with _as_kernel_errors():
        _lut.egemm(rows, _codebook(codebook), codes, _offsets(offsets), _depth(depth), _floats(bias, "bias"), out)
    return out.reshape(*x.shape[:-1], codes.shape[0])


def set_isa(isa: str) -> None:
    """Instruction set of prepared layers built from now on without an explicit ``isa``.

    ``"auto"`` (the default) picks the best the CPU supports; ``"avx512"``, ``"avx2"`` and
    ``"scalar"`` force one (construction fails if the CPU lacks it). Meant for tests and
    benchmarks that compare kernel variants.
    """
    global _default_isa
    if isa not in ISAS:
        raise KernelInputError(f"isa must be one of {', '.join(ISAS)}, got {isa!r}")
    _default_isa = isa


def cpu_features() -> str:
    """The CPU features the kernels use, e.g. ``"avx512f ... avx2 fma f16c"``."""
    return _lut.cpu_features()


def _layer_options(lut: str, threads: int, input_scale: float, isa: str | None) -> tuple[str, int, float, str]:
    if lut not in LUT_PRECISIONS:
        raise KernelInputError(f"lut must be one of {', '.join(LUT_PRECISIONS)}, got {lut!r}")
    isa = _default_isa if isa is None else isa
    if isa not in ISAS:
        raise KernelInputError(f"isa must be one of {', '.join(ISAS)}, got {isa!r}")
    return lut, int(threads), float(input_scale), isa


def _segment_codewords(counts: np.ndarray | Sequence[int] | None) -> np.ndarray | None:
    return None if counts is None else _offsets(np.asarray(counts))


class EConv:
    """Prepared encoded 2-D convolution (``ai.neuralmerge::EConv``) on the fast LUT kernels.

    Arrays as in :func:`econv` (a float16 codebook stays float16 until C++ widens it);
    ``lut`` is the table precision (``"fp32"`` exact, ``"fp16"``, ``"int16"``, ``"int8"``);
    ``threads`` splits output rows; ``input_scale`` is a calibrated int8 activation step
    (largest |input| / 127; inputs >= 0 spread that range over all 255 uint8 levels; 0 = each
    input's own range), used where the int8 table is built from 8-bit activations (AVX-512
    VNNI); ``segment_codewords`` gives C_v per segment;
    ``isa`` forces an instruction set (default: :func:`set_isa`'s). Validates everything once.
    """

    def __init__(self, codebook: np.ndarray, codes: np.ndarray, offsets: np.ndarray, depth: int | np.ndarray,
                 bias: np.ndarray, strides: Sequence[int] = (1, 1), pads: Sequence[int] = (0, 0, 0, 0),
                 dilations: Sequence[int] = (1, 1), group: int = 1, *, lut: str = "fp32", threads: int = 1,
                 input_scale: float = 0.0, segment_codewords: np.ndarray | Sequence[int] | None = None,
                 isa: str | None = None) -> None:
        options = _layer_options(lut, threads, input_scale, isa)
        with _as_kernel_errors():
            self._layer = _lut.EConvLayer(
                _codebook(codebook, keep_fp16=True), _codes(codes), _offsets(offsets), _depth(depth),
                _floats(bias, "bias"), _ints(strides, 2, "strides"), _ints(pads, 4, "pads"),
                _ints(dilations, 2, "dilations"), int(group), options[0], options[1], options[2],
                _segment_codewords(segment_codewords), options[3])
        self._output_shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # input shape -> output shape

    @property
    def kernel_name(self) -> str:
        """The kernel variant in use, e.g. ``"int8-avx512"``."""
        return self._layer.kernel_name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``x`` ``[N, C_in, H, W]`` -> ``[N, p, OH, OW]`` float32."""
        # The common case (a C-contiguous float32 array of a shape seen before) takes the shortest
        # path: the checks and the context manager cost ~3 us a call, 5% of a LeNet-sized layer.
        if type(x) is not np.ndarray or x.dtype != np.float32 or not x.flags.c_contiguous:
            x = _floats(x, "x")
        shape = self._output_shapes.get(x.shape)
        if shape is None:
            if x.ndim != 4:
                raise KernelInputError(f"x must be 4-D [N, C, H, W], got shape {x.shape}")
            with _as_kernel_errors():
                shape = self._layer.output_shape(x.shape)
            if len(self._output_shapes) >= _SHAPES_KEPT:
                self._output_shapes.clear()
            self._output_shapes[x.shape] = shape
        out = np.empty(shape, dtype=np.float32)
        _run_layer(self._layer, x, out)
        return out


class EGemm:
    """Prepared encoded fully-connected layer (``ai.neuralmerge::EGemm``) on the fast LUT kernels.

    Arrays as in :func:`egemm`; options as in :class:`EConv`. fp16/int16 keep the codebook in
    fp16 with an fp32 table; int8 also narrows the table to int8.
    """

    def __init__(self, codebook: np.ndarray, codes: np.ndarray, offsets: np.ndarray, depth: int | np.ndarray,
                 bias: np.ndarray, *, lut: str = "fp32", threads: int = 1, input_scale: float = 0.0,
                 segment_codewords: np.ndarray | Sequence[int] | None = None, isa: str | None = None) -> None:
        options = _layer_options(lut, threads, input_scale, isa)
        codes = _codes(codes)
        if codes.ndim != 2:
            raise KernelInputError(f"codes must be [n_out, rho], got shape {codes.shape}")
        with _as_kernel_errors():
            self._layer = _lut.EGemmLayer(
                _codebook(codebook, keep_fp16=True), codes, _offsets(offsets), _depth(depth),
                _floats(bias, "bias"), options[0], options[1], options[2], _segment_codewords(segment_codewords),
                options[3])
        self._out_features = self._layer.out_features

    @property
    def kernel_name(self) -> str:
        """The kernel variant in use, e.g. ``"int8-avx512"``."""
        return self._layer.kernel_name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``x`` ``[..., n_in]`` -> ``[..., n_out]`` float32."""
        if type(x) is not np.ndarray or x.dtype != np.float32 or not x.flags.c_contiguous or x.ndim == 0:
            x = _floats(x, "x")  # as in EConv; a 0-d input becomes one row of one feature, as before
        if x.ndim < 1:
            raise KernelInputError(f"x must be [..., n_in], got shape {x.shape}")
        rows = x.reshape(-1, x.shape[-1])
        out = np.empty((rows.shape[0], self._out_features), dtype=np.float32)
        _run_layer(self._layer, rows, out)
        return out.reshape(*x.shape[:-1], out.shape[1])
