// Reductions over float tensors: ReduceMean, ReduceMax, ReduceMin, ReduceSum (SE blocks, and
// global pooling written as x.mean([2, 3])).
#include <algorithm>
#include <cmath>

#include "op.h"

namespace neuralmerge::detail {
namespace {

enum class ReduceKind { kMean, kMax, kMin, kSum };

class ReduceOp : public Op {
   public:
    ReduceOp(const Node& node, ReduceKind kind, int64_t opset)
        : Op(node),
          kind_(kind),
          // ReduceSum took axes as an input from opset 13, the others from opset 18.
          axes_as_input_(opset >= (kind == ReduceKind::kSum ? 13 : 18)),
          keepdims_(node.attr_int("keepdims", 1) != 0),
          noop_with_empty_axes_(node.attr_int("noop_with_empty_axes", 0) != 0) {
        require(!axes_as_input_ || !node.has_attr("axes"), "axes must be an input, not an attribute, in this opset");
    }

    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo& x = float_input(in, 0);
        const std::vector<bool> reduced = reduced_axes(x.shape, in);
        Dims out;
        for (size_t d = 0; d < x.shape.size(); ++d) {
            if (!reduced[d]) out.push_back(x.shape[d]);
            else if (keepdims_) out.push_back(1);
        }
        return {float_value(out)};
    }

    void run(const Infos& in, const Infos& out, RunContext& ctx) const override {
        const Dims& shape = in[0]->shape;
        const std::vector<bool> reduced = reduced_axes(shape, in);
        const float start = kind_ == ReduceKind::kMax ? -INFINITY : kind_ == ReduceKind::kMin ? INFINITY : 0.0f;
        float* y = ctx.out[0];
        const int64_t out_count = out[0]->numel();
        std::fill(y, y + out_count, start);
        const int64_t total = in[0]->numel();
        if (total > 0) {
            switch (kind_) {
                case ReduceKind::kMax: accumulate(ctx.in[0], shape, reduced, y, [](float a, float b) { return std::max(a, b); }); break;
                case ReduceKind::kMin: accumulate(ctx.in[0], shape, reduced, y, [](float a, float b) { return std::min(a, b); }); break;
                case ReduceKind::kSum:
                case ReduceKind::kMean: accumulate(ctx.in[0], shape, reduced, y, [](float a, float b) { return a + b; }); break;
            }
        }
        if (kind_ == ReduceKind::kMean) {
            // An empty reduction is 0 / 0 = NaN, as in onnxruntime.
            const float count = out_count ? static_cast<float>(total / out_count) : 0.0f;
            for (int64_t i = 0; i < out_count; ++i) y[i] /= count;
        }
    }

   private:
    // Which dimensions of `shape` are reduced: axes (an attribute or input 1), every dimension
    // when axes are empty, or none with noop_with_empty_axes.
    std::vector<bool> reduced_axes(const Dims& shape, const Infos& in) const {
        const int64_t rank = static_cast<int64_t>(shape.size());
        std::vector<int64_t> axes;
        if (axes_as_input_) {
            if (in.size() > 1 && in[1]) axes = known_ints(in, 1);
        } else {
            axes = node_.attr_ints("axes", {});
        }
        std::vector<bool> reduced(static_cast<size_t>(rank), axes.empty() && !noop_with_empty_axes_);
        for (int64_t a : axes) {
            const int64_t axis = normalize_axis(a, rank, node_);
            require(!reduced[axis], "axis " + std::to_string(a) + " is repeated");
            reduced[axis] = true;
        }
        return reduced;
    }

    // y[kept index] = f(y[kept index], x[index]) over every element of x. Neighbouring dims that
    // are both kept or both reduced are merged first, so reducing [N, C, H, W] over H and W is
    // one contiguous run per output.
    template <typename F>
    static void accumulate(const float* x, const Dims& shape, const std::vector<bool>& reduced, float* y, F f) {
        Dims extent;
        std::vector<bool> merged_reduced;
        for (size_t d = 0; d < shape.size(); ++d) {
            if (shape[d] == 1) continue;
            if (!extent.empty() && merged_reduced.back() == reduced[d]) {
                extent.back() *= shape[d];
            } else {
                extent.push_back(shape[d]);
                merged_reduced.push_back(reduced[d]);
            }
        }
        if (extent.empty()) {
            y[0] = f(y[0], x[0]);
            return;
        }
        const size_t rank = extent.size();
        Dims y_stride(rank, 0);  // 0 on reduced dims
        int64_t stride = 1;
        for (size_t d = rank; d-- > 0;) {
            if (merged_reduced[d]) continue;
            y_stride[d] = stride;
            stride *= extent[d];
        }
        const int64_t inner = extent.back(), total = numel(extent);
        Dims index(rank, 0);
        int64_t y_offset = 0;
        for (int64_t i = 0; i < total; i += inner) {
            const float* row = x + i;
            if (merged_reduced.back()) {
                float acc = y[y_offset];
                for (int64_t j = 0; j < inner; ++j) acc = f(acc, row[j]);
                y[y_offset] = acc;
            } else {
                float* out = y + y_offset;
                for (int64_t j = 0; j < inner; ++j) out[j] = f(out[j], row[j]);
            }
            for (size_t d = rank - 1; d-- > 0;) {  // odometer over the outer dims
                y_offset += y_stride[d];
                if (++index[d] < extent[d]) break;
                y_offset -= y_stride[d] * extent[d];
                index[d] = 0;
            }
        }
    }

    ReduceKind kind_;
    bool axes_as_input_, keepdims_, noop_with_empty_axes_;
};

}  // namespace

std::unique_ptr<Op> make_reduce_op(const Node& node, const PackedModel& model) {
    const std::string& op = node.op;
    if (op == "ReduceMean") return std::make_unique<ReduceOp>(node, ReduceKind::kMean, model.opset);
    if (op == "ReduceMax") return std::make_unique<ReduceOp>(node, ReduceKind::kMax, model.opset);
    if (op == "ReduceMin") return std::make_unique<ReduceOp>(node, ReduceKind::kMin, model.opset);
    if (op == "ReduceSum") return std::make_unique<ReduceOp>(node, ReduceKind::kSum, model.opset);
    return nullptr;
}

}  // namespace neuralmerge::detail
