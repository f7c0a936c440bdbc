// AVX-512 kernels (F/BW/VL + VBMI for the E-FC byte permute). Compiled with a target pragma so
// the library still builds for baseline x86-64; dispatch.cpp calls them only on CPUs that have
// every feature listed below.
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "lut_internal.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")
// GCC 12's own avx512fintrin.h trips these on its _mm512_undefined_* placeholders.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace neuralmerge {
namespace detail {
namespace {

inline void store_f32(__m512 sum, const float* base, float bias, float scale, float* out) {
    const __m512 start = base ? _mm512_loadu_ps(base) : _mm512_set1_ps(bias);
    _mm512_storeu_ps(out, _mm512_fmadd_ps(sum, _mm512_set1_ps(scale), start));
}

struct F32 {
    using Elem = float;
    using Acc = __m512;
    static constexpr int64_t kLanes = 16;
    static constexpr int64_t kBlockPixels = kWideBlockPixels;
    static constexpr int64_t kPrefetchAhead = kSumPrefetchTermsF32;
    static constexpr int kGroup = 1;
    static Acc zero() { return _mm512_setzero_ps(); }
    static Acc add(Acc a, const Elem* p) { return _mm512_add_ps(a, _mm512_loadu_ps(p)); }
    static void store(Acc a, const float* base, float bias, float scale, float* out, int64_t) {
        store_f32(a, base, bias, scale, out);
    }
};

struct F16 {
    using Elem = uint16_t;
    using Acc = __m512;
    static constexpr int64_t kLanes = 16;
    static constexpr int64_t kBlockPixels = kWideBlockPixels;
    static constexpr int64_t kPrefetchAhead = kSumPrefetchTerms;
    static constexpr int kGroup = 1;
    static Acc zero() { return _mm512_setzero_ps(); }
    static Acc add(Acc a, const Elem* p) {
        return _mm512_add_ps(a, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
    }
    static void store(Acc a, const float* base, float bias, float scale, float* out, int64_t) {
        store_f32(a, base, bias, scale, out);
    }
};

struct I16 {
    using Elem = int16_t;
    using Acc = __m512i;  // 16 int32 sums
    static constexpr int64_t kLanes = 16;
    static constexpr int64_t kBlockPixels = kWideBlockPixels;
    static constexpr int64_t kPrefetchAhead = kSumPrefetchTerms;
    static constexpr int kGroup = 1;
    static Acc zero() { return _mm512_setzero_si512(); }
    static Acc add(Acc a, const Elem* p) {
        return _mm512_add_epi32(a, _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
    }
    static void store(Acc a, const float* base, float bias, float scale, float* out, int64_t) {
        store_f32(_mm512_cvtepi32_ps(a), base, bias, scale, out);
    }
};

// 64 offset-binary bytes per term, loaded as 32 words w = low + 256 * high. Two 16-bit sums per
// word, `words` += w (wrapping) and `high` += w >> 8, give both bytes' sums exactly (low =
// words - 256 * high, mod 2^16; each < 65536 for kInt8ChunkTerms terms): one load, one shift
// and two adds per 64 pixels, where sign-extending both halves took two loads, two vpmovsxbw
// (port 5 only) and two adds. Word j holds pixels 2j and 2j + 1 of the block whatever the
// run's alignment, so store() re-interleaves them.
struct I8 {
    using Elem = uint8_t;
    struct Acc {
        __m512i words, high;
    };
    static constexpr int64_t kLanes = 64;
    static constexpr int64_t kBlockPixels = kWideBlockPixels;
    static constexpr int64_t kPrefetchAhead = kSumPrefetchTerms;
    static constexpr int kGroup = 1;
    static Acc zero() { return {_mm512_setzero_si512(), _mm512_setzero_si512()}; }
    static Acc add(Acc a, const Elem* p) {
        const __m512i w = _mm512_loadu_si512(p);
        return {_mm512_add_epi16(a.words, w), _mm512_add_epi16(a.high, _mm512_srli_epi16(w, 8))};
    }
    static void store(Acc a, const float* base, float bias, float scale, float* out, int64_t terms) {
        const __m512i low = _mm512_sub_epi16(a.words, _mm512_slli_epi16(a.high, 8));
        // Pixel 2j is low[j], pixel 2j + 1 is high[j]: indices into the pair (low, high).
        alignas(64) static constexpr uint16_t kFirst[32] = {
            0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
            8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
        const __m512i first = _mm512_load_si512(kFirst);
        const __m512i second = _mm512_add_epi16(first, _mm512_set1_epi16(16));
        const __m512i pixels[2] = {_mm512_permutex2var_epi16(low, first, a.high),
                                   _mm512_permutex2var_epi16(low, second, a.high)};
        const __m512i offset = _mm512_set1_epi32(static_cast<int32_t>(terms * kInt8Bias));
        for (int h = 0; h < 2; ++h) {
            for (int i = 0; i < 2; ++i) {
                const __m256i half = i ? _mm512_extracti64x4_epi64(pixels[h], 1) : _mm512_castsi512_si256(pixels[h]);
                const __m512i sum = _mm512_sub_epi32(_mm512_cvtepu16_epi32(half), offset);
                const int64_t at = 32 * h + 16 * i;
                store_f32(_mm512_cvtepi32_ps(sum), base ? base + at : nullptr, bias, scale, out + at);
            }
        }
    }
};

#include "simd_accumulate.inl"

void to_f16(const float* src, int64_t n, uint16_t* dst) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i half = _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), half);
    }
    for (; i < n; ++i) dst[i] = float_to_half(src[i]);
}

// Rounds to nearest even (the MXCSR default) after clamping, like the scalar kernel.
inline __m512i rounded(const float* src, __m512 inv_scale, __m512 limit) {
    const __m512 scaled = _mm512_mul_ps(_mm512_loadu_ps(src), inv_scale);
    return _mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(scaled, limit), _mm512_sub_ps(_mm512_setzero_ps(), limit)));
}

void quantize_i16(const float* src, int64_t n, float inv_scale, int16_t* dst) {
    const __m512 inv = _mm512_set1_ps(inv_scale), limit = _mm512_set1_ps(32767.0f);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtsepi32_epi16(rounded(src + i, inv, limit)));
    }
    for (; i < n; ++i) dst[i] = static_cast<int16_t>(std::nearbyint(std::clamp(src[i] * inv_scale, -32767.0f, 32767.0f)));
}

void quantize_i8(const float* src, int64_t n, float inv_scale, int8_t* dst) {
    const __m512 inv = _mm512_set1_ps(inv_scale), limit = _mm512_set1_ps(127.0f);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm512_cvtsepi32_epi8(rounded(src + i, inv, limit)));
    }
    for (; i < n; ++i) dst[i] = static_cast<int8_t>(std::nearbyint(std::clamp(src[i] * inv_scale, -127.0f, 127.0f)));
}

void copy_rows(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t rows, int64_t width,
               bool relu) {
    const int64_t tail = width % 16;
    const auto mask = static_cast<__mmask16>((1u << tail) - 1);
    // vmaxps returns its second operand when the first is NaN: max(x, 0) is relu_of(x), NaN -> 0.
    const auto apply = [relu](__m512 x) { return relu ? _mm512_max_ps(x, _mm512_setzero_ps()) : x; };
    for (int64_t r = 0; r < rows; ++r, src += src_stride, dst += dst_stride) {
        int64_t c = 0;
        for (; c + 16 <= width; c += 16) _mm512_storeu_ps(dst + c, apply(_mm512_loadu_ps(src + c)));
        if (tail) _mm512_mask_storeu_ps(dst + c, mask, apply(_mm512_maskz_loadu_ps(mask, src + c)));
    }
}

void pool_2x2(const float* top, const float* bottom, int64_t n, bool max, float* out) {
    // Even and odd columns of two 16-float registers: 32 inputs -> 16 outputs.
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512 quarter = _mm512_set1_ps(0.25f);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        const __m512 t0 = _mm512_loadu_ps(top + 2 * j), t1 = _mm512_loadu_ps(top + 2 * j + 16);
        const __m512 b0 = _mm512_loadu_ps(bottom + 2 * j), b1 = _mm512_loadu_ps(bottom + 2 * j + 16);
        const __m512 t_even = _mm512_permutex2var_ps(t0, even, t1), t_odd = _mm512_permutex2var_ps(t0, odd, t1);
        const __m512 b_even = _mm512_permutex2var_ps(b0, even, b1), b_odd = _mm512_permutex2var_ps(b0, odd, b1);
        const __m512 y = max ? _mm512_max_ps(_mm512_max_ps(t_even, t_odd), _mm512_max_ps(b_even, b_odd))
                             : _mm512_mul_ps(quarter, _mm512_add_ps(_mm512_add_ps(t_even, t_odd),
                                                                    _mm512_add_ps(b_even, b_odd)));
        _mm512_storeu_ps(out + j, y);
    }
    pool_2x2_loop(top + 2 * j, bottom + 2 * j, n - j, max, out + j);
}

float largest_norm2(const float* x, int64_t channels, int64_t stride, int64_t n) {
    __m512 most = _mm512_setzero_ps();
    int64_t q = 0;
    for (; q + 16 <= n; q += 16) {
        __m512 sum = _mm512_setzero_ps();
        for (int64_t k = 0; k < channels; ++k) {
            const __m512 v = _mm512_loadu_ps(x + k * stride + q);
            sum = _mm512_fmadd_ps(v, v, sum);
        }
        most = _mm512_max_ps(most, sum);
    }
    float m = _mm512_reduce_max_ps(most);
    for (; q < n; ++q) m = std::max(m, pixel_norm2(x + q, channels, stride));
    return m;
}

float max_abs(const float* src, int64_t n) {
    __m512 largest = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) largest = _mm512_max_ps(largest, _mm512_abs_ps(_mm512_loadu_ps(src + i)));
    float m = _mm512_reduce_max_ps(largest);
    for (; i < n; ++i) m = std::max(m, std::fabs(src[i]));
    return m;
}

inline __m512 load_codewords(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load_codewords(const uint16_t* p, __mmask16 mask) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}
inline __m512 load_codewords(const int8_t* p, __mmask16 mask) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

// Four blocks of 16 codewords per pass, so that four independent FMA chains hide each other's
// latency (one block at a time ran at a quarter of this speed, waiting on its chain).
template <typename Elem>
void fc_table(const Elem* codebook_t, const int32_t* base, const int32_t* rows, int64_t rho, int64_t r, int64_t depth,
              const float* x, float* table) {
    constexpr int kBlocks = 4;
    for (int64_t v = 0; v < rho; ++v) {
        const Elem* segment = codebook_t + static_cast<int64_t>(base[v]) * r;
        const int64_t count = rows[v], channels = std::min(r, depth - v * r);
        for (int64_t c0 = 0; c0 < count; c0 += 16 * kBlocks) {
            __mmask16 mask[kBlocks];
            __m512 sum[kBlocks];
            for (int i = 0; i < kBlocks; ++i) {
                const int64_t left = std::clamp<int64_t>(count - c0 - 16 * i, 0, 16);
                mask[i] = static_cast<__mmask16>((1u << left) - 1);
                sum[i] = _mm512_setzero_ps();
            }
            for (int64_t k = 0; k < channels; ++k) {
                const __m512 xk = _mm512_set1_ps(x[v * r + k]);
                const Elem* column = segment + k * count + c0;
                for (int i = 0; i < kBlocks; ++i) {
                    sum[i] = _mm512_fmadd_ps(xk, load_codewords(column + 16 * i, mask[i]), sum[i]);
                }
            }
            for (int i = 0; i < kBlocks; ++i) _mm512_mask_storeu_ps(table + base[v] + c0 + 16 * i, mask[i], sum[i]);
        }
    }
}

inline __m512i code_index(const uint8_t* codes8, const uint16_t* codes16, int64_t at) {
    return codes8 ? _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes8 + at)))
                  : _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes16 + at)));
}

void fc_gather_f32(const float* table, const int32_t* base, const uint8_t* codes8, const uint16_t* codes16,
                   int64_t rho, int64_t blocks, float* out) {
    for (int64_t b = 0; b < blocks; ++b) {
        __m512 sum[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t v = 0; v < rho; ++v) {
            const __m512i first = _mm512_set1_epi32(base[v]);
            const int64_t at = (b * rho + v) * kFcBlock;
            for (int i = 0; i < 4; ++i) {
                const __m512i index = _mm512_add_epi32(code_index(codes8, codes16, at + 16 * i), first);
                sum[i] = _mm512_add_ps(sum[i], _mm512_i32gather_ps(index, table, 4));
            }
        }
        for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out + b * kFcBlock + 16 * i, sum[i]);
    }
}

// Gathers 4 bytes at table + index (the caller pads the table by 3 bytes) and keeps the first.
void fc_gather_i8(const int8_t* table, const int32_t* base, const uint8_t* codes8, const uint16_t* codes16,
                  int64_t rho, int64_t blocks, int32_t* out) {
    for (int64_t b = 0; b < blocks; ++b) {
        __m512i sum[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                          _mm512_setzero_si512()};
        for (int64_t v = 0; v < rho; ++v) {
            const __m512i first = _mm512_set1_epi32(base[v]);
            const int64_t at = (b * rho + v) * kFcBlock;
            for (int i = 0; i < 4; ++i) {
                const __m512i index = _mm512_add_epi32(code_index(codes8, codes16, at + 16 * i), first);
                const __m512i word = _mm512_i32gather_epi32(index, table, 1);
                sum[i] = _mm512_add_epi32(sum[i], _mm512_srai_epi32(_mm512_slli_epi32(word, 24), 24));
            }
        }
        for (int i = 0; i < 4; ++i) _mm512_storeu_si512(out + b * kFcBlock + 16 * i, sum[i]);
    }
}

// E-FC data is streamed once per call and, between calls, often leaves the caches: prefetch
// this many segments (table build) or 64-byte code rows (sums) ahead.
constexpr int64_t kFcPrefetchSegments = 4;
constexpr int64_t kFcPrefetchCodes = 16;

// Per segment, vpermi2b looks up 64 outputs' codes in the segment's 128-entry int8 table (two
// registers); vpmaddubsw with 0/1 selectors widens even and odd bytes to int16 sums, which are
// spilled to int32 before they could overflow.
void fc_permute_i8(const int8_t* table, const uint8_t* codes, int64_t rho, int64_t blocks, int32_t* out) {
    const __m512i select_even = _mm512_set1_epi16(0x0001), select_odd = _mm512_set1_epi16(0x0100);
    alignas(64) int32_t even[32], odd[32];
    for (int64_t b = 0; b < blocks; ++b) {
        __m512i even32[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
        __m512i odd32[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
        for (int64_t v0 = 0; v0 < rho; v0 += kInt8ChunkTerms) {
            __m512i even16 = _mm512_setzero_si512(), odd16 = _mm512_setzero_si512();
            const int64_t end = std::min(rho, v0 + kInt8ChunkTerms);
            for (int64_t v = v0; v < end; ++v) {
                _mm_prefetch(reinterpret_cast<const char*>(codes + (b * rho + v + kFcPrefetchCodes) * kFcBlock),
                             _MM_HINT_T0);
                const __m512i index = _mm512_loadu_si512(codes + (b * rho + v) * kFcBlock);
                const __m512i low = _mm512_loadu_si512(table + v * 128), high = _mm512_loadu_si512(table + v * 128 + 64);
                const __m512i values = _mm512_permutex2var_epi8(low, index, high);
                even16 = _mm512_add_epi16(even16, _mm512_maddubs_epi16(select_even, values));
                odd16 = _mm512_add_epi16(odd16, _mm512_maddubs_epi16(select_odd, values));
            }
            even32[0] = _mm512_add_epi32(even32[0], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(even16)));
            even32[1] = _mm512_add_epi32(even32[1], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(even16, 1)));
            odd32[0] = _mm512_add_epi32(odd32[0], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(odd16)));
            odd32[1] = _mm512_add_epi32(odd32[1], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(odd16, 1)));
        }
        _mm512_store_si512(even, even32[0]);
        _mm512_store_si512(even + 16, even32[1]);
        _mm512_store_si512(odd, odd32[0]);
        _mm512_store_si512(odd + 16, odd32[1]);
        for (int j = 0; j < 32; ++j) {
            out[b * kFcBlock + 2 * j] = even[j];
            out[b * kFcBlock + 2 * j + 1] = odd[j];
        }
    }
}

// 64 int32 entries (four registers, in order) narrowed to int8 with saturation into [-127, 127].
// r is 8-16, so narrowing costs as much as the dot products: saturating packs narrow 64 entries
// in three instructions (plus one dword permute to undo their per-lane interleave) where
// vpmovsdb took two port-5 uops per 16.
inline __m512i packed_bytes(const __m512i* rounded) {
    const __m512i words01 = _mm512_packs_epi32(rounded[0], rounded[1]);
    const __m512i words23 = _mm512_packs_epi32(rounded[2], rounded[3]);
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i bytes = _mm512_permutexvar_epi32(order, _mm512_packs_epi16(words01, words23));
    return _mm512_max_epi8(bytes, _mm512_set1_epi8(-127));
}

// int8 E-FC table build from uint8 inputs and int8 codewords (VNNI). fp32 FMAs on the int8
// codebook needed two conversions per 16 entries and k, and were half of an int8 FC layer's
// time; one vpdpbusd here does four k at once. The caller's scale is a bound known before the
// build, so entries are narrowed to int8 in registers (an int32 table and a second pass were
// 256 KB more per call for a 4096 -> 1024 layer, and a tenth of a LeNet pair's int8 time).
// NV blocks of 16 codewords per pass keep NV independent accumulator chains in flight.
template <int NV>
inline void fc_table_u8s8_block(const int8_t* segment, int64_t rows, int64_t r4, const uint8_t* x,
                                const int32_t* correction, __m512 factor, int8_t* out) {
    __m512i acc[NV];
    for (int i = 0; i < NV; ++i) {
        acc[i] = correction ? _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(correction + 16 * i))
                            : _mm512_setzero_si512();
    }
    for (int64_t k = 0; k < r4; k += 4) {
        int32_t quad;
        std::memcpy(&quad, x + k, sizeof quad);
        const __m512i inputs = _mm512_set1_epi32(quad);
        const int8_t* column = segment + k * rows;  // [k/4][rows][4]
        for (int i = 0; i < NV; ++i) {
            acc[i] = _mm512_dpbusd_epi32(acc[i], inputs, _mm512_loadu_si512(column + 64 * i));
        }
    }
    __m512i rounded[NV];
    for (int i = 0; i < NV; ++i) rounded[i] = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[i]), factor));
    if constexpr (NV == 4) {
        _mm512_storeu_si512(out, packed_bytes(rounded));
    } else {
        for (int i = 0; i < NV; ++i) {
            const __m512i clamped = _mm512_max_epi32(rounded[i], _mm512_set1_epi32(-127));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * i), _mm512_cvtsepi32_epi8(clamped));
        }
    }
}

void fc_table_u8s8(const int8_t* codebook, const int32_t* first, const int32_t* rows, int64_t rho, int64_t r4,
                   const uint8_t* x, const int32_t* correction, const float* factor, const int32_t* dst,
                   int8_t* table) {
    for (int64_t v = 0; v < rho; ++v) {
        const int64_t n = rows[v];
        const int8_t* segment = codebook + static_cast<int64_t>(first[v]) * r4;
        const int32_t* fix = correction ? correction + first[v] : nullptr;
        int8_t* out = table + dst[v];
        const __m512 f = _mm512_set1_ps(factor[v]);
        if (v + kFcPrefetchSegments < rho) {
            const int8_t* later = codebook + static_cast<int64_t>(first[v + kFcPrefetchSegments]) * r4;
            for (int64_t i = 0; i < rows[v + kFcPrefetchSegments] * r4; i += 64) {
                _mm_prefetch(reinterpret_cast<const char*>(later + i), _MM_HINT_T0);
            }
        }
        int64_t c = 0;
        for (; c + 64 <= n; c += 64) {
            fc_table_u8s8_block<4>(segment + 4 * c, n, r4, x + v * r4, fix ? fix + c : nullptr, f, out + c);
        }
        for (; c < n; c += 16) {
            fc_table_u8s8_block<1>(segment + 4 * c, n, r4, x + v * r4, fix ? fix + c : nullptr, f, out + c);
        }
    }
}

void quantise_u8(const float* src, int64_t n, float inv_scale, float low, float high, float zero, uint8_t* dst) {
    const __m512 inv = _mm512_set1_ps(inv_scale), lo = _mm512_set1_ps(low), hi = _mm512_set1_ps(high);
    const __m512 offset = _mm512_set1_ps(zero);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 scaled = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(src + i), inv), lo), hi);
        const __m512 rounded =
            _mm512_add_ps(_mm512_roundscale_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), offset);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(rounded)));
    }
    for (; i < n; ++i) {
        dst[i] = static_cast<uint8_t>(std::nearbyint(std::clamp(src[i] * inv_scale, low, high)) + zero);
    }
}

// Narrowing stores of 16 table entries, fused into the E-Conv table build.
inline void store_entries(__m512 v, __m512, float* out) { _mm512_storeu_ps(out, v); }
inline void store_entries(__m512 v, __m512, uint16_t* out) {
    const __m256i half = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), half);
}
inline __m512i rounded_entries(__m512 v, __m512 inv_scale, float limit) {
    const __m512 scaled = _mm512_mul_ps(v, inv_scale);
    return _mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(scaled, _mm512_set1_ps(limit)), _mm512_set1_ps(-limit)));
}
inline void store_entries(__m512 v, __m512 inv_scale, int16_t* out) {
    const __m256i narrow = _mm512_cvtsepi32_epi16(rounded_entries(v, inv_scale, 32767.0f));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), narrow);
}
inline __m128i offset_binary(__m128i bytes) { return _mm_xor_si128(bytes, _mm_set1_epi8(static_cast<char>(0x80))); }
inline void store_entries(__m512 v, __m512 inv_scale, uint8_t* out) {
    const __m128i bytes = _mm512_cvtsepi32_epi8(rounded_entries(v, inv_scale, 127.0f));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), offset_binary(bytes));
}

// CW codewords x NV vectors of 16 pixels, all sums in registers. KC = channels as a template
// argument (0: read at run time) unrolls the FMAs, as for the int8 build below.
template <int CW, int NV, int KC, typename Elem>
__attribute__((always_inline)) inline void conv_table_tile(const float* codebook, int64_t r, int64_t channels,
                                                           const float* x, int64_t x_stride, int64_t ld,
                                                           __m512 inv_scale, Elem* out) {
    __m512 acc[CW][NV];
    for (int c = 0; c < CW; ++c) {
        for (int i = 0; i < NV; ++i) acc[c][i] = _mm512_setzero_ps();
    }
    const int64_t count = KC > 0 ? KC : channels;
    for (int64_t k = 0; k < count; ++k) {
        __m512 pixels[NV];
        for (int i = 0; i < NV; ++i) pixels[i] = _mm512_loadu_ps(x + k * x_stride + 16 * i);
        for (int c = 0; c < CW; ++c) {
            const __m512 weight = _mm512_set1_ps(codebook[c * r + k]);
            for (int i = 0; i < NV; ++i) acc[c][i] = _mm512_fmadd_ps(weight, pixels[i], acc[c][i]);
        }
    }
    for (int c = 0; c < CW; ++c) {
        for (int i = 0; i < NV; ++i) store_entries(acc[c][i], inv_scale, out + c * ld + 16 * i);
    }
}

// Tiles of CW codewords x NV = 3 vectors (48 pixels) for CW = 8 (24 accumulators: each pixel
// load feeds 8 FMAs), or NV = 4 for fewer codewords; then the ragged end of the row.
template <int CW, int KC, typename Elem>
void conv_table_rows(const float* codebook, int64_t r, int64_t channels, const float* x, int64_t x_stride,
                     int64_t ld, int64_t pixels, __m512 inv_scale, Elem* out) {
    constexpr int kMain = CW >= 8 ? 3 : 4;
    int64_t q = 0;
    for (; q + 16 * kMain <= pixels; q += 16 * kMain) {
        conv_table_tile<CW, kMain, KC>(codebook, r, channels, x + q, x_stride, ld, inv_scale, out + q);
    }
    switch ((pixels - q) / 16) {
        case 3: conv_table_tile<CW, 3, KC>(codebook, r, channels, x + q, x_stride, ld, inv_scale, out + q); break;
        case 2: conv_table_tile<CW, 2, KC>(codebook, r, channels, x + q, x_stride, ld, inv_scale, out + q); break;
        case 1: conv_table_tile<CW, 1, KC>(codebook, r, channels, x + q, x_stride, ld, inv_scale, out + q); break;
        default: break;
    }
}

template <int KC, typename Elem>
void conv_table_codewords(const float* codebook, int64_t rows, int64_t r, int64_t channels, const float* x,
                          int64_t x_stride, int64_t ld, int64_t pixels, __m512 inv, Elem* out) {
    int64_t c = 0;
    for (; c + 8 <= rows; c += 8) {
        conv_table_rows<8, KC>(codebook + c * r, r, channels, x, x_stride, ld, pixels, inv, out + c * ld);
    }
    for (; c + 4 <= rows; c += 4) {
        conv_table_rows<4, KC>(codebook + c * r, r, channels, x, x_stride, ld, pixels, inv, out + c * ld);
    }
    for (; c < rows; ++c) {
        conv_table_rows<1, KC>(codebook + c * r, r, channels, x, x_stride, ld, pixels, inv, out + c * ld);
    }
}

// The table build is a GEMM with inner dimension r (8-16) and a few hundred rows and pixels.
// At that shape OpenBLAS spends much of its time outside the FMAs (packing, zero-filling C
// for beta = 0) and a narrow table then needs a second pass over fp32 scratch; this
// register-blocked loop (8 codewords x 48 pixels per tile) does only the FMAs and narrows on
// the store. Measured faster than sgemm + narrowing on the LeNet and VGG layers, and 8 x 48
// tiles ~15% faster than 4 x 64 (fewer pixel loads per FMA).
template <typename Elem>
void conv_table(const float* codebook, int64_t rows, int64_t r, int64_t channels, const float* x, int64_t x_stride,
                int64_t ld, int64_t pixels, float inv_scale, Elem* out) {
    const __m512 inv = _mm512_set1_ps(inv_scale);
    // Unrolled for fp32 and fp16 tables; the int16 table's narrowing stores ran ~5% slower so.
    if constexpr (std::is_same_v<Elem, float> || std::is_same_v<Elem, uint16_t>) {
        if (channels == 8) return conv_table_codewords<8>(codebook, rows, r, channels, x, x_stride, ld, pixels, inv, out);
        if (channels == 16) {
            return conv_table_codewords<16>(codebook, rows, r, channels, x, x_stride, ld, pixels, inv, out);
        }
    }
    conv_table_codewords<0>(codebook, rows, r, channels, x, x_stride, ld, pixels, inv, out);
}

// A 32-bit group of four int8 codeword values, read where it lies (vpdpbusd then takes it as an
// embedded broadcast operand).
using Quad = int32_t __attribute__((may_alias, aligned(1)));
inline __m512i quad_at(const int8_t* p) { return _mm512_set1_epi32(*reinterpret_cast<const Quad*>(p)); }

// CW codewords x NV vectors of 16 pixels; vpdpbusd adds four uint8 x int8 products per lane.
// KQ = r4 / 4 as a template argument (0: read r4 at run time) lets the compiler unroll the dot
// products and keep all CW x NV sums in registers; with a run-time trip count GCC spilled them
// to the stack (79 register moves and spills in a 230-instruction tile).
template <int CW, int NV, int KQ>
__attribute__((always_inline)) inline void conv_table_u8s8_tile(const int8_t* codebook, int64_t r4, const uint8_t* x,
                                                                int64_t x_stride, int64_t ld,
                                                                const int32_t* correction, __m512 requant,
                                                                uint8_t* out) {
    __m512i acc[CW][NV];
    for (int c = 0; c < CW; ++c) {
        for (int i = 0; i < NV; ++i) acc[c][i] = _mm512_set1_epi32(-correction[c]);
    }
    const int64_t quads = KQ > 0 ? KQ : r4 / 4;
    for (int64_t kq = 0; kq < quads; ++kq) {
        __m512i pixels[NV];
        for (int i = 0; i < NV; ++i) pixels[i] = _mm512_loadu_si512(x + kq * x_stride + 64 * i);
        for (int c = 0; c < CW; ++c) {
            const __m512i weights = quad_at(codebook + c * r4 + 4 * kq);
            for (int i = 0; i < NV; ++i) acc[c][i] = _mm512_dpbusd_epi32(acc[c][i], pixels[i], weights);
        }
    }
    const __m512i lowest = _mm512_set1_epi32(-127);
    for (int c = 0; c < CW; ++c) {
        __m512i rounded[NV];
        for (int i = 0; i < NV; ++i) rounded[i] = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[c][i]), requant));
        if constexpr (NV == 4) {
            _mm512_storeu_si512(out + c * ld, _mm512_xor_si512(packed_bytes(rounded), _mm512_set1_epi8(static_cast<char>(0x80))));
        } else {
            for (int i = 0; i < NV; ++i) {
                _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c * ld + 16 * i),
                                 offset_binary(_mm512_cvtsepi32_epi8(_mm512_max_epi32(rounded[i], lowest))));
            }
        }
    }
}

template <int CW, int KQ>
void conv_table_u8s8_rows(const int8_t* codebook, int64_t r4, const uint8_t* x, int64_t x_stride, int64_t ld,
                          int64_t pixels, const int32_t* correction, __m512 requant, uint8_t* out) {
    int64_t q = 0;
    for (; q + 64 <= pixels; q += 64) {
        conv_table_u8s8_tile<CW, 4, KQ>(codebook, r4, x + 4 * q, x_stride, ld, correction, requant, out + q);
    }
    switch ((pixels - q) / 16) {
        case 3: conv_table_u8s8_tile<CW, 3, KQ>(codebook, r4, x + 4 * q, x_stride, ld, correction, requant, out + q); break;
        case 2: conv_table_u8s8_tile<CW, 2, KQ>(codebook, r4, x + 4 * q, x_stride, ld, correction, requant, out + q); break;
        case 1: conv_table_u8s8_tile<CW, 1, KQ>(codebook, r4, x + 4 * q, x_stride, ld, correction, requant, out + q); break;
        default: break;
    }
}

template <int KQ>
void conv_table_u8s8_quads(const int8_t* codebook, int64_t rows, int64_t r4, const uint8_t* x, int64_t x_stride,
                           int64_t ld, int64_t pixels, const int32_t* correction, __m512 requant, uint8_t* out) {
    int64_t c = 0;
    for (; c + 4 <= rows; c += 4) {
        conv_table_u8s8_rows<4, KQ>(codebook + c * r4, r4, x, x_stride, ld, pixels, correction + c, requant,
                                    out + c * ld);
    }
    for (; c < rows; ++c) {
        conv_table_u8s8_rows<1, KQ>(codebook + c * r4, r4, x, x_stride, ld, pixels, correction + c, requant,
                                    out + c * ld);
    }
}

// With 8-bit operands one vpdpbusd does the work of four fp32 FMAs, which cuts
// the int8 table build (half of an int8 layer's time with the fp32 build) ~3x.
void conv_table_u8s8(const int8_t* codebook, int64_t rows, int64_t r4, const uint8_t* x, int64_t x_stride, int64_t ld,
                     int64_t pixels, const int32_t* correction, float requant, uint8_t* out) {
    const __m512 scale = _mm512_set1_ps(requant);
    switch (r4 / 4) {  // the usual segment lengths (r <= 32) unrolled
        case 1: conv_table_u8s8_quads<1>(codebook, rows, r4, x, x_stride, ld, pixels, correction, scale, out); break;
        case 2: conv_table_u8s8_quads<2>(codebook, rows, r4, x, x_stride, ld, pixels, correction, scale, out); break;
        case 3: conv_table_u8s8_quads<3>(codebook, rows, r4, x, x_stride, ld, pixels, correction, scale, out); break;
        case 4: conv_table_u8s8_quads<4>(codebook, rows, r4, x, x_stride, ld, pixels, correction, scale, out); break;
        case 5: conv_table_u8s8_quads<5>(codebook, rows, r4, x, x_stride, ld, pixels, correction, scale, out); break;
        case 6: conv_table_u8s8_quads<6>(codebook, rows, r4, x, x_stride, ld, pixels, correction, scale, out); break;
        case 7: conv_table_u8s8_quads<7>(codebook, rows, r4, x, x_stride, ld, pixels, correction, scale, out); break;
        case 8: conv_table_u8s8_quads<8>(codebook, rows, r4, x, x_stride, ld, pixels, correction, scale, out); break;
        default: conv_table_u8s8_quads<0>(codebook, rows, r4, x, x_stride, ld, pixels, correction, scale, out); break;
    }
}

void quantise_quad(const float* src, int64_t channels, int64_t stride, int64_t n, float inv_scale, float low,
                   float high, float zero, uint8_t* dst) {
    const __m512 inv = _mm512_set1_ps(inv_scale), lo = _mm512_set1_ps(low), hi = _mm512_set1_ps(high);
    const __m512 offset = _mm512_set1_ps(zero);
    for (int64_t i = 0; i < n; i += 16) {
        // The last vector of a row not a multiple of 16 long (VGG 28x28's rows: 16 + 12) is masked.
        const __mmask16 mask = n - i >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
        __m512i packed = _mm512_setzero_si512();
        for (int64_t j = 0; j < channels; ++j) {
            const __m512 value = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, src + j * stride + i), inv);
            const __m512 scaled = _mm512_min_ps(_mm512_max_ps(value, lo), hi);
            // Rounds to nearest even, then adds the zero point.
            const __m512 rounded =
                _mm512_add_ps(_mm512_roundscale_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), offset);
            const __m512i level = _mm512_cvtps_epi32(rounded);
            packed = _mm512_or_si512(packed, _mm512_slli_epi32(level, static_cast<unsigned>(8 * j)));
        }
        _mm512_mask_storeu_epi32(dst + 4 * i, mask, packed);
    }
}

void min_max(const float* src, int64_t n, float* low, float* high) {
    __m512 smallest = _mm512_set1_ps(INFINITY), largest = _mm512_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 value = _mm512_loadu_ps(src + i);
        smallest = _mm512_min_ps(smallest, value);
        largest = _mm512_max_ps(largest, value);
    }
    float lo = _mm512_reduce_min_ps(smallest), hi = _mm512_reduce_max_ps(largest);
    for (; i < n; ++i) {
        lo = std::min(lo, src[i]);
        hi = std::max(hi, src[i]);
    }
    *low = lo;
    *high = hi;
}

const KernelTable kAvx512 = {
    "avx512",
    accumulate<F32, 2>,
    accumulate<F16, 2>,
    nullptr,  // set by dispatch.cpp on CPUs with AVX512-FP16
    accumulate<I16, 2>,
    accumulate<I8, 2>,
    to_f16,
    quantize_i16,
    quantize_i8,
    fc_table<float>,
    fc_table<uint16_t>,
    fc_table<int8_t>,
    max_abs,
    largest_norm2,
    copy_rows,
    pool_2x2,
    fc_gather_f32,
    fc_gather_i8,
    fc_permute_i8,
    fc_table_u8s8,
    quantise_u8,
    conv_table<float>,
    conv_table<uint16_t>,
    conv_table<int16_t>,
    conv_table<uint8_t>,
    conv_table_u8s8,
    quantise_quad,
    min_max,
};

}  // namespace

const KernelTable& avx512_kernels() { return kAvx512; }

}  // namespace detail
}  // namespace neuralmerge

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
#endif  // __x86_64__
