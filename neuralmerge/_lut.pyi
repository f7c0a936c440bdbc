"""Type stubs of the compiled module neuralmerge._lut (csrc/python_module.cpp, bind_*.cpp).

Use neuralmerge.runtime.kernels, which converts dtypes and allocates outputs. Every function
raises ValueError when an array has the wrong dtype, layout or shape, or a code or offset is
out of range.
"""
import numpy as np
import numpy.typing as npt

def econv_output_shape(
    x: npt.NDArray[np.float32],
    codebook: npt.NDArray[np.float32],
    codes: npt.NDArray[np.uint8] | npt.NDArray[np.uint16],
    offsets: npt.NDArray[np.int64],
    depth: int,
    bias: npt.NDArray[np.float32],
    strides: tuple[int, int],
    pads: tuple[int, int, int, int],
    dilations: tuple[int, int],
    group: int,
) -> list[int]: ...
def econv(
    x: npt.NDArray[np.float32],
    codebook: npt.NDArray[np.float32],
    codes: npt.NDArray[np.uint8] | npt.NDArray[np.uint16],
    offsets: npt.NDArray[np.int64],
    depth: int,
    bias: npt.NDArray[np.float32],
    strides: tuple[int, int],
    pads: tuple[int, int, int, int],
    dilations: tuple[int, int],
    group: int,
    out: npt.NDArray[np.float32],
) -> None: ...
def egemm(
    x: npt.NDArray[np.float32],
    codebook: npt.NDArray[np.float32],
    codes: npt.NDArray[np.uint8] | npt.NDArray[np.uint16],
    offsets: npt.NDArray[np.int64],
    depth: int,
    bias: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
) -> None: ...

class EConvLayer:
    """Prepared encoded convolution on the fast lookup-table kernels (csrc/kernels/)."""
    def __init__(
        self,
        codebook: npt.NDArray[np.float32] | npt.NDArray[np.float16],
        codes: npt.NDArray[np.uint8] | npt.NDArray[np.uint16],
        offsets: npt.NDArray[np.int64],
        depth: int,
        bias: npt.NDArray[np.float32],
        strides: tuple[int, int],
        pads: tuple[int, int, int, int],
        dilations: tuple[int, int],
        group: int,
        lut: str,
        threads: int,
        input_scale: float,
        segment_codewords: npt.NDArray[np.int64] | None,
        isa: str,
    ) -> None: ...
    def output_shape(self, shape: tuple[int, int, int, int]) -> list[int]: ...
    def run(self, x: npt.NDArray[np.float32], out: npt.NDArray[np.float32]) -> None: ...
    @property
    def kernel_name(self) -> str: ...

class EGemmLayer:
    """Prepared encoded fully-connected layer on the fast lookup-table kernels."""
    def __init__(
        self,
        codebook: npt.NDArray[np.float32] | npt.NDArray[np.float16],
        codes: npt.NDArray[np.uint8] | npt.NDArray[np.uint16],
        offsets: npt.NDArray[np.int64],
        depth: int,
        bias: npt.NDArray[np.float32],
        lut: str,
        threads: int,
        input_scale: float,
        segment_codewords: npt.NDArray[np.int64] | None,
        isa: str,
    ) -> None: ...
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    def run(self, x: npt.NDArray[np.float32], out: npt.NDArray[np.float32]) -> None: ...
    @property
    def kernel_name(self) -> str: ...

def cpu_features() -> str: ...

class ModelError(ValueError): ...
class InputError(ValueError): ...

class Session:
    """A loaded .nmpack model (use neuralmerge.runtime.Session)."""
    @staticmethod
    def from_file(path: str, lut: str = "fp32", threads: int = 1, profile: bool = False) -> Session: ...
    @staticmethod
    def from_buffer(data: bytes, lut: str = "fp32", threads: int = 1, profile: bool = False) -> Session: ...
    def inputs(self) -> list[tuple[str, str, list[int]]]: ...
    def outputs(self) -> list[tuple[str, str, list[int]]]: ...
    def run(self, feeds: dict[str, npt.NDArray[np.float32]], outputs: list[str] = ...) -> list[npt.NDArray[np.float32]]: ...
    def inputs_needed(self, output: str) -> list[str]: ...
    def describe_kernels(self) -> list[str]: ...
    def profile(self) -> list[tuple[str, str, str, int, float]]: ...
    def reset_profile(self) -> None: ...
