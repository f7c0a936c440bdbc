"""Thin driver of CMakeLists.txt: builds the native module ``neuralmerge._lut``.

All build logic lives in CMakeLists.txt. This file only configures and builds it (Release,
Ninja when available) and copies the module to where setuptools expects it, which is the
source tree for editable installs (``pip install -e .``) and the build dir otherwise.
``NEURALMERGE_BLAS=system`` in the environment links the system libopenblas instead of the
scipy-openblas32 wheel.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE_DIR = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources CMake compiles; setuptools only sees its name."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        # The cache pins the tools of the build environment that wrote it (pip's isolated
        # environments are temporary), so configure afresh; Ninja still skips unchanged objects.
        (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
        shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)
        configure = [
            "cmake", "-S", str(SOURCE_DIR), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DNEURALMERGE_BLAS={os.environ.get('NEURALMERGE_BLAS', 'scipy-openblas32')}",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "_lut",
                        "--parallel", str(os.cpu_count() or 1)], check=True)

        built = build_dir / "python" / f"_lut{sysconfig.get_config_var('EXT_SUFFIX')}"
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)


setup(ext_modules=[CMakeExtension("neuralmerge._lut")], cmdclass={"build_ext": CMakeBuild})
