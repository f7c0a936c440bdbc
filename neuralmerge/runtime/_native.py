"""Loads the compiled module ``neuralmerge._lut``.

The module links against ``libscipy_openblas.so`` from the scipy-openblas32 wheel. Its rpath
finds the wheel only when both sit in the same site-packages; an editable install keeps the
module in the source tree, so the library is preloaded here with RTLD_GLOBAL, after which
the dynamic loader resolves the module's dependency by its soname. A build against the system
OpenBLAS (NEURALMERGE_BLAS=system) needs no preload and tolerates the wheel's absence.
"""
from __future__ import annotations

import ctypes
import os
from types import ModuleType


def _preload_scipy_openblas() -> None:
    try:
        import scipy_openblas32
    except ImportError:
        return
    library = os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(fullname=True))
    ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)


def load() -> ModuleType:
    """Return ``neuralmerge._lut``, raising ImportError with a hint when it is not built."""
    _preload_scipy_openblas()
    try:
        from neuralmerge import _lut
    except ImportError as exc:
        raise ImportError(
            f"the native module neuralmerge._lut is not available ({exc}); "
            "build it with `pip install -e .` (or `pip install .`) in the neuralmerge source tree"
        ) from exc
    return _lut
