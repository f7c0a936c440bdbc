// EConvLayer: the fast E-Conv (docs/runtime.md, "Kernels and where the time goes").
//
// Strided convolution is turned into stride 1 by splitting the zero-padded input into
// stride_h x stride_w phase planes (phase (a, b) holds padded pixels (i*sh + a, j*sw + b)).
// Tap (i0, j0) then reads phase ((i0*dh) % sh, (j0*dw) % sw) at the constant shift
// ((i0*dh) / sh, (j0*dw) / sw), so with outputs computed in phase-width coordinates every term of
// an output channel's sum is one contiguous run of the table T[phase][v][c][pixel] at a
// constant offset. Columns past the real output width are computed and dropped.
//
// The output is produced in strips of output rows whose table fits in L2 (or, when a strip's
// table must be larger, a chunk of its segments at a time); each strip builds its table (per
// phase and segment a GEMM with inner dimension r: the ISA's fused kernel, which narrows as it
// stores, or sgemm plus a narrowing pass), and sums the runs with the ISA kernels of
// lut_internal.h. int8 layers on CPUs with AVX-512 VNNI build the table from uint8
// activations and int8 codewords (vpdpbusd); with unit strides those are quantised straight from
// the input, and the fp32 phase planes are not written at all.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "../blas.h"
#include "lut_internal.h"
#include "parallel.h"

namespace neuralmerge {
namespace {

using detail::KernelTable;
using detail::kPixelBlock;

// Table bytes built and summed at a time (a strip, or a chunk of its segments): half of a 2 MB
// L2 (under a fifth for fp32 tables), which leaves room for the input planes, offsets and output
// rows the same pass touches. On the Xeon this was tuned on, a VGG 28x28x256 table of 5 MB per
// strip built and summed in one piece ran 1.4x (fp32) slower than in chunks that stay in L2, and
// 1 MB chunks ran 1-6% faster than 2 MB ones on the VGG layers. Once the tables started on cache
// lines, 512 KB made fp32 faster again (three lut_layers runs each: LeNet conv2 1.27x -> 1.40x
// ONNX Runtime, VGG 56x56x128 1.18x -> 1.21x, VGG 28x28x256 1.77x either way) but fp16, int16
// and int8 on the VGG layers 2-5% slower, so they keep 1 MB. With the 128-pixel sum blocks,
// 384 KB made LeNet conv2 fp32 (832 KB of table: chunks of 1 segment, not 2) 3% faster
// (in-process A/B, 7/7 rounds) and left the VGG layers, one segment per chunk either way, alone;
// 256 KB was no better, and 768 KB / 1.5 MB for the narrower tables changed nothing or lost.
int64_t table_budget_bytes(LutPrecision precision) {
    return precision == LutPrecision::kFp32 ? int64_t{384} << 10 : int64_t{1} << 20;
}

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// A plan's sizes are products of extents a model file sets (pads and dilations reach 2^30):
// an overflow, or a size no device holds, is an error and never a wrapped size. Below the
// bound, the few sums and products of these sizes a plan forms cannot overflow either.
constexpr int64_t kMaxPlanSize = int64_t{1} << 48;
int64_t size_product(std::initializer_list<int64_t> factors) {
    int64_t product = 1;
    for (int64_t f : factors) {
        if (__builtin_mul_overflow(product, f, &product) || product > kMaxPlanSize) fail("layer too large for its input");
    }
    return product;
}
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t element_bytes(LutPrecision precision) {
    switch (precision) {
        case LutPrecision::kFp32: return 4;
        case LutPrecision::kFp16:
        case LutPrecision::kInt16: return 2;
        case LutPrecision::kInt8: return 1;
    }
    return 4;
}

const char* precision_name(LutPrecision precision) {
    switch (precision) {
        case LutPrecision::kFp32: return "fp32";
        case LutPrecision::kFp16: return "fp16";
        case LutPrecision::kInt16: return "int16";
        case LutPrecision::kInt8: return "int8";
    }
    return "?";
}

// int8 table entries -> the offset-binary bytes the sums read (lut_internal.h, kInt8Bias).
void to_offset_binary(uint8_t* bytes, int64_t n) {
    for (int64_t i = 0; i < n; ++i) bytes[i] = static_cast<uint8_t>(bytes[i] ^ 0x80u);
}

// Float copy of the codebook: `codebook` itself, or `codebook_fp16` widened.
std::vector<float> widened_codebook(const EncodedWeight& w) {
    if (w.codebook || !w.codebook_fp16) return {};
    if (w.codebook_rows < 1 || w.segment_length < 1) return {};
    std::vector<float> out(static_cast<size_t>(w.codebook_rows * w.segment_length));
    for (size_t i = 0; i < out.size(); ++i) out[i] = detail::half_to_float(w.codebook_fp16[i]);
    return out;
}

// Whether the ISA builds tables of this precision with a fused kernel (no fp32 scratch).
bool has_fused_build(const KernelTable& k, LutPrecision precision) {
    switch (precision) {
        case LutPrecision::kFp32: return k.conv_table_f32 != nullptr;
        case LutPrecision::kFp16: return k.conv_table_f16 != nullptr;
        case LutPrecision::kInt16: return k.conv_table_i16 != nullptr;
        case LutPrecision::kInt8: return k.conv_table_i8 != nullptr;
    }
    return false;
}

// Builds rows x ld table entries at element `first` of `table` with the ISA's fused kernel
// (codewords r floats apart, `used` of them real); false when the ISA has none (the caller then
// uses sgemm and narrows).
bool build_table(const KernelTable& k, LutPrecision precision, const float* codebook, int64_t rows, int64_t r,
                 int64_t used, const float* x, int64_t x_stride, int64_t ld, int64_t pixels, float inv_scale,
                 float* table, int64_t first) {
    switch (precision) {
        case LutPrecision::kFp32:
            if (!k.conv_table_f32) return false;
            k.conv_table_f32(codebook, rows, r, used, x, x_stride, ld, pixels, inv_scale, table + first);
            return true;
        case LutPrecision::kFp16:
            if (!k.conv_table_f16) return false;
            k.conv_table_f16(codebook, rows, r, used, x, x_stride, ld, pixels, inv_scale,
                             reinterpret_cast<uint16_t*>(table) + first);
            return true;
        case LutPrecision::kInt16:
            if (!k.conv_table_i16) return false;
            k.conv_table_i16(codebook, rows, r, used, x, x_stride, ld, pixels, inv_scale,
                             reinterpret_cast<int16_t*>(table) + first);
            return true;
        case LutPrecision::kInt8:
            if (!k.conv_table_i8) return false;
            k.conv_table_i8(codebook, rows, r, used, x, x_stride, ld, pixels, inv_scale,
                            reinterpret_cast<uint8_t*>(table) + first);
            return true;
    }
    return false;
}

}  // namespace

// Shape-dependent quantities of one run() call.
struct ConvPlan {
    Shape4 in, out;
    int64_t padded_h = 0, padded_w = 0;
    int64_t phase_w = 0;        // Wq: phase-plane width = ceil(padded_w / stride_w)
    int64_t phase_h = 0;        // rows of real data per phase plane
    int64_t plane_stride = 0;   // floats between phase planes
    int64_t strip_rows = 0;     // output rows per strip
    int64_t strips = 0;
    int64_t strip_pixels = 0;   // strip_rows * phase_w rounded up to kPixelBlock
    int64_t ld = 0;             // table row length
    int64_t chunk_segments = 0; // segments whose table is built (and summed) at a time
    std::vector<int64_t> chunk_rows;  // per chunk: table rows of its segments (of one phase slot)
    // int8 VNNI layers with unit strides quantise the uint8 operands straight from the input
    // (there is one phase): the fp32 phase planes are then never written.
    bool direct_quantise = false;
    int64_t input_floats = 0;   // phase planes of the whole input (0 with direct_quantise)
    int64_t quantised_floats = 0;  // int8 VNNI build: the phase planes as interleaved uint8
    int64_t table_floats = 0;   // per worker
    int64_t scratch_floats = 0; // per worker: fp32 sgemm output before narrowing
    int64_t out_floats = 0;     // per worker: the strip's rows of every output channel of a group
    int64_t worker_floats = 0;
    int workers = 1;
};

// The input's channels as planes of pixels: channel ch's plane for phase slot s starts at
// data + ch * channel_stride + s * slot_stride and holds `pixels` values (padding included or not:
// the bounds read from it do not change with zeros).
struct InputPlanes {
    const float* data = nullptr;
    int64_t image_channels = 0, channel_stride = 0, slot_stride = 0, slots = 1, pixels = 0;
    const float* at(int64_t channel, int64_t slot) const { return data + channel * channel_stride + slot * slot_stride; }
};

// One image group's activations as uint8 for the VNNI table build: value = scale * (q - zero),
// with zero 0 for inputs >= 0 (after ReLU) and 128 otherwise.
struct QuantisedInput {
    const uint8_t* data = nullptr;  // [rho][r4/4][slot][plane_stride][4]
    float scale = 1.0f;
    bool offset = false;  // zero point 128
};

struct EConvLayer::Impl {
    const KernelTable* kernels = nullptr;
    LutOptions options;
    ConvGeometry geometry;
    int64_t out_channels = 0, kernel_h = 0, kernel_w = 0, depth = 0, r = 0, rho = 0;
    int64_t terms = 0;                   // per output channel: kernel_h * kernel_w * rho
    std::vector<int64_t> rows, base;     // table rows of each segment and their first row
    int64_t total_rows = 0;
    std::vector<float> codebook;         // [total_rows, r]: only the rows the codes use
    std::vector<float> bias;
    std::vector<float> codeword_norm;    // per segment: largest L2 norm of its codewords
    // Per term, [p][kernel_h][kernel_w][rho] like the codes: the term's phase slot,
    // base[v] + code, and tap shift.
    std::vector<int32_t> term_slot, term_row, term_shift_h, term_shift_w;
    std::vector<int64_t> phase_slots;    // used phases as a*stride_w + b, in slot order
    int64_t shift_h_max = 0, shift_w_max = 0;
    std::string name;
    // int8 with a VNNI kernel: the table is built from uint8 activations and int8 codewords.
    bool vnni = false;
    int64_t r4 = 0;                        // r rounded up to a multiple of 4
    std::vector<int8_t> codebook_i8;       // [total_rows, r4], zero past a segment's channels
    std::vector<float> codebook_i8_scale;  // per segment
    std::vector<int32_t> codeword_sum;     // [total_rows]: 128 x sum of the int8 codeword
    std::vector<int32_t> no_correction;    // zeros, one per row of the largest segment

    mutable std::mutex offsets_mutex;  // guards the two below
    mutable std::array<int64_t, 3> cached_key{};
    mutable std::shared_ptr<const std::vector<int32_t>> cached_offsets;

    ConvPlan plan(const Shape4& in, int threads) const;
    std::shared_ptr<const std::vector<int32_t>> term_offsets(const ConvPlan& plan) const;
    void fill_phases(const float* x, const ConvPlan& plan, float* phases) const;
    InputPlanes input_planes(const ConvPlan& plan, const float* x, const float* phases) const;
    float entry_bound(const InputPlanes& planes, int64_t n, int64_t grp) const;
    void quantise_codebook();
    QuantisedInput quantise_input(const ConvPlan& plan, const InputPlanes& planes, int64_t n, int64_t grp,
                                  uint8_t* out) const;
    void run_strip(const ConvPlan& plan, const float* phases, const QuantisedInput* quantised,
                   const std::vector<int32_t>& offsets, int64_t n, int64_t grp, int64_t strip, float scale,
                   bool fp16_partial, float* worker, float* y) const;
};

EConvLayer::EConvLayer(const EncodedWeight& weight, const ConvGeometry& g, const LutOptions& opt)
    : impl_(std::make_unique<Impl>()) {
    Impl& m = *impl_;
    if (opt.threads < 1) fail("threads must be at least 1, got " + std::to_string(opt.threads));
    detail::require_valid_input_scale(opt.input_scale);
    const std::vector<float> widened = widened_codebook(weight);
    EncodedWeight w = weight;
    if (!widened.empty()) w.codebook = widened.data();
    std::vector<int64_t> rows;
    const detail::CodeView codes = detail::validated_codes(w, rows);
    // Checks the geometry on the smallest input it admits.
    const int64_t reach_h = g.dilation_h * (w.kernel_h - 1) + 1, reach_w = g.dilation_w * (w.kernel_w - 1) + 1;
    econv_output_shape(Shape4{1, w.depth * std::max<int64_t>(g.group, 1), reach_h, reach_w}, w, g);

    m.kernels = &detail::select_kernels(opt.isa);
    detail::use_single_threaded_blas();  // the table build's sgemm runs inside our workers
    m.options = opt;
    m.geometry = g;
    m.out_channels = w.out_channels;
    m.kernel_h = w.kernel_h;
    m.kernel_w = w.kernel_w;
    m.depth = w.depth;
    m.r = w.segment_length;
    m.rho = w.segments;
    m.terms = w.kernel_h * w.kernel_w * w.segments;
    m.rows = rows;
    m.base.resize(rows.size());
    for (size_t v = 0; v < rows.size(); ++v) {
        m.base[v] = m.total_rows;
        m.total_rows += rows[v];
    }
    m.codebook.resize(static_cast<size_t>(m.total_rows * m.r));
    m.codeword_norm.assign(m.rho, 0.0f);
    for (int64_t v = 0; v < m.rho; ++v) {
        const float* src = w.codebook + w.offsets[v] * m.r;
        std::copy(src, src + rows[v] * m.r, m.codebook.begin() + m.base[v] * m.r);
        const int64_t channels = std::min(m.r, m.depth - v * m.r);
        for (int64_t c = 0; c < rows[v]; ++c) {
            double norm = 0.0;
            for (int64_t k = 0; k < channels; ++k) norm += double(src[c * m.r + k]) * src[c * m.r + k];
            m.codeword_norm[v] = std::max(m.codeword_norm[v], static_cast<float>(std::sqrt(norm)));
        }
    }
    m.bias.assign(w.bias, w.bias + w.out_channels);
    m.vnni = opt.precision == LutPrecision::kInt8 && m.kernels->conv_table_u8s8;
    if (m.vnni) m.quantise_codebook();

    // Taps -> phase slot and shift.
    const int64_t taps = w.kernel_h * w.kernel_w;
    std::vector<int64_t> tap_slot(taps), tap_shift_h, tap_shift_w;  // shifts in phase rows / columns
    for (int64_t i0 = 0; i0 < w.kernel_h; ++i0) {
        for (int64_t j0 = 0; j0 < w.kernel_w; ++j0) {
            const int64_t dy = i0 * g.dilation_h, dx = j0 * g.dilation_w;
            const int64_t phase = (dy % g.stride_h) * g.stride_w + dx % g.stride_w;
            auto found = std::find(m.phase_slots.begin(), m.phase_slots.end(), phase);
            if (found == m.phase_slots.end()) found = m.phase_slots.insert(m.phase_slots.end(), phase);
            tap_slot[i0 * w.kernel_w + j0] = found - m.phase_slots.begin();
            tap_shift_h.push_back(dy / g.stride_h);
            tap_shift_w.push_back(dx / g.stride_w);
        }
    }
    m.shift_h_max = *std::max_element(tap_shift_h.begin(), tap_shift_h.end());
    m.shift_w_max = *std::max_element(tap_shift_w.begin(), tap_shift_w.end());
    const int64_t slot_rows = static_cast<int64_t>(m.phase_slots.size()) * m.total_rows;
    if (slot_rows > std::numeric_limits<int32_t>::max()) fail("lookup table has too many rows");
    for (int64_t i = 0; i < w.out_channels * m.terms; ++i) {
        const int64_t v = i % m.rho, tap = (i / m.rho) % taps;
        m.term_slot.push_back(static_cast<int32_t>(tap_slot[tap]));
        m.term_row.push_back(static_cast<int32_t>(m.base[v] + codes[i]));
        m.term_shift_h.push_back(static_cast<int32_t>(tap_shift_h[tap]));
        m.term_shift_w.push_back(static_cast<int32_t>(tap_shift_w[tap]));
    }
    m.name = std::string(precision_name(opt.precision)) + "-" + m.kernels->isa;
}

EConvLayer::~EConvLayer() = default;
EConvLayer::EConvLayer(EConvLayer&&) noexcept = default;
EConvLayer& EConvLayer::operator=(EConvLayer&&) noexcept = default;

const char* EConvLayer::kernel_name() const { return impl_->name.c_str(); }

Shape4 EConvLayer::output_shape(const Shape4& in) const {
    const Impl& m = *impl_;
    EncodedWeight shape_only;
    shape_only.depth = m.depth;
    shape_only.out_channels = m.out_channels;
    shape_only.kernel_h = m.kernel_h;
    shape_only.kernel_w = m.kernel_w;
    return econv_output_shape(in, shape_only, m.geometry);
}

ConvPlan EConvLayer::Impl::plan(const Shape4& in, int requested_threads) const {
    ConvPlan p;
    p.in = in;
    EncodedWeight shape_only;
    shape_only.depth = depth;
    shape_only.out_channels = out_channels;
    shape_only.kernel_h = kernel_h;
    shape_only.kernel_w = kernel_w;
    p.out = econv_output_shape(in, shape_only, geometry);
    const ConvGeometry& g = geometry;
    p.padded_h = in.h + g.pad_top + g.pad_bottom;
    p.padded_w = in.w + g.pad_left + g.pad_right;
    p.phase_w = ceil_div(p.padded_w, g.stride_w);
    p.phase_h = ceil_div(p.padded_h, g.stride_h);
    size_product({p.padded_h, p.padded_w});  // bounds every extent below

    const int64_t slots = static_cast<int64_t>(phase_slots.size());
    const int64_t bytes = element_bytes(options.precision);
    const int64_t max_rows = *std::max_element(rows.begin(), rows.end());
    // Rows per strip: the table of (strip_rows + shift_h_max) phase rows should fit the budget.
    const int64_t row_bytes = size_product({slots, total_rows, p.phase_w, bytes});
    // At least 4 * shift_h_max rows, so that rebuilding the rows strips share costs <= 25%.
    const int64_t budget = table_budget_bytes(options.precision);
    int64_t strip_rows = std::max<int64_t>({1, 4 * shift_h_max, budget / std::max<int64_t>(row_bytes, 1) - shift_h_max});
    const int64_t units_per_strip_set = p.in.n * g.group;
    // Table terms summed over all output pixels: below this a layer takes ~10 us on one thread,
    // and a second one adds its start-up and the strips' shared rows for nothing.
    constexpr int64_t kMinParallelWork = int64_t{1} << 18;
    const int64_t work = size_product({p.in.n, out_channels, terms, p.out.h, p.phase_w});
    const int threads = work < kMinParallelWork ? 1 : requested_threads > 0 ? requested_threads : options.threads;
    if (threads > units_per_strip_set) {
        // Enough strips that every thread has work.
        const int64_t strips_wanted = ceil_div(threads, units_per_strip_set);
        strip_rows = std::min(strip_rows, ceil_div(p.out.h, strips_wanted));
    }
    p.strip_rows = std::min(strip_rows, p.out.h);
    p.strips = ceil_div(p.out.h, p.strip_rows);
    p.strip_pixels = round_up(p.strip_rows * p.phase_w, kPixelBlock);
    p.ld = round_up(p.strip_pixels + shift_h_max * p.phase_w + shift_w_max, 16);
    const int64_t last_strip_start = (p.strips - 1) * p.strip_rows * p.phase_w;
    p.plane_stride = round_up(std::max(p.phase_h * p.phase_w, last_strip_start + p.ld), 16);
    if (size_product({slots, total_rows, p.ld}) > std::numeric_limits<int32_t>::max()) fail("lookup table too large");
    const int64_t segment_table_bytes = std::max<int64_t>(slots * max_rows * p.ld * bytes, 1);
    // When that floor makes the strip's table outgrow the budget, it is built and summed a
    // chunk of segments at a time: a table spilling to L3 made both its (store-bound) build and
    // its sums slow. A chunk is also kept within 3x the strip's output rows, which every chunk's
    // sums read and write once more: in-process A/B (7 rounds) against the budget alone, LeNet
    // conv2 fp16 (a 416 KB table, 80 KB of output rows: now two chunks) 7% faster, VGG 28x28x256
    // int8 3%, the other VGG and LeNet layers within 1%. (Smaller chunks help while their table
    // is large beside the output rows; a VGG strip's 256 KB of output rows made one-segment
    // chunks 16% slower.) But a chunk keeps at least 16 terms per output channel where the budget
    // allows: each chunk costs its sums a load and a store of the output rows, about what a few
    // terms cost, and a 1x1 layer with small output rows would otherwise sum one term per chunk.
    const int64_t out_row_bytes = size_product({out_channels / g.group, p.strip_pixels, 4});
    const int64_t fit = budget / segment_table_bytes, lean = 3 * out_row_bytes / segment_table_bytes;
    const int64_t enough_terms = ceil_div(16, kernel_h * kernel_w);
    p.chunk_segments = std::clamp<int64_t>(std::min(fit, std::max(lean, enough_terms)), 1, rho);
    int64_t chunk_rows_max = 0;
    for (int64_t v0 = 0; v0 < rho; v0 += p.chunk_segments) {
        const int64_t v1 = std::min(rho, v0 + p.chunk_segments);
        p.chunk_rows.push_back((v1 < rho ? base[v1] : total_rows) - base[v0]);
        chunk_rows_max = std::max(chunk_rows_max, p.chunk_rows.back());
    }

    p.direct_quantise = vnni && g.stride_h == 1 && g.stride_w == 1;
    p.input_floats = p.direct_quantise ? 0 : size_product({in.n, in.c, slots, p.plane_stride});
    p.quantised_floats = vnni ? round_up(size_product({in.n, geometry.group, rho, r4, slots, p.plane_stride}) / 4, 16) : 0;
    p.table_floats = round_up(ceil_div(slots * chunk_rows_max * p.ld * bytes, 4), 16);
    const bool narrows_scratch = options.precision != LutPrecision::kFp32 && !vnni &&
                                 !has_fused_build(*kernels, options.precision);
    p.scratch_floats = narrows_scratch ? round_up(max_rows * p.ld, 16) : 0;
    p.out_floats = size_product({out_channels / g.group, p.strip_pixels});
    p.worker_floats = p.table_floats + p.scratch_floats + p.out_floats;
    p.workers = static_cast<int>(std::min<int64_t>(threads, p.in.n * g.group * p.strips));
    return p;
}

// Every region of the workspace starts on a cache line: run() aligns the pointer it is given
// (16 floats of slack), and each region is a multiple of 16 floats. Table runs at the tap shifts
// that are multiples of 16 floats then load whole lines (VGG 28x28x256 fp32 sums ~5% faster than
// with the table 16 bytes off, as a std::vector's storage is).
namespace {
constexpr int64_t kAlignFloats = 16;

size_t workspace_floats_of(const ConvPlan& p) {
    return static_cast<size_t>(p.input_floats + p.quantised_floats + p.workers * p.worker_floats + kAlignFloats);
}
}  // namespace

size_t EConvLayer::workspace_floats(const Shape4& in, int threads) const {
    return workspace_floats_of(impl_->plan(in, threads));
}

void EConvLayer::Impl::quantise_codebook() {
    r4 = round_up(r, 4);
    codebook_i8.assign(static_cast<size_t>(total_rows * r4), 0);
    codebook_i8_scale.assign(rho, 1.0f);
    codeword_sum.assign(static_cast<size_t>(total_rows), 0);
    no_correction.assign(static_cast<size_t>(*std::max_element(rows.begin(), rows.end())), 0);
    for (int64_t v = 0; v < rho; ++v) {
        const int64_t used = std::min(r, depth - v * r);
        float largest = 0.0f;
        for (int64_t c = base[v]; c < base[v] + rows[v]; ++c) {
            for (int64_t k = 0; k < used; ++k) largest = std::max(largest, std::fabs(codebook[c * r + k]));
        }
        const float scale = largest > 0.0f ? largest / 127.0f : 1.0f;
        codebook_i8_scale[v] = scale;
        for (int64_t c = base[v]; c < base[v] + rows[v]; ++c) {
            for (int64_t k = 0; k < used; ++k) {
                const float scaled = std::clamp(codebook[c * r + k] / scale, -127.0f, 127.0f);
                const auto q = static_cast<int8_t>(std::nearbyint(scaled));
                codebook_i8[c * r4 + k] = q;
                codeword_sum[c] += 128 * q;
            }
        }
    }
}

// Activations of image n, group grp as uint8, four channels of a segment interleaved per pixel
// (the vpdpbusd operand layout). The scale is options.input_scale when calibrated, else the
// range of this input; inputs >= 0 use all 256 levels, others a zero point of 128. With
// direct_quantise the values come from x itself and the padding is the zero point's byte;
// otherwise from the phase planes, padding included. (The padding's zeros never change the
// quantisation: a zero point follows from a negative value, and the range from the larger of
// the extremes' magnitudes.)
QuantisedInput EConvLayer::Impl::quantise_input(const ConvPlan& p, const InputPlanes& planes, int64_t n,
                                                int64_t grp, uint8_t* out) const {
    const int64_t plane = static_cast<int64_t>(phase_slots.size()) * p.plane_stride;  // a channel quad: 4 * plane bytes
    const int64_t stride = planes.channel_stride;  // plane, or one input channel with direct_quantise
    const float* first = planes.at(n * planes.image_channels + grp * depth, 0);
    float low = 0.0f, high = 0.0f;
    kernels->min_max(first, depth * stride, &low, &high);
    const detail::ActivationQuantisation a = detail::activation_quantisation(low, high, options.input_scale);
    if (p.direct_quantise) {
        // Padding pixels get the zero point's byte in every slot of a quad, also in the slots past
        // a segment's channels (where quantise_quad writes 0): their codeword values are 0 and
        // codeword_sum leaves them out, so what they hold never reaches a table entry.
        std::memset(out, static_cast<int>(a.zero), static_cast<size_t>(rho * r4 * plane));
    }
    const float inv_step = 1.0f / a.step;
    // Where input row 0 of a channel quad lands in its plane: the planes hold the padded input.
    const int64_t row0 = p.direct_quantise ? geometry.pad_top * p.phase_w + geometry.pad_left : 0;
    for (int64_t v = 0; v < rho; ++v) {
        const int64_t used = std::min(r, depth - v * r);
        for (int64_t k = 0; k < r4; k += 4) {
            const int64_t channels = std::clamp<int64_t>(used - k, 0, 4);
            const float* src = first + (v * r + k) * stride;
            uint8_t* quad = out + (v * r4 + k) * plane;
            if (!p.direct_quantise) {
                kernels->quantise_quad(src, channels, stride, plane, inv_step, a.low, a.high, a.zero, quad);
                continue;
            }
            for (int64_t h = 0; h < p.in.h; ++h) {
                kernels->quantise_quad(src + h * p.in.w, channels, stride, p.in.w, inv_step, a.low, a.high, a.zero,
                                       quad + 4 * (row0 + h * p.phase_w));
            }
        }
    }
    QuantisedInput q;
    q.data = out;
    q.scale = a.step;
    q.offset = a.offset;
    return q;
}

void EConvLayer::Impl::fill_phases(const float* x, const ConvPlan& p, float* phases) const {
    const ConvGeometry& g = geometry;
    const int64_t slots = static_cast<int64_t>(phase_slots.size());
    const int64_t channels = p.in.n * p.in.c;
    for (int64_t ch = 0; ch < channels; ++ch) {
        const float* src = x + ch * p.in.h * p.in.w;
        for (int64_t s = 0; s < slots; ++s) {
            float* plane = phases + (ch * slots + s) * p.plane_stride;
            std::memset(plane, 0, static_cast<size_t>(p.plane_stride) * sizeof(float));
            if (g.stride_h == 1 && g.stride_w == 1) {
                // One kernel call per channel: the memcpy calls, one per row, were ~1.4% of LeNet
                // conv2 fp16 in perf (its rows are 64 bytes).
                kernels->copy_rows(src, p.in.w, plane + g.pad_top * p.phase_w + g.pad_left, p.phase_w, p.in.h, p.in.w,
                                   false);
                continue;
            }
            const int64_t a = phase_slots[s] / g.stride_w, b = phase_slots[s] % g.stride_w;
            for (int64_t i = 0; i < p.phase_h; ++i) {
                const int64_t h = i * g.stride_h + a - g.pad_top;
                if (h < 0 || h >= p.in.h) continue;
                const float* src_row = src + h * p.in.w;
                float* dst_row = plane + i * p.phase_w;
                if (g.stride_w == 1) {
                    std::memcpy(dst_row + g.pad_left, src_row, static_cast<size_t>(p.in.w) * sizeof(float));
                    continue;
                }
                for (int64_t j = 0; j < p.phase_w; ++j) {
                    const int64_t w = j * g.stride_w + b - g.pad_left;
                    if (w >= 0 && w < p.in.w) dst_row[j] = src_row[w];
                }
            }
        }
    }
}

// A Cauchy-Schwarz bound on every |entry| of this image's table (largest codeword norm x
// largest input segment norm), or 0 when that is not a finite number. An integer table maps it
// to the integer range, so one scale serves every strip and no entry saturates; an fp16 table
// sums its entries in fp16 only below it.
float EConvLayer::Impl::entry_bound(const InputPlanes& planes, int64_t n, int64_t grp) const {
    float bound = 0.0f;
    for (int64_t s = 0; s < planes.slots; ++s) {
        for (int64_t v = 0; v < rho; ++v) {
            const float* first = planes.at(n * planes.image_channels + grp * depth + v * r, s);
            const float largest =
                kernels->largest_norm2(first, std::min(r, depth - v * r), planes.channel_stride, planes.pixels);
            bound = std::max(bound, codeword_norm[v] * std::sqrt(largest));
        }
    }
    return std::isfinite(bound) ? bound : 0.0f;
}

// What the scale bound reads: x itself when the phase planes are not written, else the planes.
InputPlanes EConvLayer::Impl::input_planes(const ConvPlan& p, const float* x, const float* phases) const {
    InputPlanes planes;
    planes.image_channels = p.in.c;
    if (p.direct_quantise) {
        planes.data = x;
        planes.channel_stride = planes.pixels = p.in.h * p.in.w;
        return planes;
    }
    planes.data = phases;
    planes.slots = static_cast<int64_t>(phase_slots.size());
    planes.slot_stride = p.plane_stride;
    planes.channel_stride = planes.slots * p.plane_stride;
    planes.pixels = p.phase_h * p.phase_w;
    return planes;
}

void EConvLayer::Impl::run_strip(const ConvPlan& p, const float* phases, const QuantisedInput* quantised,
                                 const std::vector<int32_t>& offsets, int64_t n, int64_t grp, int64_t strip,
                                 float scale, bool fp16_partial, float* worker, float* y) const {
    const KernelTable& k = *kernels;
    const int64_t slots = static_cast<int64_t>(phase_slots.size());
    const int64_t row0 = strip * p.strip_rows;
    const int64_t strip_rows = std::min(p.strip_rows, p.out.h - row0);
    // Sums run to a multiple of 16 pixels (the SIMD kernels end a row of blocks with a narrower
    // one); the table's columns and the out rows have room for that rounded up to kPixelBlock.
    const int64_t summed = round_up(strip_rows * p.phase_w, 16);
    const int64_t pixels = round_up(summed, kPixelBlock);
    // The table columns this strip's sums read: all of ld but in a shorter last strip (VGG's
    // 28-row layers end in a 4-row strip: its build then does 192 of 320 columns).
    const int64_t built = std::min(p.ld, round_up(pixels + shift_h_max * p.phase_w + shift_w_max, 16));
    float* table = worker;
    float* scratch = worker + p.table_floats;
    float* out_rows = scratch + p.scratch_floats;
    const LutPrecision precision = options.precision;

    const int64_t per_group = out_channels / geometry.group, t0 = grp * per_group;
    const int64_t taps = kernel_h * kernel_w;
    for (int64_t v0 = 0, chunk = 0; v0 < rho; v0 += p.chunk_segments, ++chunk) {
        const int64_t v1 = std::min(rho, v0 + p.chunk_segments), chunk_rows = p.chunk_rows[chunk];
        // Table build: T[slot][base[v] - base[v0] + c][q] = <codeword c of segment v, input
        // segment v at q>, narrowed to the layer's precision (by the ISA kernel as it stores, or
        // from sgemm scratch).
        for (int64_t s = 0; s < slots; ++s) {
            for (int64_t v = v0; v < v1; ++v) {
                const int64_t first = (s * chunk_rows + base[v] - base[v0]) * p.ld, count = rows[v] * p.ld;
                if (quantised) {
                    const int64_t plane = slots * p.plane_stride;
                    // Segment v's channel quads start v * r4 / 4 quads (of 4 * plane bytes) in.
                    const uint8_t* x4 =
                        quantised->data + v * r4 * plane + (s * p.plane_stride + row0 * p.phase_w) * 4;
                    const int32_t* correction =
                        quantised->offset ? codeword_sum.data() + base[v] : no_correction.data();
                    k.conv_table_u8s8(codebook_i8.data() + base[v] * r4, rows[v], r4, x4, 4 * plane, p.ld, built,
                                      correction, quantised->scale * codebook_i8_scale[v] / scale,
                                      reinterpret_cast<uint8_t*>(table) + first);
                    continue;
                }
                const int64_t channel = n * p.in.c + grp * depth + v * r;
                const float* src = phases + (channel * slots + s) * p.plane_stride + row0 * p.phase_w;
                const int64_t used = std::min(r, depth - v * r), x_stride = slots * p.plane_stride;
                const float* segment = codebook.data() + base[v] * r;
                if (build_table(k, precision, segment, rows[v], r, used, src, x_stride, p.ld, built, 1.0f / scale,
                                table, first)) {
                    continue;
                }
                float* dst = precision == LutPrecision::kFp32 ? table + first : scratch;
                NM_SGEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<blasint>(rows[v]),
                         static_cast<blasint>(p.ld), static_cast<blasint>(used), 1.0f, segment,
                         static_cast<blasint>(r), src, static_cast<blasint>(x_stride), 0.0f, dst,
                         static_cast<blasint>(p.ld));
                switch (precision) {
                    case LutPrecision::kFp32: break;
                    case LutPrecision::kFp16:
                        k.to_f16(scratch, count, reinterpret_cast<uint16_t*>(table) + first);
                        break;
                    case LutPrecision::kInt16:
                        k.quantize_i16(scratch, count, 1.0f / scale, reinterpret_cast<int16_t*>(table) + first);
                        break;
                    case LutPrecision::kInt8:
                        k.quantize_i8(scratch, count, 1.0f / scale, reinterpret_cast<int8_t*>(table) + first);
                        to_offset_binary(reinterpret_cast<uint8_t*>(table) + first, count);
                        break;
                }
            }
        }

        // The chunk's terms of every output channel of the group in one call (the kernels walk
        // pixel blocks outermost), in runs whose integer sum cannot overflow.
        const int64_t limit = precision == LutPrecision::kInt8    ? detail::kInt8ChunkTerms
                              : precision == LutPrecision::kInt16 ? detail::kInt16ChunkTerms
                                                                  : terms;
        for (int64_t k0 = v0 * taps; k0 < v1 * taps; k0 += limit) {
            const int32_t* offs = offsets.data() + t0 * terms + k0;
            const int64_t count = std::min(limit, v1 * taps - k0);
            const bool add = k0 > 0;
            switch (precision) {
                case LutPrecision::kFp32:
                    k.accumulate_f32(table, offs, terms, count, per_group, summed, bias.data() + t0, 1.0f, add,
                                     out_rows, p.strip_pixels);
                    break;
                case LutPrecision::kFp16:
                    (fp16_partial ? k.accumulate_f16_partial : k.accumulate_f16)(
                        reinterpret_cast<const uint16_t*>(table), offs, terms, count, per_group, summed,
                        bias.data() + t0, 1.0f, add, out_rows, p.strip_pixels);
                    break;
                case LutPrecision::kInt16:
                    k.accumulate_i16(reinterpret_cast<const int16_t*>(table), offs, terms, count, per_group, summed,
                                     bias.data() + t0, scale, add, out_rows, p.strip_pixels);
                    break;
                case LutPrecision::kInt8:
                    k.accumulate_i8(reinterpret_cast<const uint8_t*>(table), offs, terms, count, per_group, summed,
                                    bias.data() + t0, scale, add, out_rows, p.strip_pixels);
                    break;
            }
        }
    }
    for (int64_t c = 0; c < per_group; ++c) {
        float* dst = y + ((n * p.out.c + t0 + c) * p.out.h + row0) * p.out.w;
        const float* src = out_rows + c * p.strip_pixels;
        // Rows are short (a LeNet row is 64 bytes): a memcpy call per row was ~4% of LeNet
        // conv2's int8 time, and a plain loop here is built for baseline x86-64 only.
        k.copy_rows(src, p.phase_w, dst, p.out.w, strip_rows, p.out.w, options.relu);
    }
}

// Term offsets for the plan's input width into each chunk's table T[slot][row - first row of
// the chunk][pixel] (row start plus the tap's shift), reordered so that each chunk's terms are
// one run per channel: (chunk, tap, segment) instead of the codes' (tap, segment). Cached for
// the last plan: layers usually see one shape, and recomputing cost ~5% of LeNet conv2. The key
// is what the offsets depend on: the row stride and chunks change with the thread count too (a
// session running tasks side by side runs each layer on 1 thread, otherwise on all of them).
std::shared_ptr<const std::vector<int32_t>> EConvLayer::Impl::term_offsets(const ConvPlan& p) const {
    const std::array<int64_t, 3> key = {p.ld, p.phase_w, p.chunk_segments};
    std::lock_guard<std::mutex> lock(offsets_mutex);
    if (cached_offsets && cached_key == key) return cached_offsets;
    const int64_t taps = kernel_h * kernel_w;
    // Per segment: where its terms start within a channel's run, its chunk's width, the
    // chunk's rows per phase slot and first row.
    std::vector<int64_t> run_start(rho), width(rho), slot_rows(rho), first_row(rho);
    for (int64_t v = 0; v < rho; ++v) {
        const int64_t chunk = v / p.chunk_segments, v0 = chunk * p.chunk_segments;
        width[v] = std::min(rho, v0 + p.chunk_segments) - v0;
        run_start[v] = v0 * taps + v - v0;
        slot_rows[v] = p.chunk_rows[chunk];
        first_row[v] = base[v0];
    }
    auto offsets = std::make_shared<std::vector<int32_t>>(term_row.size());
    for (int64_t t = 0, i = 0; t < out_channels; ++t) {
        for (int64_t tap = 0; tap < taps; ++tap) {
            for (int64_t v = 0; v < rho; ++v, ++i) {
                const int64_t row = term_slot[i] * slot_rows[v] + term_row[i] - first_row[v];
                (*offsets)[t * terms + run_start[v] + tap * width[v]] =
                    static_cast<int32_t>(row * p.ld + term_shift_h[i] * p.phase_w + term_shift_w[i]);
            }
        }
    }
    cached_key = key;
    cached_offsets = offsets;
    return offsets;
}

void EConvLayer::run(const float* x, const Shape4& in, float* y, float* workspace, int threads) const {
    const Impl& m = *impl_;
    if (!x || !y) fail("input and output must not be null");
    if (threads < 0) fail("threads must be >= 0 (0: the layer's own count), got " + std::to_string(threads));
    const ConvPlan p = m.plan(in, threads);
    if (!workspace) {
        // Reused across calls: a fresh multi-megabyte allocation would be page-faulted in (and
        // zeroed by the OS) on every call, which costs more than a small layer's compute.
        thread_local std::vector<float> scratch;
        scratch.resize(std::max(scratch.size(), workspace_floats_of(p)));
        workspace = scratch.data();
    }
    const uintptr_t line = kAlignFloats * sizeof(float), address = reinterpret_cast<uintptr_t>(workspace);
    if (address % sizeof(float)) fail("the workspace must be float-aligned");
    float* phases = workspace + ((line - address % line) % line) / sizeof(float);
    if (!p.direct_quantise) m.fill_phases(x, p, phases);
    const InputPlanes planes = m.input_planes(p, x, phases);

    const std::shared_ptr<const std::vector<int32_t>> offsets_shared = m.term_offsets(p);
    const std::vector<int32_t>& offsets = *offsets_shared;

    // Per image and group: the integer table's scale, or whether the fp16 table's entries are
    // small enough to be summed in fp16 (kFp16PartialTerms of them stay finite).
    const LutPrecision precision = m.options.precision;
    const bool integer = precision == LutPrecision::kInt8 || precision == LutPrecision::kInt16;
    const bool fp16_partial = precision == LutPrecision::kFp16 && m.kernels->accumulate_f16_partial;
    const int64_t units = in.n * m.geometry.group;
    std::vector<float> scales(static_cast<size_t>(units), 1.0f);
    std::vector<char> partial(static_cast<size_t>(units), 0);
    if (integer || fp16_partial) {
        const float limit = precision == LutPrecision::kInt8 ? 127.0f : 32767.0f;
        for (int64_t u = 0; u < units; ++u) {
            const float bound = m.entry_bound(planes, u / m.geometry.group, u % m.geometry.group);
            if (integer && bound > 0.0f) scales[u] = bound / limit;
            partial[u] = fp16_partial && bound > 0.0f && bound * detail::kFp16PartialTerms <= detail::kFp16Max;
        }
    }

    std::vector<QuantisedInput> quantised;
    if (m.vnni) {
        auto* bytes = reinterpret_cast<uint8_t*>(phases + p.input_floats);
        const int64_t per_unit = m.rho * m.r4 * static_cast<int64_t>(m.phase_slots.size()) * p.plane_stride;
        for (int64_t u = 0; u < in.n * m.geometry.group; ++u) {
            quantised.push_back(m.quantise_input(p, planes, u / m.geometry.group, u % m.geometry.group,
                                                 bytes + u * per_unit));
        }
    }

    float* workers = phases + p.input_floats + p.quantised_floats;
    detail::parallel_units(units * p.strips, p.workers, [&](int64_t worker, int64_t unit) {
        const int64_t strip = unit % p.strips, image_group = unit / p.strips;
        m.run_strip(p, phases, m.vnni ? &quantised[image_group] : nullptr, offsets, image_group / m.geometry.group,
                    image_group % m.geometry.group, strip, scales[image_group], partial[image_group] != 0,
                    workers + worker * p.worker_floats, y);
    });
}

}  // namespace neuralmerge
