// The one place that names BLAS symbols. Every BLAS call in csrc/ goes through NM_SGEMM or NM_SGEMV so that
// the library can be swapped at configure time (CMake option NEURALMERGE_BLAS). Both choices are
// OpenBLAS builds, whose cblas.h declares the thread-count setter.
#pragma once

#include <cblas.h>

#if defined(NEURALMERGE_BLAS_SCIPY_OPENBLAS)
// The scipy-openblas32 wheel prefixes every exported symbol with "scipy_" so that it never
// clashes with another OpenBLAS loaded in the same process (numpy's, faiss's).
#define NM_SGEMM scipy_cblas_sgemm
#define NM_SGEMV scipy_cblas_sgemv
#define NM_BLAS_SET_THREADS scipy_openblas_set_num_threads
#else
#define NM_SGEMM cblas_sgemm
#define NM_SGEMV cblas_sgemv
#define NM_BLAS_SET_THREADS openblas_set_num_threads
#endif
