// The fp16 E-Conv sum on CPUs with AVX512-FP16 (Sapphire Rapids and later). In its own file so
// that only this loop is compiled for the extension: dispatch.cpp uses it only on CPUs that
// have it, and with a table whose entries are bounded well below the fp16 range (econv_layer.cpp).
#if defined(__x86_64__) && __has_include(<avx512fp16intrin.h>)  // GCC 12+, Clang 14+
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "lut_internal.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512fp16,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512fp16,avx2,fma,f16c")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace neuralmerge {
namespace detail {
namespace {

// Sums kGroup terms of 32 pixels in one fp16 register (one vaddph each), then widens that
// partial sum into two fp32 sums. The AVX-512F fp16 sum widens every term (vcvtph2ps: two
// uops, on the same two ports as the add) and ran at six cycles per 64-pixel run, the
// uop limit; this does a quarter of the widening. The partial sums round to fp16 once per term:
// relative RMS error 2e-4 -> 3.7-3.8e-4 on the benchmark layers (docs/runtime.md).
struct F16Partial {
    using Elem = uint16_t;
    struct Acc {
        __m512h part;
        __m512 low, high;
    };
    static constexpr int64_t kLanes = 32;
    static constexpr int64_t kBlockPixels = kWideBlockPixels;
    static constexpr int64_t kPrefetchAhead = kSumPrefetchTerms;
    static constexpr int kGroup = kFp16PartialTerms;
    static Acc zero() { return {_mm512_setzero_ph(), _mm512_setzero_ps(), _mm512_setzero_ps()}; }
    static Acc add(Acc a, const Elem* p) { return {_mm512_add_ph(a.part, _mm512_loadu_ph(p)), a.low, a.high}; }
    static Acc flush(Acc a) {
        const __m512i bits = _mm512_castph_si512(a.part);
        return {_mm512_setzero_ph(), _mm512_add_ps(a.low, _mm512_cvtph_ps(_mm512_castsi512_si256(bits))),
                _mm512_add_ps(a.high, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(bits, 1)))};
    }
    // Called after the last group's flush (simd_accumulate.inl flushes every group, the last
    // one too), so the partial sum is already in low and high.
    static void store(Acc a, const float* base, float bias, float scale, float* out, int64_t) {
        const __m512 scales = _mm512_set1_ps(scale);
        const __m512 first = base ? _mm512_loadu_ps(base) : _mm512_set1_ps(bias);
        const __m512 second = base ? _mm512_loadu_ps(base + 16) : _mm512_set1_ps(bias);
        _mm512_storeu_ps(out, _mm512_fmadd_ps(a.low, scales, first));
        _mm512_storeu_ps(out + 16, _mm512_fmadd_ps(a.high, scales, second));
    }
};

#include "simd_accumulate.inl"

}  // namespace

AccumulateFn<uint16_t> accumulate_f16_partial() { return accumulate<F16Partial, 2>; }

}  // namespace detail
}  // namespace neuralmerge

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
#elif defined(__x86_64__)
#include "lut_internal.h"

namespace neuralmerge::detail {
AccumulateFn<uint16_t> accumulate_f16_partial() { return nullptr; }  // this compiler cannot build it
}  // namespace neuralmerge::detail
#endif
