// The parts of the pybind11 module neuralmerge._lut; python_module.cpp assembles them.
#pragma once

#include <pybind11/pybind11.h>

void bind_kernels(pybind11::module_& m);
void bind_executor(pybind11::module_& m);
