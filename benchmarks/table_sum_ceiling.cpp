// The int8 E-Conv table sum's inner loop alone, without the runtime around it: how fast can this
// CPU sum table runs at all? Built and run by table_sum_ceiling.py.
//
// The loop is the one csrc/kernels/kernels_avx512.cpp runs (struct I8): per term and output
// channel one 64-byte load of offset-binary bytes, `words += w` and `high += w >> 8`. Two output
// channels per register block, as in the runtime. Arguments: table rows, row length in bytes,
// terms per channel, channels, pixel blocks, alignment of the run offsets (1 = any byte),
// repetitions. Prints the median nanoseconds per 64-byte vector.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

__attribute__((noinline)) void sum_two_channels(const uint8_t* table, const int32_t* first, const int32_t* second,
                                                int terms, __m512i* out) {
    __m512i words0 = _mm512_setzero_si512(), high0 = words0, words1 = words0, high1 = words0;
    for (int k = 0; k < terms; ++k) {
        const __m512i a = _mm512_loadu_si512(table + first[k]);
        words0 = _mm512_add_epi16(words0, a);
        high0 = _mm512_add_epi16(high0, _mm512_srli_epi16(a, 8));
        const __m512i b = _mm512_loadu_si512(table + second[k]);
        words1 = _mm512_add_epi16(words1, b);
        high1 = _mm512_add_epi16(high1, _mm512_srli_epi16(b, 8));
    }
    out[0] = words0;
    out[1] = high0;
    out[2] = words1;
    out[3] = high1;
}

int main(int argc, char** argv) {
    if (argc != 8) {
        std::fprintf(stderr, "usage: %s rows row_bytes terms channels blocks alignment reps\n", argv[0]);
        return 2;
    }
    const int rows = std::atoi(argv[1]), row_bytes = std::atoi(argv[2]), terms = std::atoi(argv[3]);
    const int channels = std::atoi(argv[4]), blocks = std::atoi(argv[5]), alignment = std::atoi(argv[6]);
    const int reps = std::atoi(argv[7]);
    const int reach = row_bytes - 64 * blocks;  // largest tap shift that keeps every run in its row
    if (rows < 1 || reach < 0 || terms < 1 || channels < 2 || channels % 2 || blocks < 1 || alignment < 1 || reps < 1) {
        std::fprintf(stderr, "bad arguments\n");
        return 2;
    }
    std::vector<uint8_t> table(static_cast<size_t>(rows) * row_bytes + 64, 1);
    std::mt19937 rng(1);
    std::vector<int32_t> offsets(static_cast<size_t>(channels) * terms);
    for (int32_t& o : offsets) o = static_cast<int32_t>(rng() % rows) * row_bytes + (rng() % (reach + 1)) / alignment * alignment;
    __m512i sink[4];
    std::vector<double> ns;
    for (int r = 0; r < reps; ++r) {
        const auto start = std::chrono::steady_clock::now();
        for (int block = 0; block < blocks; ++block) {
            for (int c = 0; c < channels; c += 2) {
                sum_two_channels(table.data() + 64 * block, offsets.data() + c * terms,
                                 offsets.data() + (c + 1) * terms, terms, sink);
            }
        }
        ns.push_back(std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count());
    }
    std::sort(ns.begin(), ns.end());
    volatile int keep = _mm_cvtsi128_si32(_mm512_castsi512_si128(sink[0]));
    (void)keep;
    std::printf("%.4f\n", ns[ns.size() / 2] / (static_cast<double>(blocks) * channels * terms));
    return 0;
}
