// Runs one encoded 3x3 convolution through neuralmerge::econv and checks it against the same
// convolution computed directly from the decoded weight.
#include <neuralmerge/lut_kernels.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <vector>

namespace {

// Dense OIHW weight decoded as docs/format.md states: W[t][v*r+k][i][j] = codebook[offsets[v] + code][k].
std::vector<float> decode(const neuralmerge::EncodedWeight& w) {
    const auto* codes = static_cast<const uint8_t*>(w.codes);
    std::vector<float> dense(w.out_channels * w.depth * w.kernel_h * w.kernel_w);
    for (int64_t t = 0; t < w.out_channels; ++t)
        for (int64_t i = 0; i < w.kernel_h; ++i)
            for (int64_t j = 0; j < w.kernel_w; ++j)
                for (int64_t c = 0; c < w.depth; ++c) {
                    const int64_t v = c / w.segment_length, k = c % w.segment_length;
                    const int64_t code = codes[((t * w.kernel_h + i) * w.kernel_w + j) * w.segments + v];
                    dense[((t * w.depth + c) * w.kernel_h + i) * w.kernel_w + j] =
                        w.codebook[(w.offsets[v] + code) * w.segment_length + k];
                }
    return dense;
}

}  // namespace

int main() {
    // depth 5 cut into segments of r = 3 (the last one half padding), 4 output channels.
    const int64_t depth = 5, r = 3, rho = 2, p = 4, kernel = 3;
    std::vector<float> codebook(7 * r);  // segment 0: rows 0-3, segment 1: rows 4-6
    for (size_t i = 0; i < codebook.size(); ++i) codebook[i] = std::sin(0.7f * static_cast<float>(i));
    std::vector<uint8_t> codes(p * kernel * kernel * rho);
    for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<uint8_t>(i % 2 == 0 ? i % 4 : i % 3);
    const std::vector<int64_t> offsets = {0, 4};
    const std::vector<float> bias = {0.1f, -0.2f, 0.3f, 0.0f};

    neuralmerge::EncodedWeight w;
    w.codebook = codebook.data();
    w.codebook_rows = 7;
    w.segment_length = r;
    w.codes = codes.data();
    w.code_type = neuralmerge::CodeType::kUInt8;
    w.offsets = offsets.data();
    w.segments = rho;
    w.depth = depth;
    w.bias = bias.data();
    w.out_channels = p;
    w.kernel_h = w.kernel_w = kernel;

    neuralmerge::ConvGeometry g;
    g.stride_h = g.stride_w = 2;
    g.pad_top = g.pad_left = g.pad_bottom = g.pad_right = 1;

    const neuralmerge::Shape4 in{1, depth, 8, 8};
    std::vector<float> x(in.n * in.c * in.h * in.w);
    for (size_t i = 0; i < x.size(); ++i) x[i] = std::cos(0.3f * static_cast<float>(i));

    const neuralmerge::Shape4 out = neuralmerge::econv_output_shape(in, w, g);
    std::vector<float> y(out.n * out.c * out.h * out.w);
    neuralmerge::econv(x.data(), in, w, g, y.data());

    const std::vector<float> dense = decode(w);
    double max_error = 0.0;
    for (int64_t t = 0; t < p; ++t)
        for (int64_t oh = 0; oh < out.h; ++oh)
            for (int64_t ow = 0; ow < out.w; ++ow) {
                double sum = bias[t];
                for (int64_t c = 0; c < depth; ++c)
                    for (int64_t i = 0; i < kernel; ++i)
                        for (int64_t j = 0; j < kernel; ++j) {
                            const int64_t h = oh * g.stride_h + i - g.pad_top, col = ow * g.stride_w + j - g.pad_left;
                            if (h < 0 || h >= in.h || col < 0 || col >= in.w) continue;
                            sum += double(dense[((t * depth + c) * kernel + i) * kernel + j]) * x[(c * in.h + h) * in.w + col];
                        }
                max_error = std::fmax(max_error, std::fabs(sum - y[(t * out.h + oh) * out.w + ow]));
            }
    std::printf("econv output %lldx%lldx%lldx%lld, max |LUT - direct| = %.3g\n", static_cast<long long>(out.n),
                static_cast<long long>(out.c), static_cast<long long>(out.h), static_cast<long long>(out.w), max_error);

    codes[0] = 4;  // segment 0 has only 4 codewords: rejected before any table is read
    try {
        neuralmerge::econv(x.data(), in, w, g, y.data());
        return 1;
    } catch (const std::invalid_argument& error) {
        std::printf("bad code rejected: %s\n", error.what());
    }
    return max_error < 1e-4 ? 0 : 1;
}
