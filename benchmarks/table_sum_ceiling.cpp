// The E-Conv table sum's inner loop alone, without the runtime around it: how fast can this CPU
// sum table runs at all? Built and run by table_sum_ceiling.py.
//
// The loops are the ones csrc/kernels/kernels_avx512.cpp runs, for one run of 64 output pixels
// per term and output channel, two output channels per register block and the runs of the
// term 8 ahead prefetched, as in the runtime (simd_accumulate.inl):
//   int8: one 64-byte load of offset-binary bytes, `words += w` and `high += w >> 8` (struct I8);
//   fp16: four 32-byte loads, each widened with vcvtph2ps and added in fp32 (struct F16);
//   fp32: four 64-byte loads, each added (struct F32).
// Arguments: element type (int8|fp16|fp32), segments, codewords per segment, table row length in
// elements, kernel size, padded input width, output channels, pixel blocks, repetitions. Prints
// the median nanoseconds per run of 64 pixels. `build COUNT` instead times the table build's
// instructions (vpdpbusd for int8, vfmadd231ps for the others, and the int8 narrowing; below)
// and the sums' adds (vaddps, vpaddw), alone and mixed half and half with vfmadd231ps: a mix
// no faster per instruction than either alone means the adds and the FMAs share their ports.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

constexpr int kPrefetchTerms = 8;

// Prefetches the runs of both channels' term kPrefetchTerms ahead, as the runtime does.
// prefetcht0 as inline assembly: GCC 12 at -O2 dropped every _mm_prefetch of this file's
// loops (the runtime's own loops keep theirs), which made the loops here slower than the
// runtime's and no ceiling at all.
inline void prefetch_line(const char* p) { __asm__ volatile("prefetcht0 %0" : : "m"(*p)); }

template <typename Elem>
inline void prefetch_run(const Elem* run_start) {
    const char* run = reinterpret_cast<const char*>(run_start);
    constexpr int kBytes = 64 * static_cast<int>(sizeof(Elem));
    for (int b = 0; b < kBytes; b += 64) prefetch_line(run + b);
    prefetch_line(run + kBytes - 1);  // the line an unaligned run spills into
}

// The table build's arithmetic interleaved with the sum, compiled in with -DBUILD_FMAS=N (fp32,
// fp16: N vfmadd231ps per term of two channels) or -DBUILD_DOTS=N -DBUILD_NARROWS=M (int8: N
// vpdpbusd and M narrowings): how much of the build the sum's load stalls could hide, were the
// next strip's table built while this one is summed. Each term also stores one result to an
// L2-sized scratch table, as a build stores its entries.
#ifndef BUILD_FMAS
#define BUILD_FMAS 0
#endif
#ifndef BUILD_DOTS
#define BUILD_DOTS 0
#endif
#ifndef BUILD_NARROWS
#define BUILD_NARROWS 0
#endif
constexpr size_t kScratchFloats = size_t{1} << 18;  // 1 MB
alignas(64) static float scratch[kScratchFloats];
static size_t scratch_at = 0;

// Eight independent sums, named (GCC stored an array of them to the stack on every term).
#define EIGHT_SUMS(V)                                                                 \
    V s0, s1, s2, s3, s4, s5, s6, s7;                                                 \
    template <int F>                                                                  \
    V& at() {                                                                         \
        if constexpr (F % 8 == 0) return s0; else if constexpr (F % 8 == 1) return s1; \
        else if constexpr (F % 8 == 2) return s2; else if constexpr (F % 8 == 3) return s3; \
        else if constexpr (F % 8 == 4) return s4; else if constexpr (F % 8 == 5) return s5; \
        else if constexpr (F % 8 == 6) return s6; else return s7;                     \
    }
struct FloatSums { EIGHT_SUMS(__m512) };
struct IntSums { EIGHT_SUMS(__m512i) };

template <int... F>
inline void fmas(FloatSums& sums, std::integer_sequence<int, F...>) {
    const __m512 x = _mm512_set1_ps(1e-20f), w = _mm512_set1_ps(0.5f);
    ((sums.at<F>() = _mm512_fmadd_ps(x, w, sums.at<F>())), ...);
}

template <int... F>
inline void dots(IntSums& sums, std::integer_sequence<int, F...>) {
    const __m512i x = _mm512_set1_epi32(0x01010101), w = _mm512_set1_epi32(0x01020304);
    ((sums.at<F>() = _mm512_dpbusd_epi32(sums.at<F>(), x, w)), ...);
}

template <int... F>
inline void narrowings(IntSums& sums, std::integer_sequence<int, F...>) {
    // As in `build` below: 16 entries to float, scaled, rounded, packed, and stored as 16 bytes.
    const __m512 factor = _mm512_set1_ps(0.01f);
    const auto narrow = [&](const __m512i& sum) {
        const __m512i packed = _mm512_packs_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_cvtepi32_ps(sum), factor)), sum);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(scratch + scratch_at), _mm512_castsi512_si128(packed));
        scratch_at = (scratch_at + 4) & (kScratchFloats - 1);
    };
    (narrow(sums.at<F>()), ...);
}

inline void build_fp32(FloatSums& sums) {
    fmas(sums, std::make_integer_sequence<int, BUILD_FMAS>{});
    if (BUILD_FMAS) {
        _mm512_storeu_ps(scratch + scratch_at, sums.s0);
        scratch_at = (scratch_at + 16) & (kScratchFloats - 1);
    }
}

inline void build_int8(IntSums& sums) {
    dots(sums, std::make_integer_sequence<int, BUILD_DOTS>{});
    narrowings(sums, std::make_integer_sequence<int, BUILD_NARROWS>{});
}

template <typename Elem>
inline void prefetch_ahead(const Elem* table, const int32_t* first, const int32_t* second, int k, int terms) {
    const int ahead = std::min(k + kPrefetchTerms, terms - 1);
    prefetch_run(table + first[ahead]);
    prefetch_run(table + second[ahead]);
}

__attribute__((noinline)) void sum_int8(const uint8_t* table, const int32_t* first, const int32_t* second, int terms,
                                        __m512i* out) {
    __m512i words0 = _mm512_setzero_si512(), high0 = words0, words1 = words0, high1 = words0;
    const __m512i zero = _mm512_setzero_si512();
    IntSums build{zero, zero, zero, zero, zero, zero, zero, zero};
    for (int k = 0; k < terms; ++k) {
        prefetch_ahead(table, first, second, k, terms);
        build_int8(build);
        const __m512i a = _mm512_loadu_si512(table + first[k]);
        words0 = _mm512_add_epi16(words0, a);
        high0 = _mm512_add_epi16(high0, _mm512_srli_epi16(a, 8));
        const __m512i b = _mm512_loadu_si512(table + second[k]);
        words1 = _mm512_add_epi16(words1, b);
        high1 = _mm512_add_epi16(high1, _mm512_srli_epi16(b, 8));
    }
    out[0] = _mm512_add_epi16(words0, high0);
    out[1] = _mm512_add_epi16(words1, high1);
    for (const __m512i& b : {build.s0, build.s1, build.s2, build.s3, build.s4, build.s5, build.s6, build.s7}) {
        out[0] = _mm512_add_epi32(out[0], b);  // keeps the build alive
    }
}

inline __m512 load_lanes(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load_lanes(const float* p) { return _mm512_loadu_ps(p); }

template <typename Elem>
__attribute__((noinline)) void sum_wide(const Elem* table, const int32_t* first, const int32_t* second, int terms,
                                        __m512* out) {
    // Named sums, not an array: GCC kept an array of them in registers but also stored every
    // one to the stack on every term (the runtime's loop, at -O3 in templates, does not).
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    FloatSums build{a0, a0, a0, a0, a0, a0, a0, a0};
    for (int k = 0; k < terms; ++k) {
        prefetch_ahead(table, first, second, k, terms);
        build_fp32(build);
        const Elem* a = table + first[k];
        const Elem* b = table + second[k];
        a0 = _mm512_add_ps(a0, load_lanes(a));
        b0 = _mm512_add_ps(b0, load_lanes(b));
        a1 = _mm512_add_ps(a1, load_lanes(a + 16));
        b1 = _mm512_add_ps(b1, load_lanes(b + 16));
        a2 = _mm512_add_ps(a2, load_lanes(a + 32));
        b2 = _mm512_add_ps(b2, load_lanes(b + 32));
        a3 = _mm512_add_ps(a3, load_lanes(a + 48));
        b3 = _mm512_add_ps(b3, load_lanes(b + 48));
    }
    out[0] = _mm512_add_ps(a0, b0);
    out[1] = _mm512_add_ps(a1, b1);
    out[2] = _mm512_add_ps(a2, b2);
    out[3] = _mm512_add_ps(a3, b3);
    out[0] = _mm512_add_ps(out[0], _mm512_add_ps(build.s0, build.s1));  // keeps the build alive
    out[1] = _mm512_add_ps(out[1], _mm512_add_ps(build.s2, build.s3));
    out[2] = _mm512_add_ps(out[2], _mm512_add_ps(build.s4, build.s5));
    out[3] = _mm512_add_ps(out[3], _mm512_add_ps(build.s6, build.s7));
}

// Throughput of the table build's instruction on 512-bit registers, 12 independent sums held in
// registers (unrolled: kept in an array, the sums went through the stack and the loop timed
// store forwarding instead). step(sum, j) advances sum j. Returns ns per instruction.
template <typename Acc, typename Step>
__attribute__((noinline)) double throughput_ns(long count, Acc start, Step step) {
    Acc acc[12];
    for (Acc& a : acc) a = start;
    const auto begin = std::chrono::steady_clock::now();
    for (long i = 0; i < count; ++i) {
#pragma GCC unroll 12
        for (int j = 0; j < 12; ++j) acc[j] = step(acc[j], j);
    }
    const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - begin).count();
    volatile char sink = reinterpret_cast<const char*>(acc)[0];
    for (const Acc& a : acc) sink = sink + reinterpret_cast<const char*>(&a)[1];
    return ns / (12.0 * static_cast<double>(count));
}

int main(int argc, char** argv) {
    if (argc == 3 && !std::strcmp(argv[1], "build")) {
        // ns per vpdpbusd, vfmadd231ps, 16 entries narrowed, vaddps, vpaddw, and per instruction
        // of a half-vaddps, half-vfmadd231ps mix
        const long count = std::atol(argv[2]);
        const __m512i x = _mm512_set1_epi32(0x01010101), w = _mm512_set1_epi32(0x01020304);
        const __m512 y = _mm512_set1_ps(0.999f), z = _mm512_set1_ps(0.001f);
        const double dot = throughput_ns(count, _mm512_set1_epi32(1), [&](__m512i a, int) { return _mm512_dpbusd_epi32(a, x, w); });
        const double fma = throughput_ns(count, _mm512_set1_ps(1.0f), [&](__m512 a, int) { return _mm512_fmadd_ps(a, y, z); });
        // The int8 build's narrowing of 16 int32 sums: to float, times the requantisation factor,
        // rounded back, and a quarter of the byte packing of 64 entries (one pack per 16).
        const __m512 factor = _mm512_set1_ps(0.01f);
        const double narrow = throughput_ns(count, _mm512_set1_epi32(1000), [&](__m512i a, int) {
            return _mm512_packs_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_cvtepi32_ps(a), factor)), a);
        });
        const double add = throughput_ns(count, _mm512_set1_ps(1.0f), [&](__m512 a, int) { return _mm512_add_ps(a, z); });
        const double addw = throughput_ns(count, _mm512_set1_epi16(1), [&](__m512i a, int) { return _mm512_add_epi16(a, x); });
        const double mix = throughput_ns(count, _mm512_set1_ps(1.0f), [&](__m512 a, int j) {
            return j % 2 ? _mm512_add_ps(a, z) : _mm512_fmadd_ps(a, y, z);
        });
        std::printf("%.4f %.4f %.4f %.4f %.4f %.4f\n", dot, fma, narrow, add, addw, mix);
        return 0;
    }
    if (argc != 10) {
        std::fprintf(stderr,
                     "usage: %s int8|fp16|fp32 segments codewords row_elements kernel padded_width channels blocks reps\n",
                     argv[0]);
        return 2;
    }
    const char* kind = argv[1];
    const int segments = std::atoi(argv[2]), codewords = std::atoi(argv[3]), row_elements = std::atoi(argv[4]);
    const int kernel = std::atoi(argv[5]), padded_width = std::atoi(argv[6]), channels = std::atoi(argv[7]);
    const int blocks = std::atoi(argv[8]), reps = std::atoi(argv[9]);
    const int width = !std::strcmp(kind, "int8") ? 1 : !std::strcmp(kind, "fp16") ? 2 : !std::strcmp(kind, "fp32") ? 4 : 0;
    const int reach = (kernel - 1) * (padded_width + 1);  // the largest tap shift
    if (!width || segments < 1 || codewords < 1 || kernel < 1 || padded_width < kernel || channels < 2 ||
        channels % 2 || blocks < 1 || reps < 1 || row_elements < 64 * blocks + reach) {
        std::fprintf(stderr, "bad arguments\n");
        return 2;
    }
    const int rows = segments * codewords, terms = segments * kernel * kernel;
    // Bytes of 0x01: small int8 values, fp16 ~6e-8, fp32 ~2e-38; the loops' speed does not
    // depend on the values.
    std::vector<uint8_t> table((static_cast<size_t>(rows) * row_elements + 64) * width + 64, 1);
    // The table starts on a cache line, as the runtime's does (a std::vector's storage is 16
    // bytes off one, which slowed the fp32 sums by up to ~6%).
    uint8_t* const first_line = table.data() + (64 - reinterpret_cast<uintptr_t>(table.data()) % 64) % 64;
    // The runtime's term offsets: per output channel and term (tap i, j; segment v) a random
    // codeword's row of that segment, shifted by the tap (i * padded width + j), so that a
    // channel's runs overlap as the real ones do.
    std::mt19937 rng(1);
    std::vector<int32_t> offsets;
    for (int c = 0; c < channels; ++c) {
        for (int i = 0; i < kernel; ++i) {
            for (int j = 0; j < kernel; ++j) {
                for (int v = 0; v < segments; ++v) {
                    const int row = v * codewords + static_cast<int>(rng() % codewords);
                    offsets.push_back(row * row_elements + i * padded_width + j);
                }
            }
        }
    }
    __m512i sink_i[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    __m512 sink_f[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    std::vector<double> ns;
    for (int r = 0; r < reps; ++r) {
        const auto start = std::chrono::steady_clock::now();
        for (int block = 0; block < blocks; ++block) {
            for (int c = 0; c < channels; c += 2) {
                const int32_t* first = offsets.data() + c * terms;
                const int32_t* second = offsets.data() + (c + 1) * terms;
                if (width == 1) {
                    sum_int8(first_line + 64 * block, first, second, terms, sink_i);
                } else if (width == 2) {
                    sum_wide(reinterpret_cast<const uint16_t*>(first_line) + 64 * block, first, second, terms, sink_f);
                } else {
                    sum_wide(reinterpret_cast<const float*>(first_line) + 64 * block, first, second, terms, sink_f);
                }
            }
        }
        ns.push_back(std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count());
    }
    std::sort(ns.begin(), ns.end());
    volatile float keep = _mm512_reduce_add_ps(sink_f[0]) + static_cast<float>(_mm_cvtsi128_si32(_mm512_castsi512_si128(sink_i[0])));
    (void)keep;
    std::printf("%.4f\n", ns[ns.size() / 2] / (static_cast<double>(blocks) * channels * terms));
    return 0;
}
