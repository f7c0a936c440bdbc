// Internal interface between the prepared layers (econv_layer.cpp, egemm_layer.cpp) and the
// per-instruction-set kernels (kernels_scalar.cpp, kernels_avx2.cpp, kernels_avx512.cpp).
//
// Every ISA file fills one KernelTable with the same functions; the layers pick a table once at
// construction (dispatch.cpp) and never branch on the CPU again.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "neuralmerge/lut_kernels.h"

namespace neuralmerge {
namespace detail {

/// An encoded weight's codes read where they lie (uint8 or uint16): layers reorganise them at
/// load, and a widened copy was 8 bytes per code (205 MB transient for VGG-16's first FC layer).
class CodeView {
   public:
    CodeView(const void* data, CodeType type, int64_t size) : data_(data), type_(type), size_(size) {}
    int64_t operator[](int64_t i) const {
        return type_ == CodeType::kUInt8 ? static_cast<const uint8_t*>(data_)[i] : static_cast<const uint16_t*>(data_)[i];
    }
    int64_t size() const { return size_; }

   private:
    const void* data_;
    CodeType type_;
    int64_t size_;
};

/// The codes after every check of the encoded weight (lut_kernels.cpp); `rows` receives, per
/// segment, 1 + the largest code used.
CodeView validated_codes(const EncodedWeight& weight, std::vector<int64_t>& rows);

/// The padding unit of the sums: callers give the table and the out rows room for an accumulate
/// call's pixels rounded up to this many. The kernels' register blocks (kBlockPixels in
/// simd_accumulate.inl: this many with AVX2, kWideBlockPixels with AVX-512) end a call with a
/// narrower block that stops at the pixels rounded up to one vector, within that padding.
constexpr int64_t kPixelBlock = 64;
/// The AVX-512 sums' register blocks: 128 pixels. A term's unaligned run then spans one cache
/// line more than its data, not one per 64 pixels, and its offset is read once per 128 pixels:
/// in-process A/B against 64-pixel blocks (2026-12-06), fp16 5-6%, int16 4-5%, int8 1-4% faster,
/// fp32 0-2%.
constexpr int64_t kWideBlockPixels = 128;
/// How many terms ahead the AVX-512 sums prefetch a term's runs: 4 (a 128-pixel block's runs of
/// two channels are 6-10 cache lines per term), and 1 for fp32 (18 lines per term, more than the
/// core's 16 outstanding L1 misses). In-process A/B: 4 against 8 made VGG fp32 ~5% and fp16/int16
/// ~2% faster, int8 and LeNet conv2 0-3% (2 and 3 were no better for them, 16 slower); for fp32,
/// 2 against 4 gave VGG 28x28x256 -7%, VGG 56x56x128 -4%, LeNet conv2 -2%, and 1 against 2 another
/// 1-3.5%.
constexpr int64_t kSumPrefetchTerms = 4;
constexpr int64_t kSumPrefetchTermsF32 = 1;
/// Output channels an E-FC kernel handles per block (codes are stored [block][segment][64]).
constexpr int64_t kFcBlock = 64;
/// Largest number of int8 table terms summed in one run: their offset-binary bytes (below) sum
/// to at most 255 * 256 < 65536, exact in 16-bit lanes read as unsigned.
constexpr int64_t kInt8ChunkTerms = 256;
/// int8 E-Conv tables store every entry offset-binary, as the byte value + kInt8Bias (1..255
/// for values -127..127). The AVX-512 sum then widens 64 bytes with one shift instead of two
/// sign extensions (see kernels_avx512.cpp); every ISA reads and writes the same format.
constexpr int32_t kInt8Bias = 128;
/// Terms an fp16 table sum adds in fp16 before widening to fp32 (KernelTable::
/// accumulate_f16_partial); the layer uses it only while that many entries' sum stays finite.
constexpr int kFp16PartialTerms = 4;
/// Largest finite half-precision value.
constexpr float kFp16Max = 65504.0f;
/// Largest number of int16 table terms whose sum is safe in int32.
constexpr int64_t kInt16ChunkTerms = 65536;

/// out[ch][q] = (accumulate ? out[ch][q] : bias[ch]) + scale * sum_k table[offsets[ch][k] + q]
/// for ch < channels, q < pixels (a multiple of 16); row ch of offsets starts at
/// offsets + ch * offset_stride; rows of out are out_stride floats apart. Table entries are
/// read as values: offset-binary bytes (uint8_t) count as byte - kInt8Bias. A kernel may compute
/// up to pixels rounded up to kPixelBlock (the out rows and the table have room for that).
template <typename Elem>
using AccumulateFn = void (*)(const Elem* table, const int32_t* offsets, int64_t offset_stride, int64_t terms,
                              int64_t channels,
                              int64_t pixels, const float* bias, float scale, bool accumulate, float* out,
                              int64_t out_stride);

/// E-FC sum over segments for blocks of kFcBlock outputs: out[b*64 + j] =
/// sum_v table[base[v] + codes[(b*rho + v)*64 + j]]; codes8 or codes16 is non-null.
using FcGatherF32Fn = void (*)(const float* table, const int32_t* base, const uint8_t* codes8,
                               const uint16_t* codes16, int64_t rho, int64_t blocks, float* out);
/// E-FC table of one input row: table[base[v] + c] = sum_k x[v*r + k] * codebook_t[base[v]*r + k*rows[v] + c]
/// for c < rows[v], k < min(r, depth - v*r) (codebook segments stored transposed, [k][c]).
template <typename Elem>
using FcTableFn = void (*)(const Elem* codebook_t, const int32_t* base, const int32_t* rows, int64_t rho,
                           int64_t r, int64_t depth, const float* x, float* table);
using FcGatherI8Fn = void (*)(const int8_t* table, const int32_t* base, const uint8_t* codes8,
                              const uint16_t* codes16, int64_t rho, int64_t blocks, int32_t* out);

/// E-Conv table rows of one segment, narrowed as they are stored:
/// out[c*ld + q] = narrow(sum_{k < channels} codebook[c*r + k] * x[k*x_stride + q]) for c < rows,
/// q < pixels (a multiple of 16, <= ld), where narrow is the identity (fp32), fp16 rounding, or
/// saturate(round(value * inv_scale)) (int16; int8 then adds kInt8Bias). Summation runs over k in order with fused
/// multiply-adds, as OpenBLAS's sgemm kernels do, so results match the sgemm path.
template <typename Elem>
using ConvTableFn = void (*)(const float* codebook, int64_t rows, int64_t r, int64_t channels, const float* x,
                             int64_t x_stride, int64_t ld, int64_t pixels, float inv_scale, Elem* out);

/// int8 E-Conv table rows of one segment from quantised operands (VNNI), offset-binary:
/// out[c*ld + q] = kInt8Bias + saturate(round((sum_k codebook[c*r4 + k] * x(k, q) - correction[c]) * requant))
/// for c < rows, q < pixels (a multiple of 16, <= ld), k < r4 (a multiple of 4), where
/// x(k, q) = x[(k/4) * x_stride + 4*q + k%4] (uint8, four channels interleaved per pixel).
using ConvTableU8S8Fn = void (*)(const int8_t* codebook, int64_t rows, int64_t r4, const uint8_t* x,
                                 int64_t x_stride, int64_t ld, int64_t pixels, const int32_t* correction,
                                 float requant, uint8_t* out);

/// A calibrated int8 activation step a layer accepts: 0 (none: each call's range) or a step
/// whose inverse is finite (a step below ~3e-39 made 1/step infinity and quantised zeros as NaN).
inline bool valid_input_scale(float scale) { return scale == 0.0f || (scale >= 1e-30f && scale <= 1e30f); }
/// Throws std::invalid_argument naming the value unless valid_input_scale(scale).
void require_valid_input_scale(float scale);

/// The ONNX Relu of one value, as the executor's Relu op computes it (x > 0 ? x : 0).
inline float relu_of(float x) { return x > 0.0f ? x : 0.0f; }

/// sum_{k < channels} x[k*stride]^2 with fused multiply-adds in k order: one pixel of
/// KernelTable::largest_norm2 (its scalar path and every ISA's tail).
inline float pixel_norm2(const float* x, int64_t channels, int64_t stride) {
    float sum = 0.0f;
    for (int64_t k = 0; k < channels; ++k) sum = std::fma(x[k * stride], x[k * stride], sum);
    return sum;
}

/// KernelTable::pool_2x2 as a plain loop: the scalar kernel and the SIMD tails.
inline void pool_2x2_loop(const float* top, const float* bottom, int64_t n, bool max, float* out) {
    for (int64_t j = 0; j < n; ++j) {
        const float a = top[2 * j], b = top[2 * j + 1], c = bottom[2 * j], d = bottom[2 * j + 1];
        out[j] = max ? std::max(std::max(a, b), std::max(c, d)) : 0.25f * ((a + b) + (c + d));
    }
}

/// How the int8 VNNI builds (E-Conv and E-FC) quantise an input to uint8: value = step * (q - zero)
/// with q clamped to [low, high] + zero. Inputs >= 0 (after a ReLU) use all 256 levels (zero 0);
/// inputs with negative values a zero point of 128.
struct ActivationQuantisation {
    bool offset = false;  // zero point 128
    float step = 1.0f;
    float low = 0.0f, high = 255.0f, zero = 0.0f;
};

/// The quantisation of an input whose values span [smallest, largest]: the step is the
/// calibrated int8 step (LutOptions::input_scale, largest |input| / 127) when given, inputs >= 0
/// spreading that range over all 255 levels; else this input's own range.
inline ActivationQuantisation activation_quantisation(float smallest, float largest, float input_scale) {
    ActivationQuantisation q;
    q.offset = smallest < 0.0f;
    if (q.offset) {
        q.low = -127.0f;
        q.high = 127.0f;
        q.zero = 128.0f;
    }
    const float range = q.offset ? std::max(-smallest, largest) / 127.0f : largest / 255.0f;
    if (input_scale > 0.0f) {
        q.step = q.offset ? input_scale : input_scale * (127.0f / 255.0f);
    } else if (range > 0.0f && std::isfinite(range)) {
        q.step = range;
    }
    return q;
}

struct KernelTable {
    const char* isa;  ///< "avx512", "avx2" or "scalar": the suffix of kernel names
    AccumulateFn<float> accumulate_f32;
    AccumulateFn<uint16_t> accumulate_f16;  ///< table holds IEEE half bits
    /// The fp16 sum with partial sums of kFp16PartialTerms terms in fp16 (AVX512-FP16), or null.
    AccumulateFn<uint16_t> accumulate_f16_partial;
    AccumulateFn<int16_t> accumulate_i16;
    AccumulateFn<uint8_t> accumulate_i8;  ///< offset-binary table (kInt8Bias)
    void (*to_f16)(const float* src, int64_t n, uint16_t* dst);
    /// dst = saturate(round(src * inv_scale)) into [-limit, limit].
    void (*quantize_i16)(const float* src, int64_t n, float inv_scale, int16_t* dst);
    void (*quantize_i8)(const float* src, int64_t n, float inv_scale, int8_t* dst);
    FcTableFn<float> fc_table_f32;
    FcTableFn<uint16_t> fc_table_f16;  ///< codebook holds IEEE half bits
    FcTableFn<int8_t> fc_table_i8;     ///< int8 codebook; x comes scaled by each segment's step
    float (*max_abs)(const float* src, int64_t n);
    /// max over q < n of sum_{k < channels} x[k*stride + q]^2 (the largest squared norm of a pixel's
    /// channel vector; fused multiply-adds in k order).
    float (*largest_norm2)(const float* x, int64_t channels, int64_t stride, int64_t n);
    /// dst[r*dst_stride + c] = src[r*src_stride + c] (relu: relu_of that) for r < rows, c < width: a
    /// layer's output rows out of the padded-width rows the sums are computed in.
    void (*copy_rows)(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t rows, int64_t width,
                      bool relu);
    /// 2x2 pooling at stride 2 of one output row: out[j] = max (max) or mean (else) of top[2j],
    /// top[2j+1], bottom[2j], bottom[2j+1] for j < n.
    void (*pool_2x2)(const float* top, const float* bottom, int64_t n, bool max, float* out);
    FcGatherF32Fn fc_gather_f32;
    FcGatherI8Fn fc_gather_i8;
    /// E-FC with an int8 table of 128 entries per segment ([rho][128]) and uint8 codes, or
    /// null when the ISA has no byte permute (needs AVX-512 VBMI).
    void (*fc_permute_i8)(const int8_t* table, const uint8_t* codes, int64_t rho, int64_t blocks, int32_t* out);
    /// int8 E-FC table from quantised operands (VNNI), or null: for each segment v and
    /// c < rows[v] (a multiple of 16), table[dst[v] + c] = saturate(round(factor[v] * (sum_{k < r4}
    /// codebook[first[v]*r4 + (k/4)*4*rows[v] + 4*c + k%4] * x[v*r4 + k] - (correction ? correction[first[v] + c]
    /// : 0)))) into [-127, 127]. Segments are written in order, each rows[v] bytes.
    void (*fc_table_u8s8)(const int8_t* codebook, const int32_t* first, const int32_t* rows, int64_t rho, int64_t r4,
                          const uint8_t* x, const int32_t* correction, const float* factor, const int32_t* dst,
                          int8_t* table);
    /// dst[i] = clamp(round(src[i] * inv_scale), low, high) + zero; non-null with fc_table_u8s8.
    void (*quantise_u8)(const float* src, int64_t n, float inv_scale, float low, float high, float zero, uint8_t* dst);
    /// E-Conv table build with the narrowing fused into the store, or null to build it with
    /// sgemm into fp32 scratch and narrow that (the AVX2 and scalar tables).
    ConvTableFn<float> conv_table_f32;
    ConvTableFn<uint16_t> conv_table_f16;
    ConvTableFn<int16_t> conv_table_i16;
    ConvTableFn<uint8_t> conv_table_i8;  ///< stores offset-binary bytes
    /// int8 E-Conv table built from uint8 activations and int8 codewords, or null (no VNNI).
    ConvTableU8S8Fn conv_table_u8s8;
    /// Its operand layout: dst[4*i + j] = clamp(round(src[j*stride + i] * inv_scale), low, high) + zero
    /// for i < n, j < channels (<= 4); 0 for j >= channels; nothing past dst[4*n). Non-null with
    /// conv_table_u8s8.
    void (*quantise_quad)(const float* src, int64_t channels, int64_t stride, int64_t n, float inv_scale, float low,
                          float high, float zero, uint8_t* dst);
    /// Smallest and largest of src[0..n); non-null with conv_table_u8s8.
    void (*min_max)(const float* src, int64_t n, float* low, float* high);
};

const KernelTable& scalar_kernels();
#if defined(__x86_64__)
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();
/// accumulate_f16_partial's kernel; call only on CPUs with AVX512-FP16.
AccumulateFn<uint16_t> accumulate_f16_partial();
#endif

/// The kernel table for the requested ISA (kAuto: the best this CPU supports); throws
/// std::invalid_argument when the CPU lacks it.
const KernelTable& select_kernels(LutIsa isa);

/// Half-precision bits <-> float, portable (round to nearest even).
uint16_t float_to_half(float value);
float half_to_float(uint16_t bits);

}  // namespace detail
}  // namespace neuralmerge
