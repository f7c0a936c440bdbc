// pybind11 module neuralmerge._lut (private; use neuralmerge.runtime).
#include "bindings.h"

PYBIND11_MODULE(_lut, m) {
    m.doc() = "Lookup-table kernels and executor of neuralmerge (use neuralmerge.runtime).";
    bind_kernels(m);
    bind_executor(m);
}
