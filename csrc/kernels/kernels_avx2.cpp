// AVX2 kernels (with FMA and F16C) for x86-64 CPUs without AVX-512. Compiled with a target
// pragma; dispatch.cpp calls them only on CPUs that have AVX2, FMA and F16C.
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "lut_internal.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace neuralmerge {
namespace detail {
namespace {

inline __m128i load128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }

inline void store_f32(__m256 sum, const float* base, float bias, float scale, float* out) {
    const __m256 start = base ? _mm256_loadu_ps(base) : _mm256_set1_ps(bias);
    _mm256_storeu_ps(out, _mm256_fmadd_ps(sum, _mm256_set1_ps(scale), start));
}

struct F32 {
    using Elem = float;
    using Acc = __m256;
    static constexpr int64_t kLanes = 8;
    static constexpr int64_t kBlockPixels = kPixelBlock;
    static constexpr int64_t kPrefetchAhead = 0;
    static constexpr int kGroup = 1;
    static Acc zero() { return _mm256_setzero_ps(); }
    static Acc add(Acc a, const Elem* p) { return _mm256_add_ps(a, _mm256_loadu_ps(p)); }
    static void store(Acc a, const float* base, float bias, float scale, float* out, int64_t) {
        store_f32(a, base, bias, scale, out);
    }
};

struct F16 {
    using Elem = uint16_t;
    using Acc = __m256;
    static constexpr int64_t kLanes = 8;
    static constexpr int64_t kBlockPixels = kPixelBlock;
    static constexpr int64_t kPrefetchAhead = 0;
    static constexpr int kGroup = 1;
    static Acc zero() { return _mm256_setzero_ps(); }
    static Acc add(Acc a, const Elem* p) { return _mm256_add_ps(a, _mm256_cvtph_ps(load128(p))); }
    static void store(Acc a, const float* base, float bias, float scale, float* out, int64_t) {
        store_f32(a, base, bias, scale, out);
    }
};

struct I16 {
    using Elem = int16_t;
    using Acc = __m256i;  // 8 int32 sums
    static constexpr int64_t kLanes = 8;
    static constexpr int64_t kBlockPixels = kPixelBlock;
    static constexpr int64_t kPrefetchAhead = 0;
    static constexpr int kGroup = 1;
    static Acc zero() { return _mm256_setzero_si256(); }
    static Acc add(Acc a, const Elem* p) { return _mm256_add_epi32(a, _mm256_cvtepi16_epi32(load128(p))); }
    static void store(Acc a, const float* base, float bias, float scale, float* out, int64_t) {
        store_f32(_mm256_cvtepi32_ps(a), base, bias, scale, out);
    }
};

struct I8 {
    using Elem = uint8_t;  // offset-binary (kInt8Bias)
    using Acc = __m256i;   // 16 uint16 sums of biased bytes (< 65536 for kInt8ChunkTerms terms)
    static constexpr int64_t kLanes = 16;
    static constexpr int64_t kBlockPixels = kPixelBlock;
    static constexpr int64_t kPrefetchAhead = 0;
    static constexpr int kGroup = 1;
    static Acc zero() { return _mm256_setzero_si256(); }
    static Acc add(Acc a, const Elem* p) { return _mm256_add_epi16(a, _mm256_cvtepu8_epi16(load128(p))); }
    static void store(Acc a, const float* base, float bias, float scale, float* out, int64_t terms) {
        const __m256i offset = _mm256_set1_epi32(static_cast<int32_t>(terms * kInt8Bias));
        const __m256i low = _mm256_sub_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(a)), offset);
        const __m256i high = _mm256_sub_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(a, 1)), offset);
        store_f32(_mm256_cvtepi32_ps(low), base, bias, scale, out);
        store_f32(_mm256_cvtepi32_ps(high), base ? base + 8 : nullptr, bias, scale, out + 8);
    }
};

#include "simd_accumulate.inl"

void to_f16(const float* src, int64_t n, uint16_t* dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m128i half = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), half);
    }
    for (; i < n; ++i) dst[i] = float_to_half(src[i]);
}

// Rounds to nearest even (the MXCSR default) after clamping, like the scalar kernel.
inline __m256i rounded(const float* src, __m256 inv_scale, __m256 limit) {
    const __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(src), inv_scale);
    return _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(scaled, limit), _mm256_sub_ps(_mm256_setzero_ps(), limit)));
}

void quantize_i16(const float* src, int64_t n, float inv_scale, int16_t* dst) {
    const __m256 inv = _mm256_set1_ps(inv_scale), limit = _mm256_set1_ps(32767.0f);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i packed = _mm256_packs_epi32(rounded(src + i, inv, limit), rounded(src + i + 8, inv, limit));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_permute4x64_epi64(packed, 0xd8));
    }
    for (; i < n; ++i) dst[i] = static_cast<int16_t>(std::nearbyint(std::clamp(src[i] * inv_scale, -32767.0f, 32767.0f)));
}

void quantize_i8(const float* src, int64_t n, float inv_scale, int8_t* dst) {
    const __m256 inv = _mm256_set1_ps(inv_scale), limit = _mm256_set1_ps(127.0f);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i words = _mm256_permute4x64_epi64(
            _mm256_packs_epi32(rounded(src + i, inv, limit), rounded(src + i + 8, inv, limit)), 0xd8);
        const __m128i bytes = _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), bytes);
    }
    for (; i < n; ++i) dst[i] = static_cast<int8_t>(std::nearbyint(std::clamp(src[i] * inv_scale, -127.0f, 127.0f)));
}

void copy_rows(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t rows, int64_t width,
               bool relu) {
    // vmaxps returns its second operand when the first is NaN: max(x, 0) is relu_of(x), NaN -> 0.
    const auto apply = [relu](__m256 x) { return relu ? _mm256_max_ps(x, _mm256_setzero_ps()) : x; };
    for (int64_t r = 0; r < rows; ++r, src += src_stride, dst += dst_stride) {
        int64_t c = 0;
        for (; c + 8 <= width; c += 8) _mm256_storeu_ps(dst + c, apply(_mm256_loadu_ps(src + c)));
        for (; c < width; ++c) dst[c] = relu ? relu_of(src[c]) : src[c];
    }
}

float largest_norm2(const float* x, int64_t channels, int64_t stride, int64_t n) {
    __m256 most = _mm256_setzero_ps();
    int64_t q = 0;
    for (; q + 8 <= n; q += 8) {
        __m256 sum = _mm256_setzero_ps();
        for (int64_t k = 0; k < channels; ++k) {
            const __m256 v = _mm256_loadu_ps(x + k * stride + q);
            sum = _mm256_fmadd_ps(v, v, sum);
        }
        most = _mm256_max_ps(most, sum);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, most);
    float m = *std::max_element(lanes, lanes + 8);
    for (; q < n; ++q) m = std::max(m, pixel_norm2(x + q, channels, stride));
    return m;
}

float max_abs(const float* src, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 largest = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) largest = _mm256_max_ps(largest, _mm256_andnot_ps(sign, _mm256_loadu_ps(src + i)));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, largest);
    float m = *std::max_element(lanes, lanes + 8);
    for (; i < n; ++i) m = std::max(m, std::fabs(src[i]));
    return m;
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(load128(p)); }
inline __m256 load8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(static_cast<const void*>(p)))));
}
inline float load1(const float* p) { return *p; }
inline float load1(const int8_t* p) { return *p; }
inline float load1(const uint16_t* p) { return half_to_float(*p); }

template <typename Elem>
void fc_table(const Elem* codebook_t, const int32_t* base, const int32_t* rows, int64_t rho, int64_t r, int64_t depth,
              const float* x, float* table) {
    for (int64_t v = 0; v < rho; ++v) {
        const Elem* segment = codebook_t + static_cast<int64_t>(base[v]) * r;
        const int64_t count = rows[v], channels = std::min(r, depth - v * r);
        float* out = table + base[v];
        int64_t c0 = 0;
        for (; c0 + 8 <= count; c0 += 8) {
            __m256 sum = _mm256_setzero_ps();
            for (int64_t k = 0; k < channels; ++k) {
                sum = _mm256_fmadd_ps(_mm256_set1_ps(x[v * r + k]), load8(segment + k * count + c0), sum);
            }
            _mm256_storeu_ps(out + c0, sum);
        }
        for (; c0 < count; ++c0) {
            float sum = 0.0f;
            for (int64_t k = 0; k < channels; ++k) sum += x[v * r + k] * load1(segment + k * count + c0);
            out[c0] = sum;
        }
    }
}

inline __m256i code_index(const uint8_t* codes8, const uint16_t* codes16, int64_t at) {
    return codes8 ? _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes8 + at)))
                  : _mm256_cvtepu16_epi32(load128(codes16 + at));
}

void fc_gather_f32(const float* table, const int32_t* base, const uint8_t* codes8, const uint16_t* codes16,
                   int64_t rho, int64_t blocks, float* out) {
    for (int64_t b = 0; b < blocks; ++b) {
        __m256 sum[8];
        for (auto& s : sum) s = _mm256_setzero_ps();
        for (int64_t v = 0; v < rho; ++v) {
            const __m256i first = _mm256_set1_epi32(base[v]);
            const int64_t at = (b * rho + v) * kFcBlock;
            for (int i = 0; i < 8; ++i) {
                const __m256i index = _mm256_add_epi32(code_index(codes8, codes16, at + 8 * i), first);
                sum[i] = _mm256_add_ps(sum[i], _mm256_i32gather_ps(table, index, 4));
            }
        }
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + b * kFcBlock + 8 * i, sum[i]);
    }
}

// Gathers 4 bytes at table + index (the caller pads the table by 3 bytes) and keeps the first.
void fc_gather_i8(const int8_t* table, const int32_t* base, const uint8_t* codes8, const uint16_t* codes16,
                  int64_t rho, int64_t blocks, int32_t* out) {
    for (int64_t b = 0; b < blocks; ++b) {
        __m256i sum[8];
        for (auto& s : sum) s = _mm256_setzero_si256();
        for (int64_t v = 0; v < rho; ++v) {
            const __m256i first = _mm256_set1_epi32(base[v]);
            const int64_t at = (b * rho + v) * kFcBlock;
            for (int i = 0; i < 8; ++i) {
                const __m256i index = _mm256_add_epi32(code_index(codes8, codes16, at + 8 * i), first);
                const __m256i word = _mm256_i32gather_epi32(reinterpret_cast<const int*>(table), index, 1);
                sum[i] = _mm256_add_epi32(sum[i], _mm256_srai_epi32(_mm256_slli_epi32(word, 24), 24));
            }
        }
        for (int i = 0; i < 8; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + b * kFcBlock + 8 * i), sum[i]);
    }
}

const KernelTable kAvx2 = {
    "avx2",
    accumulate<F32, 1>,
    accumulate<F16, 1>,
    nullptr,  // no fp16 arithmetic
    accumulate<I16, 1>,
    accumulate<I8, 1>,
    to_f16,
    quantize_i16,
    quantize_i8,
    fc_table<float>,
    fc_table<uint16_t>,
    fc_table<int8_t>,
    max_abs,
    largest_norm2,
    copy_rows,
    pool_2x2_loop,
    fc_gather_f32,
    fc_gather_i8,
    nullptr,  // no byte permute (needs AVX-512 VBMI)
    nullptr,  // E-FC tables: fp32 FMAs on the int8 codebook, no VNNI build
    nullptr,
    nullptr,  // E-Conv tables: sgemm + narrowing, no VNNI build
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace

const KernelTable& avx2_kernels() { return kAvx2; }

}  // namespace detail
}  // namespace neuralmerge

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // __x86_64__
