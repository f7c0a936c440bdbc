// Exact fp32 reference lookup-table kernels; see include/neuralmerge/lut_kernels.h and docs/format.md.
//
// Table layout is T[v][c][padded pixel] for conv (the fast kernels build on it: every term of
// the output sum is then a contiguous run at a constant offset) and T[m][v][c] for fc.
#include "neuralmerge/lut_kernels.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <stdexcept>
#include <string>

#include "blas.h"
#include "kernels/lut_internal.h"

namespace neuralmerge {
namespace {

// Largest extent accepted for any dimension or pad: keeps every int64 product below overflow
// and every BLAS dimension within a 32-bit blasint.
constexpr int64_t kMaxExtent = INT32_MAX;

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

void require(bool condition, const std::string& message) {
    if (!condition) fail(message);
}

void require_in_range(int64_t value, int64_t low, const char* what) {
    if (value < low || value > kMaxExtent) {
        fail(std::string(what) + " must be in [" + std::to_string(low) + ", " + std::to_string(kMaxExtent) +
             "], got " + std::to_string(value));
    }
}

blasint to_blas(int64_t value, const char* what) {
    require(value <= INT32_MAX, std::string(what) + " is too large for 32-bit BLAS: " + std::to_string(value));
    return static_cast<blasint>(value);
}

int64_t code_count(const EncodedWeight& w) { return w.out_channels * w.kernel_h * w.kernel_w * w.segments; }

}  // namespace

namespace detail {

CodeView validated_codes(const EncodedWeight& w, std::vector<int64_t>& rows) {
    require_in_range(w.codebook_rows, 1, "codebook rows");
    require_in_range(w.segment_length, 1, "segment length r");
    require_in_range(w.segments, 1, "segment count rho");
    require_in_range(w.depth, 1, "depth");
    require_in_range(w.out_channels, 1, "output channels");
    require_in_range(w.kernel_h, 1, "kernel height");
    require_in_range(w.kernel_w, 1, "kernel width");
    require(w.codebook && w.codes && w.offsets && w.bias, "codebook, codes, offsets and bias must not be null");

    const int64_t r = w.segment_length, rho = w.segments;
    require(rho * r >= w.depth && (rho - 1) * r < w.depth,
            "depth " + std::to_string(w.depth) + " does not match " + std::to_string(rho) + " segments of length " +
                std::to_string(r) + " (need (rho-1)*r < depth <= rho*r)");

    // Segment v owns rows offsets[v] .. end[v]-1.
    std::vector<int64_t> end(rho);
    for (int64_t v = 0; v < rho; ++v) {
        const int64_t first = w.offsets[v];
        require(first >= 0 && first < w.codebook_rows,
                "offsets[" + std::to_string(v) + "] = " + std::to_string(first) + " is outside the codebook of " +
                    std::to_string(w.codebook_rows) + " rows");
        if (w.segment_codewords) {
            const int64_t count = w.segment_codewords[v];
            require(count >= 1 && count <= w.codebook_rows - first,
                    "segment " + std::to_string(v) + " claims " + std::to_string(count) + " codewords from row " +
                        std::to_string(first) + " of a codebook with " + std::to_string(w.codebook_rows) + " rows");
            end[v] = first + count;
        } else {
            end[v] = v + 1 < rho ? w.offsets[v + 1] : w.codebook_rows;
            require(end[v] > first, "offsets must be strictly increasing, got offsets[" + std::to_string(v) +
                                        "] = " + std::to_string(first) + " then " + std::to_string(end[v]));
        }
    }

    if (w.segment_codewords) {
        // Each segment owns its rows (docs/format.md): overlapping claims would let a small file
        // make the layers copy the same rows once per segment.
        std::vector<int64_t> order(rho);
        for (int64_t v = 0; v < rho; ++v) order[v] = v;
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return w.offsets[a] < w.offsets[b]; });
        for (int64_t i = 1; i < rho; ++i) {
            require(end[order[i - 1]] <= w.offsets[order[i]],
                    "segments " + std::to_string(order[i - 1]) + " and " + std::to_string(order[i]) +
                        " claim overlapping codebook rows");
        }
    }

    const int64_t count = code_count(w);
    const CodeView codes(w.codes, w.code_type, count);
    rows.assign(rho, 0);
    for (int64_t i = 0; i < count; ++i) {
        const int64_t v = i % rho;
        const int64_t limit = end[v] - w.offsets[v];
        if (codes[i] >= limit) {
            fail("code " + std::to_string(codes[i]) + " at flat index " + std::to_string(i) + " exceeds segment " +
                 std::to_string(v) + "'s " + std::to_string(limit) + " codewords");
        }
        rows[v] = std::max(rows[v], codes[i] + 1);
    }
    return codes;
}

}  // namespace detail

namespace {

using detail::validated_codes;

// First table row of each segment when segment v has rows[v] rows; also returns the total.
std::vector<int64_t> table_bases(const std::vector<int64_t>& rows, int64_t& total) {
    std::vector<int64_t> base(rows.size());
    total = 0;
    for (size_t v = 0; v < rows.size(); ++v) {
        base[v] = total;
        total += rows[v];
    }
    return base;
}

// Real (unpadded) channels of segment v: the zero padding of the last codeword is skipped.
int64_t segment_channels(const EncodedWeight& w, int64_t v) {
    return std::min(w.segment_length, w.depth - v * w.segment_length);
}

// Copies `channels` planes of height x width into the interior of zero-bordered padded planes.
void copy_into_padded(const float* src, int64_t channels, int64_t height, int64_t width, const ConvGeometry& g,
                      int64_t padded_width, int64_t plane, float* padded) {
    for (int64_t c = 0; c < channels; ++c) {
        for (int64_t h = 0; h < height; ++h) {
            const float* row = src + (c * height + h) * width;
            float* dst = padded + c * plane + (h + g.pad_top) * padded_width + g.pad_left;
            std::memcpy(dst, row, static_cast<size_t>(width) * sizeof(float));
        }
    }
}

}  // namespace

std::vector<int64_t> validate_encoded_weight(const EncodedWeight& weight) {
    std::vector<int64_t> rows;
    validated_codes(weight, rows);
    return rows;
}

Shape4 econv_output_shape(const Shape4& input, const EncodedWeight& w, const ConvGeometry& g) {
    require_in_range(input.n, 1, "batch size");
    require_in_range(input.c, 1, "input channels");
    require_in_range(input.h, 1, "input height");
    require_in_range(input.w, 1, "input width");
    require_in_range(g.stride_h, 1, "stride");
    require_in_range(g.stride_w, 1, "stride");
    require_in_range(g.dilation_h, 1, "dilation");
    require_in_range(g.dilation_w, 1, "dilation");
    require_in_range(g.pad_top, 0, "pad");
    require_in_range(g.pad_left, 0, "pad");
    require_in_range(g.pad_bottom, 0, "pad");
    require_in_range(g.pad_right, 0, "pad");
    require_in_range(g.group, 1, "group");
    require_in_range(w.depth, 1, "depth");
    require_in_range(w.out_channels, 1, "output channels");
    require_in_range(w.kernel_h, 1, "kernel height");
    require_in_range(w.kernel_w, 1, "kernel width");
    require(input.c == w.depth * g.group, "input has " + std::to_string(input.c) + " channels but depth " +
                                              std::to_string(w.depth) + " x group " + std::to_string(g.group) +
                                              " = " + std::to_string(w.depth * g.group));
    require(w.out_channels % g.group == 0, "output channels " + std::to_string(w.out_channels) +
                                               " are not divisible by group " + std::to_string(g.group));

    const int64_t padded_h = input.h + g.pad_top + g.pad_bottom, padded_w = input.w + g.pad_left + g.pad_right;
    const int64_t reach_h = g.dilation_h * (w.kernel_h - 1) + 1, reach_w = g.dilation_w * (w.kernel_w - 1) + 1;
    require(padded_h >= reach_h && padded_w >= reach_w,
            "dilated kernel " + std::to_string(reach_h) + "x" + std::to_string(reach_w) +
                " is larger than the padded input " + std::to_string(padded_h) + "x" + std::to_string(padded_w));
    return Shape4{input.n, w.out_channels, (padded_h - reach_h) / g.stride_h + 1,
                  (padded_w - reach_w) / g.stride_w + 1};
}

void econv(const float* x, const Shape4& input, const EncodedWeight& w, const ConvGeometry& g, float* y) {
    const Shape4 out = econv_output_shape(input, w, g);
    std::vector<int64_t> rows;
    const detail::CodeView codes = validated_codes(w, rows);
    require(x && y, "input and output must not be null");

    const int64_t padded_h = input.h + g.pad_top + g.pad_bottom, padded_w = input.w + g.pad_left + g.pad_right;
    const int64_t plane = padded_h * padded_w;
    const blasint blas_plane = to_blas(plane, "padded plane");
    int64_t total_rows = 0;
    const std::vector<int64_t> base = table_bases(rows, total_rows);
    const int64_t depth = w.depth, r = w.segment_length, rho = w.segments;
    const int64_t out_per_group = w.out_channels / g.group;
    const int64_t taps = w.kernel_h * w.kernel_w;
    const int64_t out_plane = out.h * out.w;

    // Offset of each (t, i0, j0, v) term into the table: its row start plus the tap's shift.
    std::vector<int64_t> term_offset(static_cast<size_t>(codes.size()));
    for (int64_t t = 0; t < w.out_channels; ++t) {
        for (int64_t i0 = 0; i0 < w.kernel_h; ++i0) {
            for (int64_t j0 = 0; j0 < w.kernel_w; ++j0) {
                const int64_t shift = i0 * g.dilation_h * padded_w + j0 * g.dilation_w;
                for (int64_t v = 0; v < rho; ++v) {
                    const int64_t i = ((t * w.kernel_h + i0) * w.kernel_w + j0) * rho + v;
                    term_offset[i] = (base[v] + codes[i]) * plane + shift;
                }
            }
        }
    }

    std::vector<float> padded(depth * plane, 0.0f);  // the border stays zero across copies
    std::vector<float> table(total_rows * plane);
    for (int64_t n = 0; n < input.n; ++n) {
        for (int64_t grp = 0; grp < g.group; ++grp) {
            const float* x_group = x + (n * input.c + grp * depth) * input.h * input.w;
            copy_into_padded(x_group, depth, input.h, input.w, g, padded_w, plane, padded.data());

            // T[v][c][pixel] = <x_pad[v-th channel segment][pixel], codebook[offsets[v] + c]>
            for (int64_t v = 0; v < rho; ++v) {
                NM_SGEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, to_blas(rows[v], "codewords"), blas_plane,
                         to_blas(segment_channels(w, v), "segment"), 1.0f, w.codebook + w.offsets[v] * r,
                         to_blas(r, "r"), padded.data() + v * r * plane, blas_plane, 0.0f,
                         table.data() + base[v] * plane, blas_plane);
            }

            for (int64_t local_t = 0; local_t < out_per_group; ++local_t) {
                const int64_t t = grp * out_per_group + local_t;
                float* y_t = y + (n * out.c + t) * out_plane;
                std::fill(y_t, y_t + out_plane, w.bias[t]);
                for (int64_t term = t * taps * rho; term < (t + 1) * taps * rho; ++term) {
                    const float* src = table.data() + term_offset[term];
                    for (int64_t oh = 0; oh < out.h; ++oh) {
                        const float* src_row = src + oh * g.stride_h * padded_w;
                        float* y_row = y_t + oh * out.w;
                        for (int64_t ow = 0; ow < out.w; ++ow) y_row[ow] += src_row[ow * g.stride_w];
                    }
                }
            }
        }
    }
}

void egemm(const float* x, int64_t rows_in, const EncodedWeight& w, float* y) {
    require_in_range(rows_in, 1, "batch rows");
    require(w.kernel_h == 1 && w.kernel_w == 1, "an fc layer has a 1x1 kernel");
    std::vector<int64_t> rows;
    const detail::CodeView codes = validated_codes(w, rows);
    require(x && y, "input and output must not be null");

    int64_t total_rows = 0;
    const std::vector<int64_t> base = table_bases(rows, total_rows);
    const int64_t r = w.segment_length, rho = w.segments;

    // T[m][v][c] = <x[m][v-th segment], codebook[offsets[v] + c]>: one sgemm per segment for all rows.
    std::vector<float> table(rows_in * total_rows);
    for (int64_t v = 0; v < rho; ++v) {
        NM_SGEMM(CblasRowMajor, CblasNoTrans, CblasTrans, to_blas(rows_in, "batch rows"),
                 to_blas(rows[v], "codewords"), to_blas(segment_channels(w, v), "segment"), 1.0f, x + v * r,
                 to_blas(w.depth, "depth"), w.codebook + w.offsets[v] * r, to_blas(r, "r"), 0.0f,
                 table.data() + base[v], to_blas(total_rows, "table width"));
    }

    for (int64_t m = 0; m < rows_in; ++m) {
        const float* table_m = table.data() + m * total_rows;
        for (int64_t t = 0; t < w.out_channels; ++t) {
            float sum = w.bias[t];
            for (int64_t v = 0; v < rho; ++v) sum += table_m[base[v] + codes[t * rho + v]];
            y[m * w.out_channels + t] = sum;
        }
    }
}

}  // namespace neuralmerge
