// Elementwise ops: activations and pointwise math, Add/Sub/Mul/Div and PRelu with numpy
// broadcasting, variadic Sum/Max/Min/Mean, BatchNormalization (a per-channel affine) and Softmax.
#include <algorithm>
#include <cmath>
#include <functional>

#include "op.h"

namespace neuralmerge::detail {
namespace {

// ---- Unary activations -------------------------------------------------------------------

class UnaryOp : public Op {
   public:
    using Fn = std::function<void(const float*, float*, int64_t)>;
    UnaryOp(const Node& node, Fn fn) : Op(node), fn_(std::move(fn)) {}
    std::vector<ValueInfo> infer(const Infos& in) const override { return {float_value(float_input(in, 0).shape)}; }
    void run(const Infos& in, const Infos&, RunContext& ctx) const override { fn_(ctx.in[0], ctx.out[0], in[0]->numel()); }
    Sharing sharing() const override { return Sharing::kInPlace; }

   private:
    Fn fn_;
};

template <typename F>
UnaryOp::Fn pointwise(F f) {
    return [f](const float* x, float* y, int64_t n) {
        for (int64_t i = 0; i < n; ++i) y[i] = f(x[i]);
    };
}

// log(1 + e^x) without overflow for large x.
float softplus(float x) { return x > 0.0f ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x)); }

// Clip bounds: attributes before opset 11, optional constant scalar inputs from opset 11 on.
std::pair<float, float> clip_bounds(const Node& node, const PackedModel& model) {
    float low = -INFINITY, high = INFINITY;
    if (model.opset < 11) {
        return {node.attr_float("min", low), node.attr_float("max", high)};
    }
    for (size_t i = 1; i < 3 && i < node.inputs.size(); ++i) {
        if (node.inputs[i].empty()) continue;
        const auto it = model.constants.find(node.inputs[i]);
        if (it == model.constants.end() || it->second.dtype != DType::kFloat32 || it->second.numel != 1) {
            model_error(node.where() + ": min and max must be float32 scalar constants");
        }
        (i == 1 ? low : high) = *static_cast<const float*>(it->second.data);
    }
    return {low, high};
}

// ---- Binary ops with broadcasting --------------------------------------------------------

enum class BinaryKind { kAdd, kSub, kMul, kDiv };

Dims broadcast_shape(const Dims& a, const Dims& b, const Node& node) {
    const size_t rank = std::max(a.size(), b.size());
    Dims out(rank);
    for (size_t i = 0; i < rank; ++i) {
        const int64_t da = i + a.size() >= rank ? a[i + a.size() - rank] : 1;
        const int64_t db = i + b.size() >= rank ? b[i + b.size() - rank] : 1;
        if (da != db && da != 1 && db != 1) {
            model_error(node.where() + ": shapes " + dims_text(a) + " and " + dims_text(b) + " do not broadcast");
        }
        out[i] = da == 1 ? db : da;
    }
    return out;
}

// Strides (in elements) of `shape` read as `out_shape` under broadcasting; 0 on broadcast dims.
Dims broadcast_strides(const Dims& shape, const Dims& out_shape) {
    Dims strides(out_shape.size(), 0);
    int64_t stride = 1;
    for (size_t k = 0; k < shape.size(); ++k) {
        const size_t i = shape.size() - 1 - k, o = out_shape.size() - 1 - k;
        strides[o] = shape[i] == 1 ? 0 : stride;
        stride *= shape[i];
    }
    return strides;
}

template <typename T, typename F>
void broadcast_apply(const T* a, const Dims& a_shape, const T* b, const Dims& b_shape, T* out, const Dims& out_shape,
                     F f) {
    const int64_t total = numel(out_shape);
    if (total == 0) return;
    if (a_shape == out_shape && b_shape == out_shape) {
        for (int64_t i = 0; i < total; ++i) out[i] = f(a[i], b[i]);
        return;
    }
    // Merge neighbouring dims whose broadcast pattern is the same for both inputs: a per-channel
    // [1,C,1,1] operand of an [N,C,H,W] tensor becomes [N,C,H*W] with a long contiguous inner run.
    Dims sa = broadcast_strides(a_shape, out_shape), sb = broadcast_strides(b_shape, out_shape), extent = out_shape;
    Dims ca, cb, ce;
    for (size_t i = 0; i < extent.size(); ++i) {
        if (extent[i] == 1) continue;
        if (!ce.empty() && sa[i] * extent[i] == ca.back() && sb[i] * extent[i] == cb.back()) {
            ce.back() *= extent[i];
            ca.back() = sa[i];
            cb.back() = sb[i];
        } else {
            ce.push_back(extent[i]);
            ca.push_back(sa[i]);
            cb.push_back(sb[i]);
        }
    }
    if (ce.empty()) {
        out[0] = f(a[0], b[0]);
        return;
    }
    const size_t rank = ce.size();
    const int64_t inner = ce.back(), ia = ca.back(), ib = cb.back();
    Dims index(rank, 0);
    int64_t offset_a = 0, offset_b = 0;
    for (int64_t o = 0; o < total; o += inner) {
        for (int64_t j = 0; j < inner; ++j) out[o + j] = f(a[offset_a + j * ia], b[offset_b + j * ib]);
        for (size_t d = rank - 1; d-- > 0;) {  // odometer over the outer dims
            ++index[d];
            offset_a += ca[d];
            offset_b += cb[d];
            if (index[d] < ce[d]) break;
            offset_a -= ca[d] * ce[d];
            offset_b -= cb[d] * ce[d];
            index[d] = 0;
        }
    }
}

class BinaryOp : public Op {
   public:
    BinaryOp(const Node& node, BinaryKind kind) : Op(node), kind_(kind) {}

    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo &a = input(in, 0), &b = input(in, 1);
        const Dims shape = broadcast_shape(a.shape, b.shape, node_);
        if (a.dtype == DType::kInt64 && b.dtype == DType::kInt64) {  // shape arithmetic
            const std::vector<int64_t>&ia = known_ints(in, 0), &ib = known_ints(in, 1);
            std::vector<int64_t> out(static_cast<size_t>(known_numel(shape, node_.where())));
            // The operands come from the file: an overflow is an error, not a wrapped shape.
            bool divided_by_zero = false, overflowed = false;
            broadcast_apply(ia.data(), a.shape, ib.data(), b.shape, out.data(), shape, [&](int64_t x, int64_t y) {
                int64_t z = 0;
                switch (kind_) {
                    case BinaryKind::kAdd: overflowed |= __builtin_add_overflow(x, y, &z); break;
                    case BinaryKind::kSub: overflowed |= __builtin_sub_overflow(x, y, &z); break;
                    case BinaryKind::kMul: overflowed |= __builtin_mul_overflow(x, y, &z); break;
                    case BinaryKind::kDiv:
                        if (y == 0) {
                            divided_by_zero = true;
                        } else if (y == -1) {  // INT64_MIN / -1 overflows (and traps on x86)
                            overflowed |= __builtin_sub_overflow(int64_t{0}, x, &z);
                        } else {
                            z = x / y;
                        }
                        break;
                }
                return z;
            });
            require(!divided_by_zero, "integer division by zero");
            require(!overflowed, "integer overflow in shape arithmetic");
            return {known_value(shape, std::move(out))};
        }
        float_input(in, 0);
        float_input(in, 1);
        return {float_value(shape)};
    }

    void run(const Infos& in, const Infos& out, RunContext& ctx) const override {
        const Dims &sa = in[0]->shape, &sb = in[1]->shape, &so = out[0]->shape;
        switch (kind_) {
            case BinaryKind::kAdd: broadcast_apply(ctx.in[0], sa, ctx.in[1], sb, ctx.out[0], so, std::plus<float>()); break;
            case BinaryKind::kSub: broadcast_apply(ctx.in[0], sa, ctx.in[1], sb, ctx.out[0], so, std::minus<float>()); break;
            case BinaryKind::kMul: broadcast_apply(ctx.in[0], sa, ctx.in[1], sb, ctx.out[0], so, std::multiplies<float>()); break;
            case BinaryKind::kDiv: broadcast_apply(ctx.in[0], sa, ctx.in[1], sb, ctx.out[0], so, std::divides<float>()); break;
        }
    }

    Sharing sharing() const override { return Sharing::kInPlace; }  // out[i] reads a[i] only

   private:
    BinaryKind kind_;
};

// ---- PRelu: y = x < 0 ? slope * x : x, slope broadcast to x (unidirectionally) ---------

class PReluOp : public Op {
   public:
    explicit PReluOp(const Node& node) : Op(node) {}

    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo &x = float_input(in, 0), &slope = float_input(in, 1);
        require(broadcast_shape(x.shape, slope.shape, node_) == x.shape,
                "slope " + dims_text(slope.shape) + " does not broadcast to the input " + dims_text(x.shape));
        return {float_value(x.shape)};
    }

    void run(const Infos& in, const Infos& out, RunContext& ctx) const override {
        broadcast_apply(ctx.in[0], in[0]->shape, ctx.in[1], in[1]->shape, ctx.out[0], out[0]->shape,
                        [](float x, float slope) { return x < 0.0f ? slope * x : x; });
    }

    Sharing sharing() const override { return Sharing::kInPlace; }
};

// ---- Variadic Sum / Max / Min / Mean with broadcasting ------------------------------------

enum class VariadicKind { kSum, kMax, kMin, kMean };

class VariadicOp : public Op {
   public:
    VariadicOp(const Node& node, VariadicKind kind) : Op(node), kind_(kind) {}

    std::vector<ValueInfo> infer(const Infos& in) const override {
        require(!in.empty(), "needs at least one input");
        Dims shape = float_input(in, 0).shape;
        for (size_t i = 1; i < in.size(); ++i) shape = broadcast_shape(shape, float_input(in, i).shape, node_);
        return {float_value(shape)};
    }

    // Output = input 0 broadcast to the output shape, then folded with each further input in place
    // (out[i] reads out[i] only, so input 0 may share the output's memory).
    void run(const Infos& in, const Infos& out, RunContext& ctx) const override {
        const Dims& shape = out[0]->shape;
        broadcast_apply(ctx.in[0], in[0]->shape, ctx.in[0], in[0]->shape, ctx.out[0], shape,
                        [](float a, float) { return a; });
        for (size_t i = 1; i < in.size(); ++i) {
            const float* x = ctx.in[i];
            switch (kind_) {
                case VariadicKind::kSum:
                case VariadicKind::kMean:
                    broadcast_apply(ctx.out[0], shape, x, in[i]->shape, ctx.out[0], shape, std::plus<float>());
                    break;
                case VariadicKind::kMax:
                    broadcast_apply(ctx.out[0], shape, x, in[i]->shape, ctx.out[0], shape,
                                    [](float a, float b) { return std::max(a, b); });
                    break;
                case VariadicKind::kMin:
                    broadcast_apply(ctx.out[0], shape, x, in[i]->shape, ctx.out[0], shape,
                                    [](float a, float b) { return std::min(a, b); });
                    break;
            }
        }
        if (kind_ == VariadicKind::kMean) {
            const float count = static_cast<float>(in.size());
            for (int64_t i = 0, n = out[0]->numel(); i < n; ++i) ctx.out[0][i] /= count;
        }
    }

    Sharing sharing() const override { return Sharing::kInPlace; }

   private:
    VariadicKind kind_;
};

// ---- BatchNormalization as y = x * scale[c] + shift[c] ----------------------------------

class BatchNormOp : public Op {
   public:
    BatchNormOp(const Node& node, const PackedModel& model) : Op(node) {
        require(node.attr_int("training_mode", 0) == 0, "training_mode is not supported");
        for (size_t i = 1; i < node.outputs.size(); ++i) require(node.outputs[i].empty(), "only output 0 is supported");
        const Constant& gamma = constant_input(model, 1);
        const int64_t channels = gamma.numel;
        const Constant &beta = constant_input(model, 2, channels), &mean = constant_input(model, 3, channels),
                       &var = constant_input(model, 4, channels);
        const float epsilon = node.attr_float("epsilon", 1e-5f);
        scale_.resize(channels);
        shift_.resize(channels);
        for (int64_t c = 0; c < channels; ++c) {
            const auto at = [c](const Constant& t) { return static_cast<const float*>(t.data)[c]; };
            scale_[c] = at(gamma) / std::sqrt(at(var) + epsilon);
            shift_[c] = at(beta) - at(mean) * scale_[c];
        }
    }

    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo& x = float_input(in, 0);
        require(x.shape.size() >= 2 && x.shape[1] == static_cast<int64_t>(scale_.size()),
                "input " + dims_text(x.shape) + " does not have " + std::to_string(scale_.size()) + " channels");
        return {float_value(x.shape)};
    }

    void run(const Infos& in, const Infos&, RunContext& ctx) const override {
        const Dims& s = in[0]->shape;
        const int64_t inner = numel(Dims(s.begin() + 2, s.end())), channels = s[1];
        for (int64_t n = 0; n < s[0]; ++n) {
            for (int64_t c = 0; c < channels; ++c) {
                const float* x = ctx.in[0] + (n * channels + c) * inner;
                float* y = ctx.out[0] + (n * channels + c) * inner;
                for (int64_t i = 0; i < inner; ++i) y[i] = x[i] * scale_[c] + shift_[c];
            }
        }
    }

    Sharing sharing() const override { return Sharing::kInPlace; }

   private:
    std::vector<float> scale_, shift_;
};

// ---- Softmax -----------------------------------------------------------------------------

class SoftmaxOp : public Op {
   public:
    SoftmaxOp(const Node& node, int64_t opset)
        : Op(node), axis_(node.attr_int("axis", opset >= 13 ? -1 : 1)), flatten_(opset < 13) {}

    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo& x = float_input(in, 0);
        normalize_axis(axis_, static_cast<int64_t>(x.shape.size()), node_);
        return {float_value(x.shape)};
    }

    void run(const Infos& in, const Infos&, RunContext& ctx) const override {
        const Dims& s = in[0]->shape;
        const int64_t axis = normalize_axis(axis_, static_cast<int64_t>(s.size()), node_);
        const int64_t outer = numel(Dims(s.begin(), s.begin() + axis));
        // Before opset 13 the input is coerced to 2-D at `axis`; from 13 on one axis is normalised.
        const int64_t length = flatten_ ? numel(Dims(s.begin() + axis, s.end())) : s[axis];
        const int64_t inner = flatten_ ? 1 : numel(Dims(s.begin() + axis + 1, s.end()));
        for (int64_t o = 0; o < outer; ++o) {
            for (int64_t i = 0; i < inner; ++i) {
                const float* x = ctx.in[0] + o * length * inner + i;
                float* y = ctx.out[0] + o * length * inner + i;
                float peak = -INFINITY;
                for (int64_t k = 0; k < length; ++k) peak = std::max(peak, x[k * inner]);
                float sum = 0.0f;
                for (int64_t k = 0; k < length; ++k) sum += (y[k * inner] = std::exp(x[k * inner] - peak));
                for (int64_t k = 0; k < length; ++k) y[k * inner] /= sum;
            }
        }
    }

    Sharing sharing() const override { return Sharing::kInPlace; }

   private:
    int64_t axis_;
    bool flatten_;
};

}  // namespace

std::unique_ptr<Op> make_elementwise_op(const Node& node, const PackedModel& model) {
    const std::string& op = node.op;
    if (op == "Relu") return std::make_unique<UnaryOp>(node, pointwise([](float x) { return x > 0.0f ? x : 0.0f; }));
    if (op == "LeakyRelu") {
        const float alpha = node.attr_float("alpha", 0.01f);
        return std::make_unique<UnaryOp>(node, pointwise([alpha](float x) { return x >= 0.0f ? x : alpha * x; }));
    }
    if (op == "Clip") {
        const auto [low, high] = clip_bounds(node, model);
        return std::make_unique<UnaryOp>(node, pointwise([low = low, high = high](float x) {
            return std::min(std::max(x, low), high);
        }));
    }
    if (op == "Sigmoid") return std::make_unique<UnaryOp>(node, pointwise([](float x) { return 1.0f / (1.0f + std::exp(-x)); }));
    if (op == "Tanh") return std::make_unique<UnaryOp>(node, pointwise([](float x) { return std::tanh(x); }));
    if (op == "HardSigmoid") {
        const float alpha = node.attr_float("alpha", 0.2f), beta = node.attr_float("beta", 0.5f);
        return std::make_unique<UnaryOp>(node, pointwise([alpha, beta](float x) {
            return std::min(std::max(alpha * x + beta, 0.0f), 1.0f);
        }));
    }
    if (op == "HardSwish") {
        return std::make_unique<UnaryOp>(node, pointwise([](float x) {
            return x * std::min(std::max(x / 6.0f + 0.5f, 0.0f), 1.0f);
        }));
    }
    if (op == "Exp") return std::make_unique<UnaryOp>(node, pointwise([](float x) { return std::exp(x); }));
    if (op == "Log") return std::make_unique<UnaryOp>(node, pointwise([](float x) { return std::log(x); }));
    if (op == "Sqrt") return std::make_unique<UnaryOp>(node, pointwise([](float x) { return std::sqrt(x); }));
    if (op == "Abs") return std::make_unique<UnaryOp>(node, pointwise([](float x) { return std::fabs(x); }));
    if (op == "Neg") return std::make_unique<UnaryOp>(node, pointwise([](float x) { return -x; }));
    if (op == "Reciprocal") return std::make_unique<UnaryOp>(node, pointwise([](float x) { return 1.0f / x; }));
    if (op == "Floor") return std::make_unique<UnaryOp>(node, pointwise([](float x) { return std::floor(x); }));
    if (op == "Ceil") return std::make_unique<UnaryOp>(node, pointwise([](float x) { return std::ceil(x); }));
    // Round is half-to-even; nearbyint rounds so in the default floating-point environment.
    if (op == "Round") return std::make_unique<UnaryOp>(node, pointwise([](float x) { return std::nearbyint(x); }));
    if (op == "Erf") return std::make_unique<UnaryOp>(node, pointwise([](float x) { return std::erf(x); }));
    if (op == "Softplus") return std::make_unique<UnaryOp>(node, pointwise(softplus));
    if (op == "Mish") return std::make_unique<UnaryOp>(node, pointwise([](float x) { return x * std::tanh(softplus(x)); }));
    if (op == "Elu") {
        const float alpha = node.attr_float("alpha", 1.0f);
        return std::make_unique<UnaryOp>(node, pointwise([alpha](float x) { return x >= 0.0f ? x : alpha * std::expm1(x); }));
    }
    if (op == "Selu") {
        const float alpha = node.attr_float("alpha", 1.67326319217681884765625f);
        const float gamma = node.attr_float("gamma", 1.05070102214813232421875f);
        return std::make_unique<UnaryOp>(node, pointwise([alpha, gamma](float x) {
            return gamma * (x > 0.0f ? x : alpha * (std::exp(x) - 1.0f));
        }));
    }
    if (op == "Gelu") {
        const std::string approximate = node.attr_string("approximate", "none");
        if (approximate == "tanh") {
            return std::make_unique<UnaryOp>(node, pointwise([](float x) {
                constexpr float kSqrt2OverPi = 0.7978845608028654f;
                return 0.5f * x * (1.0f + std::tanh(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
            }));
        }
        if (approximate != "none") model_error(node.where() + ": approximate '" + approximate + "' is not one of none, tanh");
        return std::make_unique<UnaryOp>(node, pointwise([](float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f)); }));
    }
    if (op == "PRelu") return std::make_unique<PReluOp>(node);
    if (op == "Sum") return std::make_unique<VariadicOp>(node, VariadicKind::kSum);
    if (op == "Max") return std::make_unique<VariadicOp>(node, VariadicKind::kMax);
    if (op == "Min") return std::make_unique<VariadicOp>(node, VariadicKind::kMin);
    if (op == "Mean") return std::make_unique<VariadicOp>(node, VariadicKind::kMean);
    if (op == "Add") return std::make_unique<BinaryOp>(node, BinaryKind::kAdd);
    if (op == "Sub") return std::make_unique<BinaryOp>(node, BinaryKind::kSub);
    if (op == "Mul") return std::make_unique<BinaryOp>(node, BinaryKind::kMul);
    if (op == "Div") return std::make_unique<BinaryOp>(node, BinaryKind::kDiv);
    if (op == "BatchNormalization") return std::make_unique<BatchNormOp>(node, model);
    if (op == "Softmax") return std::make_unique<SoftmaxOp>(node, model.opset);
    return nullptr;
}

}  // namespace neuralmerge::detail
