// Portable kernels: plain loops the compiler may vectorise for the baseline ISA. They define
// the results the AVX kernels must reproduce (same rounding, same saturation).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "lut_internal.h"

namespace neuralmerge {
namespace detail {
namespace {

inline float widen(float value) { return value; }
inline float widen(uint16_t half) { return half_to_float(half); }
inline int32_t widen(int16_t value) { return value; }
inline int32_t widen(int8_t value) { return value; }
inline int32_t widen(uint8_t offset_binary) { return int32_t{offset_binary} - kInt8Bias; }

// Sums are kept per block of kPixelBlock pixels in a small local array (L1-resident).
template <typename Elem, typename Acc>
void accumulate(const Elem* table, const int32_t* offsets, int64_t offset_stride, int64_t terms, int64_t channels,
                int64_t pixels, const float* bias, float scale, bool add, float* out, int64_t out_stride) {
    Acc sum[kPixelBlock];
    for (int64_t ch = 0; ch < channels; ++ch) {
        const int32_t* offs = offsets + ch * offset_stride;
        float* out_ch = out + ch * out_stride;
        for (int64_t q0 = 0; q0 < pixels; q0 += kPixelBlock) {
            std::fill(sum, sum + kPixelBlock, Acc(0));
            for (int64_t k = 0; k < terms; ++k) {
                const Elem* src = table + offs[k] + q0;
                for (int64_t q = 0; q < kPixelBlock; ++q) sum[q] += widen(src[q]);
            }
            for (int64_t q = 0; q < kPixelBlock; ++q) {
                const float base = add ? out_ch[q0 + q] : bias[ch];
                out_ch[q0 + q] = base + scale * static_cast<float>(sum[q]);
            }
        }
    }
}

void to_f16(const float* src, int64_t n, uint16_t* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_half(src[i]);
}

template <typename Int>
void quantize(const float* src, int64_t n, float inv_scale, Int* dst) {
    const float limit = static_cast<float>(std::numeric_limits<Int>::max());
    for (int64_t i = 0; i < n; ++i) {
        // nearbyint rounds half to even, as the AVX conversions do.
        dst[i] = static_cast<Int>(std::nearbyint(std::clamp(src[i] * inv_scale, -limit, limit)));
    }
}

template <typename Elem>
void fc_table(const Elem* codebook_t, const int32_t* base, const int32_t* rows, int64_t rho, int64_t r, int64_t depth,
              const float* x, float* table) {
    for (int64_t v = 0; v < rho; ++v) {
        float* out = table + base[v];
        const Elem* segment = codebook_t + static_cast<int64_t>(base[v]) * r;
        const int64_t count = rows[v], channels = std::min(r, depth - v * r);
        std::fill(out, out + count, 0.0f);
        for (int64_t k = 0; k < channels; ++k) {
            const float xk = x[v * r + k];
            const Elem* column = segment + k * count;
            for (int64_t c = 0; c < count; ++c) out[c] += xk * widen(column[c]);
        }
    }
}

void copy_rows(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t rows, int64_t width,
               bool relu) {
    for (int64_t r = 0; r < rows; ++r) {
        if (!relu) {
            std::memcpy(dst + r * dst_stride, src + r * src_stride, sizeof(float) * width);
            continue;
        }
        for (int64_t c = 0; c < width; ++c) dst[r * dst_stride + c] = relu_of(src[r * src_stride + c]);
    }
}

float largest_norm2(const float* x, int64_t channels, int64_t stride, int64_t n) {
    float m = 0.0f;
    for (int64_t q = 0; q < n; ++q) m = std::max(m, pixel_norm2(x + q, channels, stride));
    return m;
}

float max_abs(const float* src, int64_t n) {
    float m = 0.0f;
    for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(src[i]));
    return m;
}

template <typename Table, typename Acc>
void fc_gather(const Table* table, const int32_t* base, const uint8_t* codes8, const uint16_t* codes16,
               int64_t rho, int64_t blocks, Acc* out) {
    for (int64_t b = 0; b < blocks; ++b) {
        Acc sum[kFcBlock] = {};
        for (int64_t v = 0; v < rho; ++v) {
            const Table* segment = table + base[v];
            const int64_t at = (b * rho + v) * kFcBlock;
            for (int64_t j = 0; j < kFcBlock; ++j) sum[j] += segment[codes8 ? codes8[at + j] : codes16[at + j]];
        }
        std::copy(sum, sum + kFcBlock, out + b * kFcBlock);
    }
}

const KernelTable kScalar = {
    "scalar",
    accumulate<float, float>,
    accumulate<uint16_t, float>,
    nullptr,  // no fp16 arithmetic
    accumulate<int16_t, int32_t>,
    accumulate<uint8_t, int32_t>,
    to_f16,
    quantize<int16_t>,
    quantize<int8_t>,
    fc_table<float>,
    fc_table<uint16_t>,
    fc_table<int8_t>,
    max_abs,
    largest_norm2,
    copy_rows,
    pool_2x2_loop,
    fc_gather<float, float>,
    fc_gather<int8_t, int32_t>,
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

const KernelTable& scalar_kernels() { return kScalar; }

}  // namespace detail
}  // namespace neuralmerge
