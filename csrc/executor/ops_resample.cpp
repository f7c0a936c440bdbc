// Ops that move a tensor onto a new grid: Pad (constant, reflect and edge borders, or crops for
// negative pads) and Resize / Upsample (nearest and bilinear over H and W of NCHW).
#include <algorithm>
#include <cmath>

#include "op.h"

namespace neuralmerge::detail {
namespace {

// ---- Pad ---------------------------------------------------------------------------------

enum class PadMode { kConstant, kReflect, kEdge };

// One dimension of a pad: negative pads first crop the input (as onnxruntime does), then the
// positive ones add `before` and `after` cells around the `kept` cells starting at `first`.
struct PadAxis {
    int64_t before = 0, first = 0, kept = 0, after = 0;
    int64_t size() const { return before + kept + after; }
};

class PadOp : public Op {
   public:
    PadOp(const Node& node, int64_t opset) : Op(node), opset_(opset) {
        const std::string mode = node.attr_string("mode", "constant");
        if (mode == "constant") mode_ = PadMode::kConstant;
        else if (mode == "reflect") mode_ = PadMode::kReflect;
        else if (mode == "edge") mode_ = PadMode::kEdge;
        else fail("mode '" + mode + "' is not supported (constant, reflect or edge)");
        if (opset < 11) value_ = node.attr_float("value", 0.0f);
    }

    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo& x = float_input(in, 0);
        if (opset_ >= 11 && in.size() > 2 && in[2]) {
            const int64_t n = float_input(in, 2).numel();
            require(n <= 1, "constant_value must be a scalar, got " + std::to_string(n) + " values");
        }
        Dims out;
        for (const PadAxis& a : pad_axes(x.shape, in)) out.push_back(a.size());
        return {float_value(out)};
    }

    void run(const Infos& in, const Infos& out, RunContext& ctx) const override {
        const Dims& shape = in[0]->shape;
        const std::vector<PadAxis> axes = pad_axes(shape, in);
        float value = value_;
        if (opset_ >= 11 && in.size() > 2 && in[2] && in[2]->numel() == 1) value = ctx.in[2][0];
        const size_t rank = shape.size();
        const int64_t total = out[0]->numel();
        if (total == 0) return;
        if (rank == 0) {
            ctx.out[0][0] = ctx.in[0][0];
            return;
        }
        Dims stride(rank, 1);
        for (size_t i = rank - 1; i-- > 0;) stride[i] = stride[i + 1] * shape[i + 1];
        const PadAxis& last = axes.back();
        const int64_t width = last.size();
        Dims index(rank, 0);
        for (int64_t o = 0; o < total; o += width) {
            float* y = ctx.out[0] + o;
            // The input row this output row reads, or -1 when it lies in a constant border.
            int64_t row = 0;
            for (size_t d = 0; d + 1 < rank && row >= 0; ++d) {
                const int64_t source = source_index(index[d], axes[d]);
                row = source < 0 ? -1 : row + source * stride[d];
            }
            if (row < 0) {
                std::fill(y, y + width, value);
            } else {
                const float* x = ctx.in[0] + row;
                for (int64_t j = 0; j < width; ++j) {
                    const int64_t source = source_index(j, last);
                    y[j] = source < 0 ? value : x[source];
                }
            }
            for (size_t d = rank - 1; d-- > 0;) {  // odometer over the outer dims
                if (++index[d] < axes[d].size()) break;
                index[d] = 0;
            }
        }
    }

   private:
    // The input index that output index `i` copies along one dimension (-1: the constant).
    int64_t source_index(int64_t i, const PadAxis& a) const {
        int64_t k = i - a.before;  // relative to the kept cells
        if (k < 0 || k >= a.kept) {
            switch (mode_) {
                case PadMode::kConstant: return -1;
                case PadMode::kEdge: k = k < 0 ? 0 : a.kept - 1; break;
                case PadMode::kReflect: k = k < 0 ? -k : 2 * (a.kept - 1) - k; break;
            }
        }
        return a.first + k;
    }

    // pads: an attribute before opset 11, then input 1; from opset 18 optional axes (input 3)
    // say which dimensions the pads are for.
    std::vector<PadAxis> pad_axes(const Dims& shape, const Infos& in) const {
        const int64_t rank = static_cast<int64_t>(shape.size());
        const std::vector<int64_t> pads = opset_ >= 11 ? known_ints(in, 1) : node_.attr_ints("pads", {});
        std::vector<int64_t> axes;
        if (opset_ >= 18 && in.size() > 3 && in[3]) {
            axes = known_ints(in, 3);
        } else {
            for (int64_t d = 0; d < rank; ++d) axes.push_back(d);
        }
        const int64_t count = static_cast<int64_t>(axes.size());
        require(static_cast<int64_t>(pads.size()) == 2 * count,
                "pads has " + std::to_string(pads.size()) + " values, expected " + std::to_string(2 * count));
        std::vector<PadAxis> out(static_cast<size_t>(rank));
        for (int64_t d = 0; d < rank; ++d) out[d] = {0, 0, shape[d], 0};
        std::vector<bool> seen(static_cast<size_t>(rank), false);
        for (int64_t i = 0; i < count; ++i) {
            const int64_t axis = normalize_axis(axes[i], rank, node_), begin = pads[i], end = pads[i + count];
            require(!seen[axis], "axis " + std::to_string(axes[i]) + " is repeated");
            seen[axis] = true;
            const int64_t dim = shape[axis];
            require(begin >= -dim && end >= -dim && begin <= kMaxElements && end <= kMaxElements,
                    "pads " + std::to_string(begin) + ", " + std::to_string(end) + " are invalid for a dimension of " + std::to_string(dim));
            PadAxis& a = out[axis];
            a.first = std::max<int64_t>(-begin, 0);
            a.kept = dim - a.first - std::max<int64_t>(-end, 0);
            a.before = std::max<int64_t>(begin, 0);
            a.after = std::max<int64_t>(end, 0);
            require(a.kept >= 0, "pads " + std::to_string(begin) + ", " + std::to_string(end) + " crop more than the dimension of " + std::to_string(dim));
            if (a.before + a.after > 0 && mode_ == PadMode::kEdge) {
                require(a.kept >= 1, "edge padding needs a non-empty dimension " + std::to_string(axis));
            }
            if (a.before + a.after > 0 && mode_ == PadMode::kReflect) {
                require(a.before < a.kept && a.after < a.kept,
                        "reflect pads " + std::to_string(begin) + ", " + std::to_string(end) + " must be smaller than the dimension " +
                            std::to_string(a.kept) + " of axis " + std::to_string(axis));
            }
        }
        return out;
    }

    int64_t opset_;
    PadMode mode_ = PadMode::kConstant;
    float value_ = 0.0f;
};

// ---- Resize / Upsample -------------------------------------------------------------------

enum class Coordinates { kHalfPixel, kHalfPixelSymmetric, kPytorchHalfPixel, kAlignCorners, kAsymmetric, kTfHalfPixelForNearest };
// kSimple is the rounding of Upsample and Resize-10: floor when enlarging, ceil when shrinking.
enum class Nearest { kRoundPreferFloor, kRoundPreferCeil, kFloor, kCeil, kSimple };

// Where output index `x` of a resized axis (length `out`, scale `scale`) samples the input axis
// of length `in`. Float arithmetic in onnxruntime's order, so that rounding ties agree.
float source_coordinate(Coordinates c, float x, float scale, float out, float in) {
    switch (c) {
        case Coordinates::kHalfPixel: return (x + 0.5f) / scale - 0.5f;
        case Coordinates::kHalfPixelSymmetric: {
            const float adjustment = out / (scale * in), center = in / 2;
            return center * (1 - adjustment) + (x + 0.5f) / scale - 0.5f;
        }
        case Coordinates::kPytorchHalfPixel: return out > 1 ? (x + 0.5f) / scale - 0.5f : 0.0f;
        case Coordinates::kAlignCorners: return out == 1 ? 0.0f : x * (in - 1) / (out - 1);
        case Coordinates::kAsymmetric: return x / scale;
        case Coordinates::kTfHalfPixelForNearest: return (x + 0.5f) / scale;
    }
    return 0.0f;
}

int64_t nearest_index(Nearest mode, float x, bool shrinking) {
    switch (mode) {
        case Nearest::kRoundPreferFloor:
            return x == static_cast<float>(static_cast<int64_t>(x)) + 0.5f ? static_cast<int64_t>(std::floor(x))
                                                                           : static_cast<int64_t>(std::round(x));
        case Nearest::kRoundPreferCeil: return static_cast<int64_t>(std::round(x));
        case Nearest::kFloor: return static_cast<int64_t>(std::floor(x));
        case Nearest::kCeil: return static_cast<int64_t>(std::ceil(x));
        case Nearest::kSimple: return shrinking ? static_cast<int64_t>(std::ceil(x)) : static_cast<int64_t>(x);
    }
    return 0;
}

class ResizeOp : public Op {
   public:
    ResizeOp(const Node& node, int64_t opset) : Op(node) {
        // Upsample (opsets 7-9) and Resize-10: inputs X, scales; asymmetric coordinates.
        legacy_ = node.op == "Upsample" || opset < 11;
        scales_input_ = legacy_ ? 1 : 2;
        require(!(node.op == "Upsample" && node.has_attr("scales")), "Upsample-7 (scales as an attribute) is not supported");
        const std::string mode = node.attr_string("mode", "nearest");
        require(mode == "nearest" || mode == "linear" || (legacy_ && mode == "bilinear"),
                "mode '" + mode + "' is not supported (nearest or linear)");
        linear_ = mode != "nearest";
        if (legacy_) {
            coordinates_ = Coordinates::kAsymmetric;
            nearest_ = Nearest::kSimple;
            return;
        }
        const std::string c = node.attr_string("coordinate_transformation_mode", "half_pixel");
        if (c == "half_pixel") coordinates_ = Coordinates::kHalfPixel;
        else if (c == "half_pixel_symmetric") coordinates_ = Coordinates::kHalfPixelSymmetric;
        else if (c == "pytorch_half_pixel") coordinates_ = Coordinates::kPytorchHalfPixel;
        else if (c == "align_corners") coordinates_ = Coordinates::kAlignCorners;
        else if (c == "asymmetric") coordinates_ = Coordinates::kAsymmetric;
        else if (c == "tf_half_pixel_for_nearest" && opset < 13) coordinates_ = Coordinates::kTfHalfPixelForNearest;
        else if (c == "tf_crop_and_resize") fail("coordinate_transformation_mode 'tf_crop_and_resize' (cropping to roi) is not supported");
        else fail("coordinate_transformation_mode '" + c + "' is not supported in opset " + std::to_string(opset));
        const std::string n = node.attr_string("nearest_mode", "round_prefer_floor");
        if (n == "round_prefer_floor") nearest_ = Nearest::kRoundPreferFloor;
        else if (n == "round_prefer_ceil") nearest_ = Nearest::kRoundPreferCeil;
        else if (n == "floor") nearest_ = Nearest::kFloor;
        else if (n == "ceil") nearest_ = Nearest::kCeil;
        else fail("nearest_mode '" + n + "' is not supported");
        require(node.attr_int("antialias", 0) == 0, "antialias=1 is not supported");
        require(node.attr_int("exclude_outside", 0) == 0, "exclude_outside=1 is not supported");
        const std::string policy = node.attr_string("keep_aspect_ratio_policy", "stretch");
        require(policy == "stretch", "keep_aspect_ratio_policy '" + policy + "' is not supported (stretch only)");
        axes_ = node.attr_ints("axes", {});
    }

    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo& x = float_input(in, 0);
        require(x.shape.size() == 4 && x.shape[2] >= 1 && x.shape[3] >= 1,
                "input must be NCHW with non-empty H and W, got " + dims_text(x.shape));
        const Geometry g = geometry(x.shape, in);
        return {float_value({x.shape[0], x.shape[1], g.out_h, g.out_w})};
    }

    void run(const Infos& in, const Infos& out, RunContext& ctx) const override {
        const Dims& xs = in[0]->shape;
        const Geometry g = geometry(xs, in);
        const int64_t h = xs[2], w = xs[3], oh = out[0]->shape[2], ow = out[0]->shape[3];
        const std::vector<Tap> rows = taps(g.scale_h, oh, h), cols = taps(g.scale_w, ow, w);
        for (int64_t plane = 0; plane < xs[0] * xs[1]; ++plane) {
            const float* x = ctx.in[0] + plane * h * w;
            float* y = ctx.out[0] + plane * oh * ow;
            for (int64_t i = 0; i < oh; ++i) {
                const Tap& r = rows[i];
                const float *top = x + r.low * w, *bottom = x + r.high * w;
                for (int64_t j = 0; j < ow; ++j) {
                    const Tap& c = cols[j];
                    y[i * ow + j] = linear_ ? r.w_low * (c.w_low * top[c.low] + c.w_high * top[c.high]) +
                                                  r.w_high * (c.w_low * bottom[c.low] + c.w_high * bottom[c.high])
                                            : top[c.low];
                }
            }
        }
    }

   private:
    struct Geometry {
        float scale_h = 1.0f, scale_w = 1.0f;
        int64_t out_h = 0, out_w = 0;
    };

    // The input cells one output index reads and their weights (nearest: `low` only).
    struct Tap {
        int64_t low = 0, high = 0;
        float w_low = 1.0f, w_high = 0.0f;
    };

    std::vector<Tap> taps(float scale, int64_t out, int64_t in) const {
        std::vector<Tap> result(static_cast<size_t>(out));
        for (int64_t i = 0; i < out; ++i) {
            const float position = static_cast<float>(i);
            float x = source_coordinate(coordinates_, position, scale, static_cast<float>(out), static_cast<float>(in));
            Tap& t = result[i];
            if (!linear_) {
                t.low = std::clamp<int64_t>(nearest_index(nearest_, x, scale < 1.0f), 0, in - 1);
                continue;
            }
            // As onnxruntime: an unscaled axis reads itself; else clamp into the input and take
            // two neighbours (one cell twice at the edge).
            if (scale == 1.0f) x = position;
            x = std::max(0.0f, std::min(x, static_cast<float>(in - 1)));
            t.low = static_cast<int64_t>(x);
            t.high = std::min(t.low + 1, in - 1);
            t.w_low = std::fabs(static_cast<float>(t.high) - x);
            t.w_high = std::fabs(x - static_cast<float>(t.low));
            if (t.low == t.high) t.w_low = t.w_high = 0.5f;
        }
        return result;
    }

    // Output size and per-axis scale from `scales` (a float constant) or `sizes` (int64 known at
    // plan time); only H and W may change.
    Geometry geometry(const Dims& x, const Infos& in) const {
        Dims axes = axes_;
        if (axes.empty()) axes = {0, 1, 2, 3};
        std::vector<bool> seen(4, false);
        for (int64_t& a : axes) {
            a = normalize_axis(a, 4, node_);
            require(!seen[a], "axis " + std::to_string(a) + " is repeated in axes");
            seen[a] = true;
        }
        const size_t count = axes.size();
        std::vector<double> scale(4, 1.0);
        Dims out = x;
        const ValueInfo* scales = in.size() > scales_input_ ? in[scales_input_] : nullptr;
        const ValueInfo* sizes = !legacy_ && in.size() > 3 ? in[3] : nullptr;
        if (scales && scales->numel() == 0 && sizes) scales = nullptr;  // opsets 11-12 pass an empty tensor
        require((scales == nullptr) != (sizes == nullptr), "exactly one of scales and sizes must be given");
        if (scales) {
            require(scales->dtype == DType::kFloat32 && scales->constant,
                    "scales must be a float32 constant (an initializer)");
            require(scales->numel() == static_cast<int64_t>(count),
                    "scales has " + std::to_string(scales->numel()) + " values for " + std::to_string(count) + " axes");
            for (size_t i = 0; i < count; ++i) {
                const float s = scales->constant[i];
                require(s > 0.0f && std::isfinite(s), "scale " + std::to_string(s) + " must be positive and finite");
                // onnxruntime truncates the float product: floor for positive sizes.
                const double size = static_cast<double>(s * static_cast<float>(x[axes[i]]));
                require(size >= 1.0 && size <= static_cast<double>(kMaxElements),
                        "scale " + std::to_string(s) + " gives an empty or too large output on axis " + std::to_string(axes[i]));
                scale[axes[i]] = s;
                out[axes[i]] = static_cast<int64_t>(size);
            }
        } else {
            const std::vector<int64_t>& values = known_ints(in, 3);
            require(values.size() == count, "sizes has " + std::to_string(values.size()) + " values for " + std::to_string(count) + " axes");
            for (size_t i = 0; i < count; ++i) {
                require(values[i] >= 1 && values[i] <= kMaxElements, "size " + std::to_string(values[i]) + " is empty or too large");
                out[axes[i]] = values[i];
                scale[axes[i]] = static_cast<double>(static_cast<float>(values[i]) / static_cast<float>(x[axes[i]]));
            }
        }
        require(out[0] == x[0] && out[1] == x[1], "only H and W may be resized, not N or C (" + dims_text(x) + " to " + dims_text(out) + ")");
        return {static_cast<float>(scale[2]), static_cast<float>(scale[3]), out[2], out[3]};
    }

    bool legacy_ = false, linear_ = false;
    size_t scales_input_ = 2;
    Coordinates coordinates_ = Coordinates::kHalfPixel;
    Nearest nearest_ = Nearest::kRoundPreferFloor;
    Dims axes_;
};

}  // namespace

std::unique_ptr<Op> make_resample_op(const Node& node, const PackedModel& model) {
    const std::string& op = node.op;
    if (op == "Pad") return std::make_unique<PadOp>(node, model.opset);
    if (op == "Resize" || op == "Upsample") return std::make_unique<ResizeOp>(node, model.opset);
    return nullptr;
}

}  // namespace neuralmerge::detail
