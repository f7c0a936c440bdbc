// The E-Conv table sum's inner loop alone, without the runtime around it: how fast can this CPU
// sum table runs at all? Built and run by table_sum_ceiling.py.
//
// The loops are the ones csrc/kernels/kernels_avx512.cpp runs, for one run of 64 output pixels
// per term and output channel, two output channels per register block and the runs of the
// term 8 ahead prefetched, as in the runtime (simd_accumulate.inl):
//   int8: one 64-byte load of offset-binary bytes, `words += w` and `high += w >> 8` (struct I8);
//   fp16: four 32-byte loads, each widened with vcvtph2ps and added in fp32 (struct F16);
//   fp32: four 64-byte loads, each added (struct F32).
// Arguments: element type (int8|fp16|fp32), table rows, row length in elements, terms per
// channel, channels, pixel blocks, alignment of the run offsets in elements (1 = any),
// repetitions. Prints the median nanoseconds per run of 64 pixels.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

constexpr int kPrefetchTerms = 8;

// Prefetches the runs of both channels' term kPrefetchTerms ahead, as the runtime does.
template <typename Elem>
inline void prefetch_ahead(const Elem* table, const int32_t* first, const int32_t* second, int k, int terms) {
    const int ahead = std::min(k + kPrefetchTerms, terms - 1);
    constexpr int kBytes = 64 * static_cast<int>(sizeof(Elem));
    for (const int32_t* offs : {first, second}) {
        const char* run = reinterpret_cast<const char*>(table + offs[ahead]);
        for (int b = 0; b < kBytes; b += 64) _mm_prefetch(run + b, _MM_HINT_T0);
        _mm_prefetch(run + kBytes - 1, _MM_HINT_T0);  // the line an unaligned run spills into
    }
}

__attribute__((noinline)) void sum_int8(const uint8_t* table, const int32_t* first, const int32_t* second, int terms,
                                        __m512i* out) {
    __m512i words0 = _mm512_setzero_si512(), high0 = words0, words1 = words0, high1 = words0;
    for (int k = 0; k < terms; ++k) {
        prefetch_ahead(table, first, second, k, terms);
        const __m512i a = _mm512_loadu_si512(table + first[k]);
        words0 = _mm512_add_epi16(words0, a);
        high0 = _mm512_add_epi16(high0, _mm512_srli_epi16(a, 8));
        const __m512i b = _mm512_loadu_si512(table + second[k]);
        words1 = _mm512_add_epi16(words1, b);
        high1 = _mm512_add_epi16(high1, _mm512_srli_epi16(b, 8));
    }
    out[0] = _mm512_add_epi16(words0, high0);
    out[1] = _mm512_add_epi16(words1, high1);
}

inline __m512 load_lanes(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load_lanes(const float* p) { return _mm512_loadu_ps(p); }

template <typename Elem>
__attribute__((noinline)) void sum_wide(const Elem* table, const int32_t* first, const int32_t* second, int terms,
                                        __m512* out) {
    __m512 acc[2][4];
    for (auto& channel : acc) {
        for (__m512& lanes : channel) lanes = _mm512_setzero_ps();
    }
    for (int k = 0; k < terms; ++k) {
        prefetch_ahead(table, first, second, k, terms);
        const Elem* a = table + first[k];
        const Elem* b = table + second[k];
        for (int i = 0; i < 4; ++i) {
            acc[0][i] = _mm512_add_ps(acc[0][i], load_lanes(a + 16 * i));
            acc[1][i] = _mm512_add_ps(acc[1][i], load_lanes(b + 16 * i));
        }
    }
    for (int i = 0; i < 4; ++i) out[i] = _mm512_add_ps(acc[0][i], acc[1][i]);
}

int main(int argc, char** argv) {
    if (argc != 9) {
        std::fprintf(stderr, "usage: %s int8|fp16|fp32 rows row_elements terms channels blocks alignment reps\n",
                     argv[0]);
        return 2;
    }
    const char* kind = argv[1];
    const int rows = std::atoi(argv[2]), row_elements = std::atoi(argv[3]), terms = std::atoi(argv[4]);
    const int channels = std::atoi(argv[5]), blocks = std::atoi(argv[6]), alignment = std::atoi(argv[7]);
    const int reps = std::atoi(argv[8]);
    const int width = !std::strcmp(kind, "int8") ? 1 : !std::strcmp(kind, "fp16") ? 2 : !std::strcmp(kind, "fp32") ? 4 : 0;
    const int reach = row_elements - 64 * blocks;  // largest tap shift that keeps every run in its row
    if (!width || rows < 1 || reach < 0 || terms < 1 || channels < 2 || channels % 2 || blocks < 1 || alignment < 1 ||
        reps < 1) {
        std::fprintf(stderr, "bad arguments\n");
        return 2;
    }
    // Bytes of 0x01: small int8 values, fp16 ~6e-8, fp32 ~2e-38; the loops' speed does not
    // depend on the values.
    std::vector<uint8_t> table((static_cast<size_t>(rows) * row_elements + 64) * width, 1);
    std::mt19937 rng(1);
    std::vector<int32_t> offsets(static_cast<size_t>(channels) * terms);
    for (int32_t& o : offsets) {
        o = static_cast<int32_t>(rng() % rows) * row_elements + (rng() % (reach + 1)) / alignment * alignment;
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
                    sum_int8(table.data() + 64 * block, first, second, terms, sink_i);
                } else if (width == 2) {
                    sum_wide(reinterpret_cast<const uint16_t*>(table.data()) + 64 * block, first, second, terms, sink_f);
                } else {
                    sum_wide(reinterpret_cast<const float*>(table.data()) + 64 * block, first, second, terms, sink_f);
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
