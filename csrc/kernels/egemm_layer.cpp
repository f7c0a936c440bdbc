// EGemmLayer: the fast E-FC (DESIGN §5). At batch 1 an FC layer is memory-bound, so the layer
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
    std::vector<uint8_t> codes8;         // [blocks][rho][64]
    std::vector<uint16_t> codes16;
    std::vector<float> bias;
    bool permute = false;
    std::string name;
};

EGemmLayer::EGemmLayer(const EncodedWeight& weight, const LutOptions& opt) : impl_(std::make_unique<Impl>()) {
    Impl& m = *impl_;
    if (weight.kernel_h != 1 || weight.kernel_w != 1) fail("an fc layer has a 1x1 kernel");
    if (opt.threads < 1) fail("threads must be at least 1, got " + std::to_string(opt.threads));
    std::vector<float> widened;
    EncodedWeight w = weight;
    if (!w.codebook && w.codebook_fp16 && w.codebook_rows > 0 && w.segment_length > 0) {
        widened.resize(static_cast<size_t>(w.codebook_rows * w.segment_length));
        for (size_t i = 0; i < widened.size(); ++i) widened[i] = detail::half_to_float(w.codebook_fp16[i]);
        w.codebook = widened.data();
    }
    std::vector<int64_t> rows;
    const std::vector<int64_t> codes = detail::validated_codes(w, rows);

    m.kernels = &detail::select_kernels(opt.isa);
    m.precision = opt.precision;
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
            m.codebook_i8.resize(m.total_rows * m.r);
            m.codebook_step.assign(m.rho, 1.0f);
            break;
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
                    case LutPrecision::kInt8:
                        m.codebook_i8[at] = static_cast<int8_t>(std::nearbyint(value / m.codebook_step[v]));
                        break;
                }
            }
        }
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

void EGemmLayer::run(const float* x, int64_t rows, float* y) const {
    const Impl& m = *impl_;
    const detail::KernelTable& k = *m.kernels;
    if (!x || !y) fail("input and output must not be null");
    if (rows < 1) fail("batch rows must be at least 1, got " + std::to_string(rows));
    const int64_t padded_out = m.blocks * kFcBlock;
    const uint8_t* codes8 = m.codes8.empty() ? nullptr : m.codes8.data();
    const uint16_t* codes16 = m.codes16.empty() ? nullptr : m.codes16.data();
    // Scratch reused across calls: fresh vectors were zero-filled (and, past malloc's mmap
    // threshold, page-faulted) on every call.
    thread_local std::vector<float> table, sums, x_scaled;
    thread_local std::vector<int8_t> table_i8;
    thread_local std::vector<int32_t> sums_i32;
    table.resize(std::max(table.size(), static_cast<size_t>(m.total_rows)));
    sums.resize(std::max(sums.size(), static_cast<size_t>(padded_out)));
    if (m.precision == LutPrecision::kInt8) {
        // 4 spare bytes: the gather kernels read a 32-bit word at every table index.
        const auto table_bytes = static_cast<size_t>((m.permute ? m.rho * kPermuteRows : m.total_rows) + 4);
        // Entries past a segment's rows are never selected (codes < rows); resize zero-fills
        // them, so every byte the kernels read is defined.
        table_i8.resize(std::max(table_i8.size(), table_bytes));
        sums_i32.resize(std::max(sums_i32.size(), static_cast<size_t>(padded_out)));
        x_scaled.resize(std::max(x_scaled.size(), static_cast<size_t>(m.in_features)));
    }
    for (int64_t row = 0; row < rows; ++row) {
        const float* x_row = x + row * m.in_features;
        switch (m.precision) {
            case LutPrecision::kFp32:
                k.fc_table_f32(m.codebook_f32.data(), m.base.data(), m.rows.data(), m.rho, m.r, m.in_features, x_row,
                               table.data());
                break;
            case LutPrecision::kFp16:
            case LutPrecision::kInt16:
                k.fc_table_f16(m.codebook_f16.data(), m.base.data(), m.rows.data(), m.rho, m.r, m.in_features, x_row,
                               table.data());
                break;
            case LutPrecision::kInt8:
                // The segment's step folds into the input: sum_k x_k * (step * entry).
                for (int64_t v = 0, i = 0; v < m.rho; ++v) {
                    for (; i < std::min(m.in_features, (v + 1) * m.r); ++i) x_scaled[i] = x_row[i] * m.codebook_step[v];
                }
                k.fc_table_i8(m.codebook_i8.data(), m.base.data(), m.rows.data(), m.rho, m.r, m.in_features,
                              x_scaled.data(), table.data());
                break;
        }
        float scale = 1.0f;
        if (m.precision == LutPrecision::kInt8) {
            // One scale for the whole table: its largest entry maps to 127.
            const float largest = k.max_abs(table.data(), m.total_rows);
            scale = largest > 0.0f && std::isfinite(largest) ? largest / 127.0f : 1.0f;
            for (int64_t v = 0; v < m.rho; ++v) {
                int8_t* dst = table_i8.data() + (m.permute ? m.permute_base[v] : m.base[v]);
                k.quantize_i8(table.data() + m.base[v], m.rows[v], 1.0f / scale, dst);
            }
            if (m.permute) {
                k.fc_permute_i8(table_i8.data(), codes8, m.rho, m.blocks, sums_i32.data());
            } else {
                k.fc_gather_i8(table_i8.data(), m.base.data(), codes8, codes16, m.rho, m.blocks, sums_i32.data());
            }
            for (int64_t t = 0; t < m.out_features; ++t) {
                y[row * m.out_features + t] = m.bias[t] + scale * static_cast<float>(sums_i32[t]);
            }
            continue;
        }
        k.fc_gather_f32(table.data(), m.base.data(), codes8, codes16, m.rho, m.blocks, sums.data());
        for (int64_t t = 0; t < m.out_features; ++t) y[row * m.out_features + t] = m.bias[t] + sums[t];
    }
}

}  // namespace neuralmerge
