// EConvLayer: the fast E-Conv (DESIGN §5).
//
// Strided convolution is turned into stride 1 by splitting the zero-padded input into
// stride_h x stride_w phase planes (phase (a, b) holds padded pixels (i*sh + a, j*sw + b)).
// Tap (i0, j0) then reads phase ((i0*dh) % sh, (j0*dw) % sw) at the constant shift
// ((i0*dh) / sh, (j0*dw) / sw), so with outputs computed in phase-width coordinates every term of
// an output channel's sum is one contiguous run of the table T[phase][v][c][pixel] at a
// constant offset. Columns past the real output width are computed and dropped.
//
// The output is produced in strips of output rows whose table fits in L2; each strip builds its
// table (one sgemm per phase and segment, inner dimension r), converts it to the layer's
// precision and sums the runs with the ISA kernels of lut_internal.h.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../blas.h"
#include "lut_internal.h"

namespace neuralmerge {
namespace {

using detail::KernelTable;
using detail::kPixelBlock;

// Table bytes per strip we aim for: about a 2 MB L2 (measured: 1 MB and 2 MB are within noise
// of each other on the Xeon this was written on; the accumulate is L2-bandwidth-bound).
constexpr int64_t kTableBudgetBytes = int64_t{2} << 20;
constexpr int64_t kChannelsPerCall = 8;  // output rows of one accumulate call stay in L1

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }
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

// Float copy of the codebook: `codebook` itself, or `codebook_fp16` widened.
std::vector<float> widened_codebook(const EncodedWeight& w) {
    if (w.codebook || !w.codebook_fp16) return {};
    if (w.codebook_rows < 1 || w.segment_length < 1) return {};
    std::vector<float> out(static_cast<size_t>(w.codebook_rows * w.segment_length));
    for (size_t i = 0; i < out.size(); ++i) out[i] = detail::half_to_float(w.codebook_fp16[i]);
    return out;
}

// Runs fn(0..units-1) on up to `threads` threads (the caller's thread is one of them).
template <typename Fn>
void parallel_units(int64_t units, int threads, const Fn& fn) {
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, units));
    std::vector<std::thread> pool;
    for (int64_t id = 1; id < workers; ++id) {
        pool.emplace_back([&, id] {
            for (int64_t u = id; u < units; u += workers) fn(id, u);
        });
    }
    for (int64_t u = 0; u < units; u += workers) fn(0, u);
    for (auto& thread : pool) thread.join();
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
    int64_t input_floats = 0;   // phase planes of the whole input
    int64_t table_floats = 0;   // per worker
    int64_t scratch_floats = 0; // per worker: fp32 sgemm output before narrowing
    int64_t out_floats = 0;     // per worker: kChannelsPerCall output rows
    int64_t worker_floats = 0;
    int workers = 1;
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
    std::vector<int32_t> term_row;       // [p][terms]: phase slot * total_rows + base[v] + code
    std::vector<int32_t> term_shift_h, term_shift_w;  // [p][terms]: the term's tap shift
    std::vector<int64_t> phase_slots;    // used phases as a*stride_w + b, in slot order
    int64_t shift_h_max = 0, shift_w_max = 0;
    std::string name;

    ConvPlan plan(const Shape4& in) const;
    void fill_phases(const float* x, const ConvPlan& plan, float* phases) const;
    float table_scale(const ConvPlan& plan, const float* phases, int64_t n, int64_t grp) const;
    void run_strip(const ConvPlan& plan, const float* phases, const std::vector<int32_t>& offsets, int64_t n,
                   int64_t grp, int64_t strip, float scale, float* worker, float* y) const;
};

EConvLayer::EConvLayer(const EncodedWeight& weight, const ConvGeometry& g, const LutOptions& opt)
    : impl_(std::make_unique<Impl>()) {
    Impl& m = *impl_;
    if (opt.threads < 1) fail("threads must be at least 1, got " + std::to_string(opt.threads));
    if (!(opt.input_scale >= 0.0f) || !std::isfinite(opt.input_scale)) fail("input_scale must be finite and >= 0");
    const std::vector<float> widened = widened_codebook(weight);
    EncodedWeight w = weight;
    if (!widened.empty()) w.codebook = widened.data();
    std::vector<int64_t> rows;
    const std::vector<int64_t> codes = detail::validated_codes(w, rows);
    // Checks the geometry on the smallest input it admits.
    const int64_t reach_h = g.dilation_h * (w.kernel_h - 1) + 1, reach_w = g.dilation_w * (w.kernel_w - 1) + 1;
    econv_output_shape(Shape4{1, w.depth * std::max<int64_t>(g.group, 1), reach_h, reach_w}, w, g);

    m.kernels = &detail::select_kernels(opt.isa);
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
    m.term_row.resize(static_cast<size_t>(w.out_channels * m.terms));
    for (int64_t i = 0; i < w.out_channels * m.terms; ++i) {
        const int64_t v = i % m.rho, tap = (i / m.rho) % taps;
        m.term_row[i] = static_cast<int32_t>(tap_slot[tap] * m.total_rows + m.base[v] + codes[i]);
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

ConvPlan EConvLayer::Impl::plan(const Shape4& in) const {
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

    const int64_t slots = static_cast<int64_t>(phase_slots.size());
    const int64_t bytes = element_bytes(options.precision);
    // Rows per strip: the table of (strip_rows + shift_h_max) phase rows should fit the budget.
    const int64_t row_bytes = slots * total_rows * p.phase_w * bytes;
    // At least 4 * shift_h_max rows, so that rebuilding the rows strips share costs <= 25%.
    int64_t strip_rows = std::max<int64_t>(
        {1, 4 * shift_h_max, kTableBudgetBytes / std::max<int64_t>(row_bytes, 1) - shift_h_max});
    const int64_t units_per_strip_set = p.in.n * g.group;
    if (options.threads > units_per_strip_set) {
        // Enough strips that every thread has work.
        const int64_t strips_wanted = ceil_div(options.threads, units_per_strip_set);
        strip_rows = std::min(strip_rows, ceil_div(p.out.h, strips_wanted));
    }
    p.strip_rows = std::min(strip_rows, p.out.h);
    p.strips = ceil_div(p.out.h, p.strip_rows);
    p.strip_pixels = round_up(p.strip_rows * p.phase_w, kPixelBlock);
    p.ld = round_up(p.strip_pixels + shift_h_max * p.phase_w + shift_w_max, 16);
    const int64_t last_strip_start = (p.strips - 1) * p.strip_rows * p.phase_w;
    p.plane_stride = round_up(std::max(p.phase_h * p.phase_w, last_strip_start + p.ld), 16);
    if (slots * total_rows * p.ld > std::numeric_limits<int32_t>::max()) fail("lookup table too large");

    p.input_floats = in.n * in.c * slots * p.plane_stride;
    p.table_floats = round_up(ceil_div(slots * total_rows * p.ld * bytes, 4), 16);
    const int64_t max_rows = *std::max_element(rows.begin(), rows.end());
    p.scratch_floats = options.precision == LutPrecision::kFp32 ? 0 : round_up(max_rows * p.ld, 16);
    p.out_floats = kChannelsPerCall * p.strip_pixels;
    p.worker_floats = p.table_floats + p.scratch_floats + p.out_floats;
    p.workers = static_cast<int>(std::min<int64_t>(options.threads, p.in.n * g.group * p.strips));
    return p;
}

size_t EConvLayer::workspace_floats(const Shape4& in) const {
    const ConvPlan p = impl_->plan(in);
    return static_cast<size_t>(p.input_floats + p.workers * p.worker_floats);
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

// Scale of an integer table: a Cauchy-Schwarz bound on every entry of this image's table
// (largest codeword norm x largest input segment norm) mapped to the integer range, so one
// scale serves every strip and no entry saturates.
float EConvLayer::Impl::table_scale(const ConvPlan& p, const float* phases, int64_t n, int64_t grp) const {
    const float limit = options.precision == LutPrecision::kInt8 ? 127.0f : 32767.0f;
    const int64_t slots = static_cast<int64_t>(phase_slots.size());
    const int64_t pixels = p.phase_h * p.phase_w;
    std::vector<float> norm2(static_cast<size_t>(pixels));
    float bound = 0.0f;
    for (int64_t s = 0; s < slots; ++s) {
        for (int64_t v = 0; v < rho; ++v) {
            std::fill(norm2.begin(), norm2.end(), 0.0f);
            for (int64_t k = 0; k < std::min(r, depth - v * r); ++k) {
                const int64_t channel = n * p.in.c + grp * depth + v * r + k;
                const float* plane = phases + (channel * slots + s) * p.plane_stride;
                for (int64_t q = 0; q < pixels; ++q) norm2[q] += plane[q] * plane[q];
            }
            const float largest = *std::max_element(norm2.begin(), norm2.end());
            bound = std::max(bound, codeword_norm[v] * std::sqrt(largest));
        }
    }
    return bound > 0.0f && std::isfinite(bound) ? bound / limit : 1.0f;
}

void EConvLayer::Impl::run_strip(const ConvPlan& p, const float* phases, const std::vector<int32_t>& offsets,
                                 int64_t n, int64_t grp, int64_t strip, float scale, float* worker,
                                 float* y) const {
    const KernelTable& k = *kernels;
    const int64_t slots = static_cast<int64_t>(phase_slots.size());
    const int64_t row0 = strip * p.strip_rows;
    const int64_t strip_rows = std::min(p.strip_rows, p.out.h - row0);
    const int64_t pixels = round_up(strip_rows * p.phase_w, kPixelBlock);
    float* table = worker;
    float* scratch = worker + p.table_floats;
    float* out_rows = scratch + p.scratch_floats;
    const LutPrecision precision = options.precision;

    // Table build: T[slot][base[v] + c][q] = <codeword c of segment v, input segment v at q>.
    for (int64_t s = 0; s < slots; ++s) {
        for (int64_t v = 0; v < rho; ++v) {
            const int64_t channel = n * p.in.c + grp * depth + v * r;
            const float* src = phases + (channel * slots + s) * p.plane_stride + row0 * p.phase_w;
            const int64_t first = (s * total_rows + base[v]) * p.ld, count = rows[v] * p.ld;
            float* dst = precision == LutPrecision::kFp32 ? table + first : scratch;
            NM_SGEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<blasint>(rows[v]),
                     static_cast<blasint>(p.ld), static_cast<blasint>(std::min(r, depth - v * r)), 1.0f,
                     codebook.data() + base[v] * r, static_cast<blasint>(r), src,
                     static_cast<blasint>(slots * p.plane_stride), 0.0f, dst, static_cast<blasint>(p.ld));
            switch (precision) {
                case LutPrecision::kFp32: break;
                case LutPrecision::kFp16: k.to_f16(scratch, count, reinterpret_cast<uint16_t*>(table) + first); break;
                case LutPrecision::kInt16:
                    k.quantize_i16(scratch, count, 1.0f / scale, reinterpret_cast<int16_t*>(table) + first);
                    break;
                case LutPrecision::kInt8:
                    k.quantize_i8(scratch, count, 1.0f / scale, reinterpret_cast<int8_t*>(table) + first);
                    break;
            }
        }
    }

    // Sums, kChannelsPerCall output channels at a time, in chunks of terms whose integer sum
    // cannot overflow.
    const int64_t per_group = out_channels / geometry.group;
    const int64_t chunk = precision == LutPrecision::kInt8    ? detail::kInt8ChunkTerms
                          : precision == LutPrecision::kInt16 ? detail::kInt16ChunkTerms
                                                              : terms;
    for (int64_t t0 = grp * per_group; t0 < (grp + 1) * per_group; t0 += kChannelsPerCall) {
        const int64_t channels = std::min(kChannelsPerCall, (grp + 1) * per_group - t0);
        for (int64_t k0 = 0; k0 < terms; k0 += chunk) {
            const int32_t* offs = offsets.data() + t0 * terms + k0;
            const int64_t count = std::min(chunk, terms - k0);
            const bool add = k0 > 0;
            switch (precision) {
                case LutPrecision::kFp32:
                    k.accumulate_f32(table, offs, terms, count, channels, pixels, bias.data() + t0, 1.0f, add,
                                     out_rows, p.strip_pixels);
                    break;
                case LutPrecision::kFp16:
                    k.accumulate_f16(reinterpret_cast<const uint16_t*>(table), offs, terms, count, channels, pixels,
                                     bias.data() + t0, 1.0f, add, out_rows, p.strip_pixels);
                    break;
                case LutPrecision::kInt16:
                    k.accumulate_i16(reinterpret_cast<const int16_t*>(table), offs, terms, count, channels, pixels,
                                     bias.data() + t0, scale, add, out_rows, p.strip_pixels);
                    break;
                case LutPrecision::kInt8:
                    k.accumulate_i8(reinterpret_cast<const int8_t*>(table), offs, terms, count, channels, pixels,
                                    bias.data() + t0, scale, add, out_rows, p.strip_pixels);
                    break;
            }
        }
        for (int64_t c = 0; c < channels; ++c) {
            float* dst = y + ((n * p.out.c + t0 + c) * p.out.h + row0) * p.out.w;
            const float* src = out_rows + c * p.strip_pixels;
            for (int64_t oh = 0; oh < strip_rows; ++oh) {
                std::memcpy(dst + oh * p.out.w, src + oh * p.phase_w, static_cast<size_t>(p.out.w) * sizeof(float));
            }
        }
    }
}

void EConvLayer::run(const float* x, const Shape4& in, float* y, float* workspace) const {
    const Impl& m = *impl_;
    if (!x || !y) fail("input and output must not be null");
    const ConvPlan p = m.plan(in);
    if (!workspace) {
        // Reused across calls: a fresh multi-megabyte allocation would be page-faulted in (and
        // zeroed by the OS) on every call, which costs more than a small layer's compute.
        thread_local std::vector<float> scratch;
        scratch.resize(std::max(scratch.size(), static_cast<size_t>(p.input_floats + p.workers * p.worker_floats)));
        workspace = scratch.data();
    }
    float* phases = workspace;
    m.fill_phases(x, p, phases);

    // Term offsets for this input width: row start plus the tap's shift.
    std::vector<int32_t> offsets(m.term_row.size());
    for (size_t i = 0; i < offsets.size(); ++i) {
        offsets[i] = static_cast<int32_t>(m.term_row[i] * p.ld + m.term_shift_h[i] * p.phase_w + m.term_shift_w[i]);
    }

    const bool integer = m.options.precision == LutPrecision::kInt8 || m.options.precision == LutPrecision::kInt16;
    std::vector<float> scales(static_cast<size_t>(in.n * m.geometry.group), 1.0f);
    if (integer) {
        for (int64_t u = 0; u < in.n * m.geometry.group; ++u) {
            scales[u] = m.table_scale(p, phases, u / m.geometry.group, u % m.geometry.group);
        }
    }

    float* workers = phases + p.input_floats;
    parallel_units(in.n * m.geometry.group * p.strips, p.workers, [&](int64_t worker, int64_t unit) {
        const int64_t strip = unit % p.strips, image_group = unit / p.strips;
        m.run_strip(p, phases, offsets, image_group / m.geometry.group, image_group % m.geometry.group, strip,
                    scales[image_group], workers + worker * p.worker_floats, y);
    });
}

}  // namespace neuralmerge
