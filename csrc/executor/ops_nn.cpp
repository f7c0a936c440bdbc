// Layer ops: the encoded E-layers (lookup-table kernels), dense Conv / Gemm / MatMul (OpenBLAS
// sgemm) and pooling.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>

#include "../blas.h"
#include "../kernels/lut_internal.h"
#include "../kernels/parallel.h"
#include "neuralmerge/lut_kernels.h"
#include "op.h"

namespace neuralmerge::detail {
namespace {

LutPrecision lut_precision(Precision p) {
    switch (p) {
        case Precision::kFp32: return LutPrecision::kFp32;
        case Precision::kFp16: return LutPrecision::kFp16;
        case Precision::kInt16: return LutPrecision::kInt16;
        case Precision::kInt8: return LutPrecision::kInt8;
    }
    return LutPrecision::kFp32;
}

std::array<int64_t, 2> pair_attr(const Node& node, const char* key, int64_t fallback) {
    const Dims v = node.attr_ints(key, {fallback, fallback});
    if (v.size() != 2) model_error(node.where() + ": '" + key + "' must have 2 values (2-D ops only)");
    return {v[0], v[1]};
}

std::array<int64_t, 4> pads_attr(const Node& node) {
    const std::string auto_pad = node.attr_string("auto_pad", "NOTSET");
    if (auto_pad != "NOTSET" && auto_pad != "VALID") {
        model_error(node.where() + ": auto_pad " + auto_pad + " is not supported (neuralmerge normalises it to pads)");
    }
    const Dims v = node.attr_ints("pads", {0, 0, 0, 0});
    if (v.size() != 4) model_error(node.where() + ": 'pads' must have 4 values (2-D ops only)");
    for (int64_t p : v) {
        if (p < 0 || p > kMaxElements) model_error(node.where() + ": invalid pad " + std::to_string(p));
    }
    return {v[0], v[1], v[2], v[3]};  // ONNX order: top, left, bottom, right
}

// Output columns [lo, hi) of `count` whose input columns ow * stride + first ... + reach all lie
// in [0, w): the windows (pooling) or taps (im2col) that need no bounds check.
std::pair<int64_t, int64_t> inside_columns(int64_t count, int64_t w, int64_t stride, int64_t first, int64_t reach) {
    const int64_t lo = std::min(count, first >= 0 ? 0 : (-first + stride - 1) / stride);
    const int64_t last = w - 1 - reach - first;  // the largest ow * stride that fits
    return {lo, std::max(lo, std::min(count, last >= 0 ? last / stride + 1 : 0))};
}

void require_positive(const Node& node, const std::array<int64_t, 2>& v, const char* what) {
    for (int64_t x : v) {
        if (x < 1 || x > kMaxElements) model_error(node.where() + ": " + what + " must be >= 1, got " + std::to_string(x));
    }
}

const Constant& named_constant(const Node& node, const PackedModel& model, size_t i, DType dtype) {
    if (i >= node.inputs.size() || node.inputs[i].empty()) model_error(node.where() + ": input " + std::to_string(i) + " is missing");
    const auto it = model.constants.find(node.inputs[i]);
    if (it == model.constants.end()) model_error(node.where() + ": input '" + node.inputs[i] + "' must be a constant");
    if (it->second.dtype != dtype && !(dtype == DType::kUInt8 && it->second.dtype == DType::kUInt16)) {
        model_error(node.where() + ": constant '" + node.inputs[i] + "' has dtype " + dtype_name(it->second.dtype) +
                    ", expected " + dtype_name(dtype));
    }
    return it->second;
}

// The EncodedWeight of an EConv/EGemm node after checking every constant's shape against the
// others (docs/format.md); the kernels then check offsets and every code against C_v.
EncodedWeight encoded_weight(const Node& node, const PackedModel& model, size_t code_rank,
                             std::vector<int64_t>& segment_codewords) {
    if (node.inputs.size() != 6) model_error(node.where() + ": expected 6 inputs, got " + std::to_string(node.inputs.size()));
    const Constant& codebook = named_constant(node, model, 1, DType::kFloat32);
    const Constant& codes = named_constant(node, model, 2, DType::kUInt8);
    const Constant& offsets = named_constant(node, model, 3, DType::kInt64);
    const Constant& depth = named_constant(node, model, 4, DType::kInt64);
    const Constant& bias = named_constant(node, model, 5, DType::kFloat32);
    const auto bad = [&node](const std::string& what) { model_error(node.where() + ": " + what); };
    if (codebook.shape.size() != 2 || codebook.shape[0] < 1 || codebook.shape[1] < 1) bad("codebook must be [K, r] with K, r >= 1, got " + dims_text(codebook.shape));
    if (codes.shape.size() != code_rank) bad("codes must have rank " + std::to_string(code_rank) + ", got " + dims_text(codes.shape));
    for (int64_t d : codes.shape) {
        if (d < 1) bad("codes have an empty dimension: " + dims_text(codes.shape));
    }
    const int64_t rho = codes.shape.back(), r = codebook.shape[1];
    if (offsets.shape != Dims{rho}) bad("offsets " + dims_text(offsets.shape) + " do not match " + std::to_string(rho) + " segments of the codes");
    if (depth.numel != 1) bad("depth must hold one value");
    const int64_t d = *static_cast<const int64_t*>(depth.data);
    if (d < 1 || d > rho * r || d <= (rho - 1) * r) {
        bad("depth " + std::to_string(d) + " does not match " + std::to_string(rho) + " segments of length " + std::to_string(r));
    }
    if (bias.shape != Dims{codes.shape[0]}) bad("bias " + dims_text(bias.shape) + " does not match " + std::to_string(codes.shape[0]) + " outputs");

    EncodedWeight w;
    w.codebook = static_cast<const float*>(codebook.data);
    w.codebook_rows = codebook.shape[0];
    w.segment_length = r;
    w.codes = codes.data;
    w.code_type = codes.dtype == DType::kUInt8 ? CodeType::kUInt8 : CodeType::kUInt16;
    w.offsets = static_cast<const int64_t*>(offsets.data);
    w.segments = rho;
    w.depth = d;
    w.bias = static_cast<const float*>(bias.data);
    w.out_channels = codes.shape[0];
    if (code_rank == 4) {
        w.kernel_h = codes.shape[1];
        w.kernel_w = codes.shape[2];
    }
    const auto info = model.elayers.find(node.name);
    if (info != model.elayers.end() && !info->second.segment_codewords.empty()) {
        segment_codewords = info->second.segment_codewords;
        if (static_cast<int64_t>(segment_codewords.size()) != rho) {
            bad("segment_codewords has " + std::to_string(segment_codewords.size()) + " entries for " + std::to_string(rho) + " segments");
        }
        for (int64_t v = 0; v < rho; ++v) {
            const int64_t c = segment_codewords[v], first = w.offsets[v];
            if (c < 1 || first < 0 || first > w.codebook_rows || c > w.codebook_rows - first) {
                bad("segment " + std::to_string(v) + " (offset " + std::to_string(first) + ", " + std::to_string(c) +
                    " codewords) lies outside the codebook of " + std::to_string(w.codebook_rows) + " rows");
            }
        }
        w.segment_codewords = segment_codewords.data();
    }
    return w;
}

LutOptions lut_options(const Node& node, const PackedModel& model, const SessionOptions& options) {
    LutOptions o;
    o.precision = lut_precision(options.precision);
    o.threads = options.threads;
    o.relu = node.fused_relu;
    const auto info = model.elayers.find(node.name);
    if (info != model.elayers.end()) o.input_scale = info->second.input_scale;
    return o;
}

// Kernel constructors report bad weights as std::invalid_argument; in a file that is a ModelError.
template <typename F>
auto as_model_error(const Node& node, F&& f) -> decltype(f()) {
    try {
        return f();
    } catch (const std::invalid_argument& e) {
        model_error(node.where() + ": " + e.what());
    }
}

Shape4 shape4(const Dims& d) { return Shape4{d[0], d[1], d[2], d[3]}; }

// ---- E-layers --------------------------------------------------------------------------

class EConvOp : public Op {
   public:
    EConvOp(const Node& node, const PackedModel& model, const SessionOptions& options) : Op(node) {
        EncodedWeight w = encoded_weight(node, model, 4, segment_codewords_);
        const auto strides = pair_attr(node, "strides", 1), dilations = pair_attr(node, "dilations", 1);
        require_positive(node, strides, "strides");
        require_positive(node, dilations, "dilations");
        const auto pads = pads_attr(node);
        const ConvGeometry g{strides[0], strides[1], pads[0],      pads[1],
                             pads[2],    pads[3],    dilations[0], dilations[1], node.attr_int("group", 1)};
        require(g.group >= 1 && g.group <= kMaxElements, "invalid group " + std::to_string(g.group));
        layer_ = std::make_unique<EConvLayer>(as_model_error(node, [&] { return EConvLayer(w, g, lut_options(node, model, options)); }));
    }

    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo& x = float_input(in, 0);
        require(x.shape.size() == 4, "input must be NCHW, got " + dims_text(x.shape));
        const Shape4 o = as_model_error(node_, [&] { return layer_->output_shape(shape4(x.shape)); });
        return {float_value({o.n, o.c, o.h, o.w})};
    }

    // Enough for either thread count a run may use (the session's, or 1 inside a task).
    size_t workspace_floats(const Infos& in, const Infos&) const override {
        return as_model_error(node_, [&] {
            return std::max(layer_->workspace_floats(shape4(in[0]->shape)), layer_->workspace_floats(shape4(in[0]->shape), 1));
        });
    }

    void run(const Infos& in, const Infos&, RunContext& ctx) const override {
        layer_->run(ctx.in[0], shape4(in[0]->shape), ctx.out[0], ctx.workspace, ctx.threads);
    }

    std::string kernel() const override { return layer_->kernel_name() + std::string(node_.fused_relu ? " + Relu" : ""); }
    bool reads_at_run(size_t input) const override { return input == 0; }  // the layer holds its own copies

   private:
    std::vector<int64_t> segment_codewords_;
    std::unique_ptr<EConvLayer> layer_;
};

class EGemmOp : public Op {
   public:
    EGemmOp(const Node& node, const PackedModel& model, const SessionOptions& options) : Op(node) {
        EncodedWeight w = encoded_weight(node, model, 2, segment_codewords_);
        layer_ = std::make_unique<EGemmLayer>(as_model_error(node, [&] { return EGemmLayer(w, lut_options(node, model, options)); }));
    }

    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo& x = float_input(in, 0);
        require(!x.shape.empty() && x.shape.back() == layer_->in_features(),
                "input " + dims_text(x.shape) + " does not end in " + std::to_string(layer_->in_features()) + " features");
        Dims out = x.shape;
        out.back() = layer_->out_features();
        return {float_value(out)};
    }

    void run(const Infos& in, const Infos&, RunContext& ctx) const override {
        const int64_t rows = in[0]->numel() / layer_->in_features();
        if (rows > 0) layer_->run(ctx.in[0], rows, ctx.out[0]);
    }

    std::string kernel() const override { return layer_->kernel_name() + std::string(node_.fused_relu ? " + Relu" : ""); }
    bool reads_at_run(size_t input) const override { return input == 0; }  // the layer holds its own copies

   private:
    std::vector<int64_t> segment_codewords_;
    std::unique_ptr<EGemmLayer> layer_;
};

// ---- Dense convolution -------------------------------------------------------------------

// Multiply-adds below which a dense Conv or Gemm runs on one thread (~20 us of work).
constexpr int64_t kMinParallelMacs = int64_t{1} << 20;

class ConvOp : public Op {
   public:
    ConvOp(const Node& node, const PackedModel& model) : Op(node) {
        const Constant& w = constant_input(model, 1);
        require(w.shape.size() == 4, "only 2-D convolution is supported, weight is " + dims_text(w.shape));
        weight_ = static_cast<const float*>(w.data);
        out_channels_ = w.shape[0];
        depth_ = w.shape[1];
        kh_ = w.shape[2];
        kw_ = w.shape[3];
        require(out_channels_ >= 1 && depth_ >= 1 && kh_ >= 1 && kw_ >= 1, "empty weight " + dims_text(w.shape));
        if (node.inputs.size() > 2 && !node.inputs[2].empty()) {
            bias_ = static_cast<const float*>(constant_input(model, 2, out_channels_).data);
        }
        strides_ = pair_attr(node, "strides", 1);
        dilations_ = pair_attr(node, "dilations", 1);
        require_positive(node, strides_, "strides");
        require_positive(node, dilations_, "dilations");
        pads_ = pads_attr(node);
        group_ = node.attr_int("group", 1);
        require(group_ >= 1 && out_channels_ % group_ == 0, "group " + std::to_string(group_) + " does not divide " + std::to_string(out_channels_) + " output channels");
        const Dims kernel = node.attr_ints("kernel_shape", {kh_, kw_});
        require(kernel == Dims({kh_, kw_}), "kernel_shape does not match the weight");
    }

    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo& x = float_input(in, 0);
        require(x.shape.size() == 4, "input must be NCHW, got " + dims_text(x.shape));
        require(x.shape[1] == depth_ * group_, "input has " + std::to_string(x.shape[1]) + " channels, expected " + std::to_string(depth_ * group_));
        const int64_t ph = x.shape[2] + pads_[0] + pads_[2], pw = x.shape[3] + pads_[1] + pads_[3];
        const int64_t reach_h = dilations_[0] * (kh_ - 1) + 1, reach_w = dilations_[1] * (kw_ - 1) + 1;
        require(ph >= reach_h && pw >= reach_w, "kernel is larger than the padded input " + dims_text(x.shape));
        return {float_value({x.shape[0], out_channels_, (ph - reach_h) / strides_[0] + 1, (pw - reach_w) / strides_[1] + 1})};
    }

    size_t workspace_floats(const Infos&, const Infos& out) const override {
        return direct() ? 0 : static_cast<size_t>(depth_ * kh_ * kw_ * out[0]->shape[2] * out[0]->shape[3]);
    }

    void run(const Infos& in, const Infos& out, RunContext& ctx) const override {
        const Dims &xs = in[0]->shape, &ys = out[0]->shape;
        const int64_t in_plane = xs[2] * xs[3], out_plane = ys[2] * ys[3];
        const int64_t out_per_group = out_channels_ / group_, k = depth_ * kh_ * kw_;
        // Threads split im2col by input channel and the sgemm by output channel (BLAS itself is
        // single-threaded: kernels/parallel.h); small convs stay on one thread.
        const int threads = out_per_group * out_plane * k < kMinParallelMacs ? 1 : ctx.threads;
        for (int64_t n = 0; n < xs[0]; ++n) {
            for (int64_t g = 0; g < group_; ++g) {
                const float* x = ctx.in[0] + (n * xs[1] + g * depth_) * in_plane;
                float* y = ctx.out[0] + (n * ys[1] + g * out_per_group) * out_plane;
                const float* columns = x;  // a 1x1 stride-1 unpadded conv reads the input as it is
                if (!direct()) {
                    detail::parallel_ranges(depth_, threads, [&](int64_t c0, int64_t c1) {
                        im2col(x, xs[2], xs[3], ys[2], ys[3], c0, c1, ctx.workspace);
                    });
                    columns = ctx.workspace;
                }
                detail::parallel_ranges(out_per_group, threads, [&](int64_t t0, int64_t t1) {
                    NM_SGEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<blasint>(t1 - t0),
                             static_cast<blasint>(out_plane), static_cast<blasint>(k), 1.0f,
                             weight_ + (g * out_per_group + t0) * k, static_cast<blasint>(k), columns,
                             static_cast<blasint>(out_plane), 0.0f, y + t0 * out_plane, static_cast<blasint>(out_plane));
                    if (!bias_) return;
                    for (int64_t t = t0; t < t1; ++t) {
                        const float b = bias_[g * out_per_group + t];
                        for (int64_t i = 0; i < out_plane; ++i) y[t * out_plane + i] += b;
                    }
                });
            }
        }
    }

   private:
    bool direct() const {
        return kh_ == 1 && kw_ == 1 && strides_[0] == 1 && strides_[1] == 1 && pads_[0] == 0 && pads_[1] == 0 &&
               pads_[2] == 0 && pads_[3] == 0;
    }

    // columns[(c*kh + i)*kw + j][oh*OW + ow] = x[c][oh*s - pad + i*d][ow*s - pad + j*d] (0 outside),
    // for input channels c0 <= c < c1.
    void im2col(const float* x, int64_t h, int64_t w, int64_t oh_count, int64_t ow_count, int64_t c0, int64_t c1,
                float* columns) const {
        for (int64_t c = c0; c < c1; ++c) {
            for (int64_t i = 0; i < kh_; ++i) {
                for (int64_t j = 0; j < kw_; ++j) {
                    float* row = columns + ((c * kh_ + i) * kw_ + j) * oh_count * ow_count;
                    for (int64_t oh = 0; oh < oh_count; ++oh) {
                        const int64_t ih = oh * strides_[0] - pads_[0] + i * dilations_[0];
                        float* dst = row + oh * ow_count;
                        if (ih < 0 || ih >= h) {
                            std::fill(dst, dst + ow_count, 0.0f);
                            continue;
                        }
                        // Outputs [lo, hi) read inside the row: copied without a bounds check per
                        // element (with one, im2col took half of a 3-channel 224x224 first layer).
                        const float* src = x + (c * h + ih) * w;
                        const int64_t shift = j * dilations_[1] - pads_[1], s = strides_[1];
                        const auto [lo, hi] = inside_columns(ow_count, w, s, shift, 0);
                        std::fill(dst, dst + lo, 0.0f);
                        if (s == 1) {
                            if (hi > lo) std::copy(src + lo + shift, src + hi + shift, dst + lo);
                        } else {
                            for (int64_t ow = lo; ow < hi; ++ow) dst[ow] = src[ow * s + shift];
                        }
                        std::fill(dst + hi, dst + ow_count, 0.0f);
                    }
                }
            }
        }
    }

    const float* weight_ = nullptr;
    const float* bias_ = nullptr;
    int64_t out_channels_ = 0, depth_ = 0, kh_ = 0, kw_ = 0, group_ = 1;
    std::array<int64_t, 2> strides_{}, dilations_{};
    std::array<int64_t, 4> pads_{};
};

// ---- Gemm and MatMul ---------------------------------------------------------------------

// Y = alpha * A' B' + beta * C with A' = A or A^T, B' = B or B^T; MatMul is the case A [..., K],
// B [K, N], no C.
class GemmOp : public Op {
   public:
    GemmOp(const Node& node, bool matmul) : Op(node), matmul_(matmul) {
        if (!matmul) {
            trans_a_ = node.attr_int("transA", 0) != 0;
            trans_b_ = node.attr_int("transB", 0) != 0;
            alpha_ = node.attr_float("alpha", 1.0f);
            beta_ = node.attr_float("beta", 1.0f);
        }
    }

    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo &a = float_input(in, 0), &b = float_input(in, 1);
        require(b.shape.size() == 2, "the second input must be 2-D, got " + dims_text(b.shape));
        require(matmul_ ? a.shape.size() >= 2 : a.shape.size() == 2, "first input has unsupported shape " + dims_text(a.shape));
        const int64_t k = trans_a_ ? a.shape[0] : a.shape.back();
        const int64_t kb = trans_b_ ? b.shape[1] : b.shape[0], n = trans_b_ ? b.shape[0] : b.shape[1];
        require(k == kb, "inner dimensions differ: " + dims_text(a.shape) + " x " + dims_text(b.shape));
        require(k > 0 && n > 0, "empty weight " + dims_text(b.shape));
        Dims out = a.shape;
        if (trans_a_) out = {a.shape[1], n};
        else out.back() = n;
        if (!matmul_ && in.size() > 2 && in[2]) {
            const Dims& c = float_input(in, 2).shape;
            require(c.size() <= 2, "C must have rank <= 2");
            const int64_t c_rows = c.size() == 2 ? c[0] : 1, c_cols = c.empty() ? 1 : c.back();
            require((c_rows == 1 || c_rows == out[0]) && (c_cols == 1 || c_cols == n),
                    "C " + dims_text(c) + " does not broadcast to " + dims_text(out));
        }
        return {float_value(out)};
    }

    void run(const Infos& in, const Infos& out, RunContext& ctx) const override {
        const Dims &a = in[0]->shape, &b = in[1]->shape;
        const int64_t n = out[0]->shape.back(), m = out[0]->numel() / n;
        const int64_t k = trans_a_ ? a[0] : a.back();
        float beta = 0.0f;
        if (!matmul_ && in.size() > 2 && in[2] && beta_ != 0.0f) {
            const Dims& c = in[2]->shape;
            const int64_t row_stride = c.size() == 2 && c[0] != 1 ? c.back() : 0, col_stride = !c.empty() && c.back() != 1 ? 1 : 0;
            for (int64_t i = 0; i < m; ++i) {
                for (int64_t j = 0; j < n; ++j) ctx.out[0][i * n + j] = ctx.in[2][i * row_stride + j * col_stride];
            }
            beta = beta_;
        }
        if (m == 0 || n == 0) return;
        // Threads take column ranges of the output (B's columns, or rows of a transposed B).
        const int threads = m * n * k < kMinParallelMacs ? 1 : ctx.threads;
        detail::parallel_ranges(n, threads, [&](int64_t j0, int64_t j1) {
            const float* b_part = ctx.in[1] + (trans_b_ ? j0 * b[1] : j0);
            if (m == 1) {
                // Batch 1 (a classifier's output layer): OpenBLAS's sgemm with one row ran ~2.8x
                // slower than sgemv on a 4096 -> 1000 layer (3.7 ms in the VGG + ZF-Net pair).
                // A's single row (or column, when transposed) is contiguous either way.
                if (trans_b_) {
                    NM_SGEMV(CblasRowMajor, CblasNoTrans, static_cast<blasint>(j1 - j0), static_cast<blasint>(k), alpha_,
                             b_part, static_cast<blasint>(b[1]), ctx.in[0], 1, beta, ctx.out[0] + j0, 1);
                } else {
                    NM_SGEMV(CblasRowMajor, CblasTrans, static_cast<blasint>(k), static_cast<blasint>(j1 - j0), alpha_,
                             b_part, static_cast<blasint>(b[1]), ctx.in[0], 1, beta, ctx.out[0] + j0, 1);
                }
                return;
            }
            NM_SGEMM(CblasRowMajor, trans_a_ ? CblasTrans : CblasNoTrans, trans_b_ ? CblasTrans : CblasNoTrans,
                     static_cast<blasint>(m), static_cast<blasint>(j1 - j0), static_cast<blasint>(k), alpha_, ctx.in[0],
                     static_cast<blasint>(trans_a_ ? m : k), b_part, static_cast<blasint>(b[1]), beta, ctx.out[0] + j0,
                     static_cast<blasint>(n));
        });
    }

   private:
    bool matmul_;
    bool trans_a_ = false, trans_b_ = false;
    float alpha_ = 1.0f, beta_ = 1.0f;
};

// ---- Pooling -----------------------------------------------------------------------------

class PoolOp : public Op {
   public:
    PoolOp(const Node& node, bool max) : Op(node), max_(max) {
        kernel_ = pair_attr(node, "kernel_shape", 0);
        strides_ = pair_attr(node, "strides", 1);
        dilations_ = pair_attr(node, "dilations", 1);
        require_positive(node, kernel_, "kernel_shape");
        require_positive(node, strides_, "strides");
        require_positive(node, dilations_, "dilations");
        pads_ = pads_attr(node);
        ceil_ = node.attr_int("ceil_mode", 0) != 0;
        include_pad_ = node.attr_int("count_include_pad", 0) != 0;
        for (size_t i = 1; i < node.outputs.size(); ++i) require(node.outputs[i].empty(), "the Indices output is not supported");
    }

    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo& x = float_input(in, 0);
        require(x.shape.size() == 4, "input must be NCHW, got " + dims_text(x.shape));
        return {float_value({x.shape[0], x.shape[1], extent(x.shape[2], 0), extent(x.shape[3], 1)})};
    }

    void run(const Infos& in, const Infos& out, RunContext& ctx) const override {
        const Dims &xs = in[0]->shape, &ys = out[0]->shape;
        const int64_t h = xs[2], w = xs[3], out_w = ys[3];
        // Windows that lie wholly inside the input need no bounds checks and, for averages,
        // divide by the full window; edge windows take the general path. The LeNet pair spent
        // a fifth of its int8 run time in pooling before this split.
        const auto [inner_lo, inner_hi] =
            inside_columns(out_w, w, strides_[1], -pads_[1], dilations_[1] * (kernel_[1] - 1));
        const bool halving = kernel_ == std::array<int64_t, 2>{2, 2} && strides_ == std::array<int64_t, 2>{2, 2} &&
                             dilations_ == std::array<int64_t, 2>{1, 1};
        std::vector<float> columns(halving ? 0 : static_cast<size_t>(w));  // inside_row's scratch
        for (int64_t plane = 0; plane < xs[0] * xs[1]; ++plane) {
            const float* x = ctx.in[0] + plane * h * w;
            float* y = ctx.out[0] + plane * ys[2] * out_w;
            for (int64_t oh = 0; oh < ys[2]; ++oh) {
                float* y_row = y + oh * out_w;
                const int64_t h0 = oh * strides_[0] - pads_[0];
                const bool rows_inside = h0 >= 0 && h0 + dilations_[0] * (kernel_[0] - 1) < h;
                int64_t ow = 0;
                if (rows_inside) {
                    for (; ow < inner_lo; ++ow) y_row[ow] = window(x, h, w, oh, ow);
                    const float* origin = x + h0 * w - pads_[1];
                    if (halving) {
                        inside_halving(origin, w, inner_lo, inner_hi, y_row);
                    } else {
                        inside_row(origin, w, inner_lo, inner_hi, columns.data(), y_row);
                    }
                    ow = inner_hi;
                }
                for (; ow < out_w; ++ow) y_row[ow] = window(x, h, w, oh, ow);
            }
        }
    }

   private:
    // Output columns [lo, hi) of a row whose windows lie wholly inside the input (`origin`: the
    // top-left cell of column 0's window, padding included). The window rows are reduced down
    // each column first (contiguous loops the compiler vectorises), then across each window's
    // columns: ZF-Net's 3x3/2 max-pool of 96x110x110 took 2.3 ms one window at a time.
    void inside_row(const float* origin, int64_t w, int64_t lo, int64_t hi, float* columns, float* y_row) const {
        if (hi <= lo) return;
        // columns[c] reduces input column lo * stride + c; count <= w.
        const float* row = origin + lo * strides_[1];
        const int64_t count = (hi - 1 - lo) * strides_[1] + dilations_[1] * (kernel_[1] - 1) + 1;
        std::copy(row, row + count, columns);
        for (int64_t i = 1; i < kernel_[0]; ++i) {
            const float* next = row + i * dilations_[0] * w;
            if (max_) {
                for (int64_t c = 0; c < count; ++c) columns[c] = std::max(columns[c], next[c]);
            } else {
                for (int64_t c = 0; c < count; ++c) columns[c] += next[c];
            }
        }
        const float cells = static_cast<float>(kernel_[0] * kernel_[1]);
        for (int64_t ow = lo; ow < hi; ++ow) {
            const float* window = columns + (ow - lo) * strides_[1];
            float acc = window[0];
            for (int64_t j = 1; j < kernel_[1]; ++j) {
                acc = max_ ? std::max(acc, window[j * dilations_[1]]) : acc + window[j * dilations_[1]];
            }
            y_row[ow] = max_ ? acc : acc / cells;
        }
    }

    // 2x2 windows at stride 2 (the common case) over output columns [lo, hi), on the CPU's SIMD
    // kernel (the executor itself is built for baseline x86-64): pooling was ~6% of the LeNet
    // pair's int8 time.
    void inside_halving(const float* origin, int64_t w, int64_t lo, int64_t hi, float* y_row) const {
        if (hi > lo) kernels_.pool_2x2(origin + 2 * lo, origin + w + 2 * lo, hi - lo, max_, y_row + lo);
    }

    int64_t extent(int64_t size, int axis) const {
        const int64_t padded = size + pads_[axis] + pads_[axis + 2];
        const int64_t reach = dilations_[axis] * (kernel_[axis] - 1) + 1;
        require(padded >= reach, "pooling window is larger than the padded input");
        const int64_t span = padded - reach, s = strides_[axis];
        int64_t count = (ceil_ ? (span + s - 1) / s : span / s) + 1;
        if (ceil_ && (count - 1) * s >= size + pads_[axis]) --count;  // the last window must start inside
        return count;
    }

    float window(const float* x, int64_t h, int64_t w, int64_t oh, int64_t ow) const {
        const int64_t h0 = oh * strides_[0] - pads_[0], w0 = ow * strides_[1] - pads_[1];
        if (max_) {
            float best = -INFINITY;
            for (int64_t i = 0; i < kernel_[0]; ++i) {
                const int64_t ih = h0 + i * dilations_[0];
                if (ih < 0 || ih >= h) continue;
                for (int64_t j = 0; j < kernel_[1]; ++j) {
                    const int64_t iw = w0 + j * dilations_[1];
                    if (iw >= 0 && iw < w) best = std::max(best, x[ih * w + iw]);
                }
            }
            return best;
        }
        // The divisor counts padding cells (count_include_pad) but never cells past the padding.
        float sum = 0.0f;
        int64_t inside = 0, padded = 0;
        for (int64_t i = 0; i < kernel_[0]; ++i) {
            const int64_t ih = h0 + i * dilations_[0];
            if (ih >= h + pads_[2]) break;
            for (int64_t j = 0; j < kernel_[1]; ++j) {
                const int64_t iw = w0 + j * dilations_[1];
                if (iw >= w + pads_[3]) break;
                ++padded;
                if (ih >= 0 && ih < h && iw >= 0 && iw < w) {
                    sum += x[ih * w + iw];
                    ++inside;
                }
            }
        }
        const int64_t count = include_pad_ ? padded : std::max<int64_t>(inside, 1);
        return sum / static_cast<float>(count);
    }

    bool max_;
    const detail::KernelTable& kernels_ = detail::select_kernels(LutIsa::kAuto);
    std::array<int64_t, 2> kernel_{}, strides_{}, dilations_{};
    std::array<int64_t, 4> pads_{};
    bool ceil_ = false, include_pad_ = false;
};

class GlobalPoolOp : public Op {
   public:
    GlobalPoolOp(const Node& node, bool max) : Op(node), max_(max) {}

    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo& x = float_input(in, 0);
        require(x.shape.size() >= 3, "input must be [N, C, spatial...], got " + dims_text(x.shape));
        require(numel(Dims(x.shape.begin() + 2, x.shape.end())) > 0, "input has an empty spatial extent");
        Dims out = x.shape;
        std::fill(out.begin() + 2, out.end(), 1);
        return {float_value(out)};
    }

    void run(const Infos& in, const Infos&, RunContext& ctx) const override {
        const Dims& s = in[0]->shape;
        const int64_t inner = numel(Dims(s.begin() + 2, s.end()));
        for (int64_t plane = 0; plane < s[0] * s[1]; ++plane) {
            const float* x = ctx.in[0] + plane * inner;
            float acc = max_ ? -INFINITY : 0.0f;
            for (int64_t i = 0; i < inner; ++i) acc = max_ ? std::max(acc, x[i]) : acc + x[i];
            ctx.out[0][plane] = max_ ? acc : acc / static_cast<float>(inner);
        }
    }

   private:
    bool max_;
};

}  // namespace

std::unique_ptr<Op> make_nn_op(const Node& node, const PackedModel& model, const SessionOptions& options) {
    const std::string& op = node.op;
    if (node.domain == "ai.neuralmerge") {
        if (op == "EConv") return std::make_unique<EConvOp>(node, model, options);
        if (op == "EGemm") return std::make_unique<EGemmOp>(node, model, options);
        return nullptr;
    }
    if (op == "Conv") return std::make_unique<ConvOp>(node, model);
    if (op == "Gemm") return std::make_unique<GemmOp>(node, false);
    if (op == "MatMul") return std::make_unique<GemmOp>(node, true);
    if (op == "MaxPool") return std::make_unique<PoolOp>(node, true);
    if (op == "AveragePool") return std::make_unique<PoolOp>(node, false);
    if (op == "GlobalAveragePool") return std::make_unique<GlobalPoolOp>(node, false);
    if (op == "GlobalMaxPool") return std::make_unique<GlobalPoolOp>(node, true);
    return nullptr;
}

}  // namespace neuralmerge::detail
