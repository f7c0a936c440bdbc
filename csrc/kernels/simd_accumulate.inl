// The table-sum loop shared by the AVX2 and AVX-512 kernels, written once over a SIMD traits
// type T (see kernels_avx2.cpp / kernels_avx512.cpp / kernels_avx512fp16.cpp). Included only
// after an ISA's target pragma, inside an anonymous namespace, so each ISA gets its own
// compiled copy.
//
// T provides: Elem (table element), Acc (accumulator register), kLanes (pixels per Acc),
// kBlockPixels (pixels per register block), zero(), add(Acc, const Elem*) (load kLanes elements,
// widen, add), store(Acc, const float* base_or_null, float bias, float scale, float* out,
// int64_t terms), kPrefetchAhead (how many terms ahead to prefetch the table runs; 0: none;
// kSumPrefetchTerms in lut_internal.h), and kGroup with flush(Acc): kGroup > 1 adds that many
// terms into a narrow partial sum, then flush() widens it into the sums (kGroup = 1: flush is
// never called).

// Sums CH output channels over one block of NV * kLanes pixels (kBlockPixels, or fewer at the
// end of a row of blocks) with all accumulators in registers: every term is NV contiguous loads
// at a constant offset.
template <typename T, int CH, int NV>
inline void accumulate_block(const typename T::Elem* table, const int32_t* const* offs, int64_t terms, int64_t q0,
                             const float* bias, float scale, bool add, float* const* out) {
    typename T::Acc acc[CH][NV];
    for (int c = 0; c < CH; ++c) {
        for (int i = 0; i < NV; ++i) acc[c][i] = T::zero();
    }
    const auto term = [&](int64_t k) __attribute__((always_inline)) {
        if constexpr (T::kPrefetchAhead > 0) {
            // The runs a block reads lie all over an L2-sized table; their addresses are known
            // ahead, and fetching them a few terms early hid most of the L2 latency that
            // bounded the loop (int8 VGG 28x28x256 with 64-pixel blocks, 8 terms ahead: 1.78 ->
            // 1.27 ns per term and block).
            const int64_t ahead = std::min(k + T::kPrefetchAhead, terms - 1);
            for (int c = 0; c < CH; ++c) {
                const char* run = reinterpret_cast<const char*>(table + offs[c][ahead] + q0);
                constexpr int kBytes = static_cast<int>(NV * T::kLanes * sizeof(typename T::Elem));
                for (int b = 0; b < kBytes; b += 64) _mm_prefetch(run + b, _MM_HINT_T0);
                _mm_prefetch(run + kBytes - 1, _MM_HINT_T0);  // the line an unaligned run spills into
            }
        }
        for (int c = 0; c < CH; ++c) {
            const typename T::Elem* src = table + offs[c][k] + q0;
            for (int i = 0; i < NV; ++i) acc[c][i] = T::add(acc[c][i], src + i * T::kLanes);
        }
    };
    if constexpr (T::kGroup > 1) {
        for (int64_t k0 = 0; k0 < terms; k0 += T::kGroup) {
            const int64_t end = std::min(terms, k0 + T::kGroup);
            for (int64_t k = k0; k < end; ++k) term(k);
            for (int c = 0; c < CH; ++c) {
                for (int i = 0; i < NV; ++i) acc[c][i] = T::flush(acc[c][i]);
            }
        }
    } else {
        for (int64_t k = 0; k < terms; ++k) term(k);
    }
    for (int c = 0; c < CH; ++c) {
        for (int i = 0; i < NV; ++i) {
            float* dst = out[c] + q0 + i * T::kLanes;
            T::store(acc[c][i], add ? dst : nullptr, bias[c], scale, dst, terms);
        }
    }
}

// accumulate_block with NV = vectors, tried from the widest down: a block is narrower than
// kBlockPixels at the end of a row whose pixel count is not a multiple of it (VGG 28x28: 240
// pixels per strip, the last of two 128-pixel blocks 7 of 8 fp32 vectors).
template <typename T, int CH, int NV>
inline void accumulate_vectors(int vectors, const typename T::Elem* table, const int32_t* const* offs, int64_t terms,
                            int64_t q0, const float* bias, float scale, bool add, float* const* out) {
    if constexpr (NV > 0) {
        if (vectors == NV) return accumulate_block<T, CH, NV>(table, offs, terms, q0, bias, scale, add, out);
        accumulate_vectors<T, CH, NV - 1>(vectors, table, offs, terms, q0, bias, scale, add, out);
    }
}

// Pixel blocks are the outer loop: one block's outputs for every channel are finished before
// the next, so the table window the block reads (every row, kBlockPixels pixels plus the largest
// tap shift) is fetched into L2 once and shared by all channels. Channel-major order swept the
// whole strip table per channel pair and, for VGG-sized layers (C*rho = 4096 rows), ran at L3
// bandwidth.
template <typename T, int CH>
void accumulate(const typename T::Elem* table, const int32_t* offsets, int64_t offset_stride, int64_t terms,
                int64_t channels, int64_t pixels, const float* bias, float scale, bool add, float* out,
                int64_t out_stride) {
    // A last, narrower block computes up to pixels rounded up to kLanes: within the kPixelBlock
    // padding the table and out rows have.
    static_assert(kPixelBlock % T::kLanes == 0 && T::kBlockPixels % T::kLanes == 0, "blocks of whole vectors");
    constexpr int kVectors = static_cast<int>(T::kBlockPixels / T::kLanes);
    for (int64_t q0 = 0; q0 < pixels; q0 += T::kBlockPixels) {
        const int vectors = static_cast<int>(std::min<int64_t>(kVectors, (pixels - q0 + T::kLanes - 1) / T::kLanes));
        const auto block = [&](const int32_t* const* offs, const float* biases, float* const* rows,
                               auto channels_per_block) {
            constexpr int kChannels = decltype(channels_per_block)::value;
            accumulate_vectors<T, kChannels, kVectors>(vectors, table, offs, terms, q0, biases, scale, add, rows);
        };
        int64_t ch = 0;
        for (; ch + CH <= channels; ch += CH) {
            const int32_t* offs[CH];
            float* rows[CH];
            for (int c = 0; c < CH; ++c) {
                offs[c] = offsets + (ch + c) * offset_stride;
                rows[c] = out + (ch + c) * out_stride;
            }
            block(offs, bias + ch, rows, std::integral_constant<int, CH>{});
        }
        for (; ch < channels; ++ch) {
            const int32_t* offs[1] = {offsets + ch * offset_stride};
            float* rows[1] = {out + ch * out_stride};
            block(offs, bias + ch, rows, std::integral_constant<int, 1>{});
        }
    }
}
