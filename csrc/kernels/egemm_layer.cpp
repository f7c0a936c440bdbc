// EGemmLayer: the fast E-FC (docs/runtime.md). At batch 1 an FC layer is memory-bound, so the layer
// keeps only uint8/uint16 codes (in [block of 64 outputs][segment][64] order, streamed once) and
// a transposed codebook ([segment][k][c]); per input row it builds the table T[v][c] and sums
// T[v][code] over segments. fp16/int16 store the codebook as fp16 (half the bytes), int8 as int8
// with one step per segment (a quarter: the table build streams the whole codebook from L3 on
// every call, and that stream was the layer's cost); int8 also narrows the table to int8 so
// that, with AVX-512 VBMI and at most 128 codewords per segment, a segment's table sits in two
// registers and codes are looked up with vpermi2b.
#include <algorithm>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "lut_internal.h"

namespace neuralmerge {
namespace {

using detail::kFcBlock;

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

constexpr int64_t kPermuteRows = 128;  // a vpermi2b table: two 64-byte registers

// Per-thread scratch reused across calls and layers: fresh vectors were zero-filled (and, past
// malloc's mmap threshold, page-faulted) on every call.
struct FcScratch {
    std::vector<float> table, sums, x_scaled;
    std::vector<int8_t> table_i8;
    std::vector<int32_t> sums_i32;
    std::vector<uint8_t> x_u8;
    std::vector<float> factor;
};

template <typename T>
T* at_least(std::vector<T>& v, int64_t n) {
    if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
    return v.data();
}

void apply_relu(float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = detail::relu_of(y[i]);
}

}  // namespace

struct EGemmLayer::Impl {
    const detail::KernelTable* kernels = nullptr;
    LutPrecision precision = LutPrecision::kFp32;
    int64_t in_features = 0, out_features = 0, r = 0, rho = 0, blocks = 0, total_rows = 0;
    std::vector<int32_t> rows, base;     // per segment: table rows and first row
    std::vector<int32_t> permute_base;   // per segment: v * 128 (the int8 permute table layout)
    std::vector<float> codebook_f32;     // transposed segments, fp32 precision
    std::vector<uint16_t> codebook_f16;  // transposed segments, fp16 and int16
    std::vector<int8_t> codebook_i8;     // transposed segments, int8: value = codebook_step[v] * entry
    std::vector<float> codebook_step;
    // int8 with a VNNI kernel: the table is built from uint8 inputs and int8 codewords.
    bool vnni = false;
    int64_t r4 = 0;                      // r rounded up to a multiple of 4
    std::vector<int32_t> vnni_rows, vnni_first;  // per segment: rows rounded up to 16, first row
    std::vector<int8_t> codebook_vnni;   // per segment [r4/4][vnni_rows][4], zero-padded
    std::vector<int32_t> codeword_sum;   // per padded row: 128 x sum of the int8 codeword
    float input_scale = 0.0f;            // calibrated int8 activation step, 0 = this row's range
    std::vector<float> codeword_norm;    // per segment: largest L2 norm of its (int8-rounded) codewords
    std::vector<int32_t> int8_first;     // per segment: first entry in the int8 table
    std::vector<uint8_t> codes8;         // [blocks][rho][64]
    std::vector<uint16_t> codes16;
    std::vector<float> bias;
    bool permute = false;
    bool relu = false;  // a Relu folded into the layer
    std::string name;

    float int8_table(const float* x, FcScratch& s) const;
};

EGemmLayer::EGemmLayer(const EncodedWeight& weight, const LutOptions& opt) : impl_(std::make_unique<Impl>()) {
    Impl& m = *impl_;
    if (weight.kernel_h != 1 || weight.kernel_w != 1) fail("an fc layer has a 1x1 kernel");
    if (opt.threads < 1) fail("threads must be at least 1, got " + std::to_string(opt.threads));
    detail::require_valid_input_scale(opt.input_scale);
    std::vector<float> widened;
    EncodedWeight w = weight;
    if (!w.codebook && w.codebook_fp16 && w.codebook_rows > 0 && w.segment_length > 0) {
        widened.resize(static_cast<size_t>(w.codebook_rows * w.segment_length));
        for (size_t i = 0; i < widened.size(); ++i) widened[i] = detail::half_to_float(w.codebook_fp16[i]);
        w.codebook = widened.data();
    }
    std::vector<int64_t> rows;
    const detail::CodeView codes = detail::validated_codes(w, rows);

    m.kernels = &detail::select_kernels(opt.isa);
    m.precision = opt.precision;
    m.relu = opt.relu;
    m.in_features = w.depth;
    m.out_features = w.out_channels;
    m.r = w.segment_length;
    m.rho = w.segments;
    m.blocks = (w.out_channels + kFcBlock - 1) / kFcBlock;
    for (int64_t v = 0; v < m.rho; ++v) {
        m.rows.push_back(static_cast<int32_t>(rows[v]));
        m.base.push_back(static_cast<int32_t>(m.total_rows));
        m.permute_base.push_back(static_cast<int32_t>(v * kPermuteRows));
        m.total_rows += rows[v];
    }
    switch (m.precision) {
        case LutPrecision::kFp32: m.codebook_f32.resize(m.total_rows * m.r); break;
        case LutPrecision::kFp16:
        case LutPrecision::kInt16: m.codebook_f16.resize(m.total_rows * m.r); break;
        case LutPrecision::kInt8:
            m.vnni = m.kernels->fc_table_u8s8 != nullptr;
            if (!m.vnni) m.codebook_i8.resize(m.total_rows * m.r);
            m.codebook_step.assign(m.rho, 1.0f);
            break;
    }
    std::vector<float> norm2;  // int8 VNNI: squared norm of each (padded) codeword row, in steps
    if (m.vnni) {
        m.input_scale = opt.input_scale;
        m.r4 = (m.r + 3) / 4 * 4;
        int64_t padded = 0;
        for (int64_t v = 0; v < m.rho; ++v) {
            m.vnni_first.push_back(static_cast<int32_t>(padded));
            m.vnni_rows.push_back(static_cast<int32_t>((rows[v] + 15) / 16 * 16));
            padded += m.vnni_rows.back();
        }
        m.codebook_vnni.assign(static_cast<size_t>(padded * m.r4), 0);
        m.codeword_sum.assign(static_cast<size_t>(padded), 0);
        norm2.assign(static_cast<size_t>(padded), 0.0f);
    }
    for (int64_t v = 0; v < m.rho; ++v) {
        const float* segment = w.codebook + w.offsets[v] * m.r;
        if (m.precision == LutPrecision::kInt8) {
            float largest = 0.0f;
            for (int64_t i = 0; i < rows[v] * m.r; ++i) largest = std::max(largest, std::fabs(segment[i]));
            m.codebook_step[v] = largest > 0.0f ? largest / 127.0f : 1.0f;
        }
        for (int64_t c = 0; c < rows[v]; ++c) {
            for (int64_t k = 0; k < m.r; ++k) {
                const float value = segment[c * m.r + k];
                const int64_t at = m.base[v] * m.r + k * rows[v] + c;
                switch (m.precision) {
                    case LutPrecision::kFp32: m.codebook_f32[at] = value; break;
                    case LutPrecision::kFp16:
                    case LutPrecision::kInt16: m.codebook_f16[at] = detail::float_to_half(value); break;
                    case LutPrecision::kInt8: {
                        const auto q = static_cast<int8_t>(std::nearbyint(value / m.codebook_step[v]));
                        if (!m.vnni) {
                            m.codebook_i8[at] = q;
                            break;
                        }
                        if (k >= m.in_features - v * m.r) break;  // past the last segment's channels: stays 0
                        const int64_t row = m.vnni_first[v] + c;
                        m.codebook_vnni[m.vnni_first[v] * m.r4 + (k / 4) * 4 * m.vnni_rows[v] + 4 * c + k % 4] = q;
                        m.codeword_sum[row] += 128 * q;
                        norm2[row] += static_cast<float>(q) * static_cast<float>(q);
                        break;
                    }
                }
            }
        }
    }

    for (int64_t v = 0; m.vnni && v < m.rho; ++v) {
        const auto first = norm2.begin() + m.vnni_first[v];
        const float largest = *std::max_element(first, first + rows[v]);
        m.codeword_norm.push_back(m.codebook_step[v] * std::sqrt(largest));
    }
    const bool bytes = w.code_type == CodeType::kUInt8;
    const int64_t count = m.blocks * m.rho * kFcBlock;
    if (bytes) {
        m.codes8.assign(count, 0);
    } else {
        m.codes16.assign(count, 0);
    }
    for (int64_t t = 0; t < w.out_channels; ++t) {
        for (int64_t v = 0; v < m.rho; ++v) {
            const int64_t at = ((t / kFcBlock) * m.rho + v) * kFcBlock + t % kFcBlock;
            const int64_t code = codes[t * m.rho + v];
            if (bytes) {
                m.codes8[at] = static_cast<uint8_t>(code);
            } else {
                m.codes16[at] = static_cast<uint16_t>(code);
            }
        }
    }
    m.bias.assign(w.bias, w.bias + w.out_channels);

    const int32_t widest = *std::max_element(m.rows.begin(), m.rows.end());
    m.permute = m.precision == LutPrecision::kInt8 && m.kernels->fc_permute_i8 && bytes && widest <= kPermuteRows;
    for (int64_t v = 0; v < m.rho; ++v) m.int8_first.push_back(m.permute ? m.permute_base[v] : m.base[v]);
    const char* variant = m.precision == LutPrecision::kFp32  ? "fp32"
                          : m.precision == LutPrecision::kInt8 ? (m.permute ? "int8" : "int8-gather")
                                                               : "fp16-codebook";
    m.name = std::string(variant) + "-" + m.kernels->isa;
}

EGemmLayer::~EGemmLayer() = default;
EGemmLayer::EGemmLayer(EGemmLayer&&) noexcept = default;
EGemmLayer& EGemmLayer::operator=(EGemmLayer&&) noexcept = default;

int64_t EGemmLayer::in_features() const { return impl_->in_features; }
int64_t EGemmLayer::out_features() const { return impl_->out_features; }
const char* EGemmLayer::kernel_name() const { return impl_->name.c_str(); }

// The int8 table of one input row into s.table_i8; returns the table's scale (an entry e
// stands for scale * e).
float EGemmLayer::Impl::int8_table(const float* x, FcScratch& s) const {
    const detail::KernelTable& k = *kernels;
    // 16 spare bytes: the gather kernels read a 32-bit word at every table index, and the VNNI
    // build writes each segment's rows rounded up to 16. Entries past a segment's rows are never
    // selected (codes < rows); resize zero-fills them, so every byte the kernels read is defined.
    int8_t* table_i8 = at_least(s.table_i8, (permute ? rho * kPermuteRows : total_rows) + 16);
    if (!vnni) {
        // The segment's step folds into the input: sum_k x_k * (step * entry).
        float* x_scaled = at_least(s.x_scaled, in_features);
        for (int64_t v = 0, i = 0; v < rho; ++v) {
            for (; i < std::min(in_features, (v + 1) * r); ++i) x_scaled[i] = x[i] * codebook_step[v];
        }
        float* table = at_least(s.table, total_rows);
        k.fc_table_i8(codebook_i8.data(), base.data(), rows.data(), rho, r, in_features, x_scaled, table);
        // One scale for the whole table: its largest entry maps to 127.
        const float largest = k.max_abs(table, total_rows);
        const float scale = largest > 0.0f && std::isfinite(largest) ? largest / 127.0f : 1.0f;
        for (int64_t v = 0; v < rho; ++v) k.quantize_i8(table + base[v], rows[v], 1.0f / scale, table_i8 + int8_first[v]);
        return scale;
    }
    // The input as uint8 (zero point 0 when x >= 0, as after a ReLU; else 128, corrected by the
    // codeword sums), the same scheme as the int8 E-Conv build.
    float low = 0.0f, high = 0.0f;
    k.min_max(x, in_features, &low, &high);
    const detail::ActivationQuantisation a = detail::activation_quantisation(low, high, input_scale);
    const float x_step = a.step;
    uint8_t* x_u8 = at_least(s.x_u8, rho * r4);
    if (r4 == r) {
        k.quantise_u8(x, in_features, 1.0f / x_step, a.low, a.high, a.zero, x_u8);
        std::fill(x_u8 + in_features, x_u8 + rho * r4, uint8_t{0});  // the codebook is 0 there
    } else {
        for (int64_t v = 0; v < rho; ++v) {
            const int64_t used = std::min(r, in_features - v * r);
            k.quantise_u8(x + v * r, used, 1.0f / x_step, a.low, a.high, a.zero, x_u8 + v * r4);
            std::fill(x_u8 + v * r4 + used, x_u8 + (v + 1) * r4, uint8_t{0});
        }
    }
    // One scale for the whole table, from a bound known before the build (so the build narrows
    // as it goes): |entry (v, c)| <= |x_v| * |codeword c| (Cauchy-Schwarz), |x_v| grown by the
    // input's rounding. On the demo pair's FC inputs the largest entry is ~0.9 of this bound.
    float most = 0.0f;
    for (int64_t v = 0; v < rho; ++v) {
        const int64_t used = std::min(r, in_features - v * r);
        float norm2 = 0.0f;
        for (int64_t i = v * r; i < v * r + used; ++i) norm2 += x[i] * x[i];
        const float norm = std::sqrt(norm2) + 0.5f * x_step * std::sqrt(static_cast<float>(used));
        most = std::max(most, norm * codeword_norm[v]);
    }
    const float scale = most > 0.0f && std::isfinite(most) ? most / 127.0f : 1.0f;
    float* factor = at_least(s.factor, rho);
    for (int64_t v = 0; v < rho; ++v) factor[v] = x_step * codebook_step[v] / scale;  // int32 sum -> int8 entry
    k.fc_table_u8s8(codebook_vnni.data(), vnni_first.data(), vnni_rows.data(), rho, r4, x_u8,
                    a.offset ? codeword_sum.data() : nullptr, factor, int8_first.data(), table_i8);
    return scale;
}

void EGemmLayer::run(const float* x, int64_t rows, float* y) const {
    const Impl& m = *impl_;
    const detail::KernelTable& k = *m.kernels;
    if (!x || !y) fail("input and output must not be null");
    if (rows < 1) fail("batch rows must be at least 1, got " + std::to_string(rows));
    const int64_t padded_out = m.blocks * kFcBlock;
    const uint8_t* codes8 = m.codes8.empty() ? nullptr : m.codes8.data();
    const uint16_t* codes16 = m.codes16.empty() ? nullptr : m.codes16.data();
    thread_local FcScratch s;
    for (int64_t row = 0; row < rows; ++row) {
        const float* x_row = x + row * m.in_features;
        float* out = y + row * m.out_features;
        if (m.precision == LutPrecision::kInt8) {
            const float scale = m.int8_table(x_row, s);
            int32_t* sums = at_least(s.sums_i32, padded_out);
            if (m.permute) {
                k.fc_permute_i8(s.table_i8.data(), codes8, m.rho, m.blocks, sums);
            } else {
                k.fc_gather_i8(s.table_i8.data(), m.base.data(), codes8, codes16, m.rho, m.blocks, sums);
            }
            for (int64_t t = 0; t < m.out_features; ++t) out[t] = m.bias[t] + scale * static_cast<float>(sums[t]);
        } else {
            float* table = at_least(s.table, m.total_rows);
            if (m.precision == LutPrecision::kFp32) {
                k.fc_table_f32(m.codebook_f32.data(), m.base.data(), m.rows.data(), m.rho, m.r, m.in_features, x_row,
                               table);
            } else {
                k.fc_table_f16(m.codebook_f16.data(), m.base.data(), m.rows.data(), m.rho, m.r, m.in_features, x_row,
                               table);
            }
            float* sums = at_least(s.sums, padded_out);
            k.fc_gather_f32(table, m.base.data(), codes8, codes16, m.rho, m.blocks, sums);
            for (int64_t t = 0; t < m.out_features; ++t) out[t] = m.bias[t] + sums[t];
        }
        if (m.relu) apply_relu(out, m.out_features);
    }
}

}  // namespace neuralmerge
