// Layout ops: views (Reshape, Flatten, Squeeze, Unsqueeze, Identity, Dropout), Transpose, Concat,
// Slice, Split, and the integer shape arithmetic of exported graphs (Shape, Gather, Slice, Cast),
// which is computed at plan time so that a Shape -> Gather -> Concat -> Reshape chain follows the
// batch size.
#include <algorithm>
#include <cstring>

#include "op.h"

namespace neuralmerge::detail {
namespace {

// ---- Views -------------------------------------------------------------------------------

enum class ViewKind { kReshape, kFlatten, kSqueeze, kUnsqueeze, kIdentity };

class ViewOp : public Op {
   public:
    ViewOp(const Node& node, ViewKind kind, int64_t opset) : Op(node), kind_(kind), opset_(opset) {
        for (size_t i = 1; i < node.outputs.size(); ++i) require(node.outputs[i].empty(), "only output 0 is supported");
    }

    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo& x = input(in, 0);
        ValueInfo out = x;  // dtype, known values and constant data carry over unchanged
        out.shape = shape_of(x.shape, in);
        require(numel(out.shape) == x.numel(), "cannot view " + dims_text(x.shape) + " as " + dims_text(out.shape));
        checked_numel(out.shape, node_.where());
        return {out};
    }

    void run(const Infos&, const Infos&, RunContext&) const override {}  // the output is input 0's memory
    Sharing sharing() const override { return Sharing::kView; }

   private:
    std::vector<int64_t> axes(const Infos& in) const {
        if (opset_ >= 13) return in.size() > 1 && in[1] ? known_ints(in, 1) : std::vector<int64_t>{};
        return node_.attr_ints("axes", {});
    }

    Dims shape_of(const Dims& x, const Infos& in) const {
        const int64_t rank = static_cast<int64_t>(x.size());
        switch (kind_) {
            case ViewKind::kIdentity: return x;
            case ViewKind::kFlatten: {
                const int64_t axis = normalize_axis(node_.attr_int("axis", 1), rank, node_, 1);
                return {numel(Dims(x.begin(), x.begin() + axis)), numel(Dims(x.begin() + axis, x.end()))};
            }
            case ViewKind::kReshape: {
                const std::vector<int64_t>& target = known_ints(in, 1);
                // allowzero=1 (torch's dynamo exporter writes it on every view) differs only where
                // the target holds a 0: a literal empty dimension, which this runtime has no use for.
                require(node_.attr_int("allowzero", 0) == 0 || std::find(target.begin(), target.end(), 0) == target.end(),
                        "allowzero=1 with a 0 in the target shape (an empty tensor) is not supported");
                Dims out(target.begin(), target.end());
                int64_t infer_at = -1, known = 1;
                for (size_t i = 0; i < out.size(); ++i) {
                    if (out[i] == 0) {
                        require(i < x.size(), "shape entry 0 at position " + std::to_string(i) + " has no input dimension to copy");
                        out[i] = x[i];
                    } else if (out[i] == -1) {
                        require(infer_at < 0, "more than one -1 in the target shape");
                        infer_at = static_cast<int64_t>(i);
                        continue;
                    }
                    require(out[i] >= 0 && out[i] <= kMaxElements, "invalid target dimension " + std::to_string(out[i]));
                    known *= out[i];
                    require(known <= kMaxElements, "target shape is too large");
                }
                if (infer_at >= 0) {
                    require(known > 0 && numel(x) % known == 0, "cannot infer -1 reshaping " + dims_text(x) + " to " + dims_text(Dims(target.begin(), target.end())));
                    out[infer_at] = numel(x) / known;
                }
                return out;
            }
            case ViewKind::kSqueeze: {
                const std::vector<int64_t> list = axes(in);
                Dims out;
                std::vector<bool> drop(x.size(), list.empty());
                if (list.empty()) {
                    for (size_t i = 0; i < x.size(); ++i) drop[i] = x[i] == 1;
                }
                for (int64_t a : list) {
                    const int64_t axis = normalize_axis(a, rank, node_);
                    require(x[axis] == 1, "cannot squeeze dimension " + std::to_string(axis) + " of " + dims_text(x));
                    drop[axis] = true;
                }
                for (size_t i = 0; i < x.size(); ++i) {
                    if (!drop[i]) out.push_back(x[i]);
                }
                return out;
            }
            case ViewKind::kUnsqueeze: {
                const std::vector<int64_t> list = axes(in);
                const int64_t out_rank = rank + static_cast<int64_t>(list.size());
                require(out_rank <= kMaxRank, "result rank is too large");
                std::vector<bool> inserted(out_rank, false);
                for (int64_t a : list) {
                    const int64_t axis = normalize_axis(a, out_rank, node_);
                    require(!inserted[axis], "repeated axis " + std::to_string(a));
                    inserted[axis] = true;
                }
                Dims out;
                size_t next = 0;
                for (int64_t i = 0; i < out_rank; ++i) out.push_back(inserted[i] ? 1 : x[next++]);
                return out;
            }
        }
        return x;
    }

    ViewKind kind_;
    int64_t opset_;
};

// ---- Transpose ---------------------------------------------------------------------------

class TransposeOp : public Op {
   public:
    explicit TransposeOp(const Node& node) : Op(node), perm_(node.attr_ints("perm", {})) {}

    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo& x = float_input(in, 0);
        const Dims p = perm(x.shape.size());
        Dims out;
        for (int64_t a : p) out.push_back(x.shape[a]);
        return {float_value(out)};
    }

    void run(const Infos& in, const Infos& out, RunContext& ctx) const override {
        const Dims& xs = in[0]->shape;
        const Dims p = perm(xs.size());
        const size_t rank = xs.size();
        if (in[0]->numel() == 0) return;
        if (rank == 0) {  // a scalar is its own transpose
            ctx.out[0][0] = ctx.in[0][0];
            return;
        }
        Dims in_stride(rank, 1);
        for (size_t i = rank - 1; i-- > 0;) in_stride[i] = in_stride[i + 1] * xs[i + 1];
        const Dims& ys = out[0]->shape;
        Dims stride(rank);  // input stride of each output dimension
        for (size_t i = 0; i < rank; ++i) stride[i] = in_stride[p[i]];
        Dims index(rank, 0);
        int64_t offset = 0;
        const int64_t total = out[0]->numel();
        for (int64_t o = 0; o < total; ++o) {
            ctx.out[0][o] = ctx.in[0][offset];
            for (size_t d = rank; d-- > 0;) {
                offset += stride[d];
                if (++index[d] < ys[d]) break;
                offset -= stride[d] * ys[d];
                index[d] = 0;
            }
        }
    }

   private:
    Dims perm(size_t rank) const {
        Dims p = perm_;
        if (p.empty()) {
            for (size_t i = rank; i-- > 0;) p.push_back(static_cast<int64_t>(i));
        }
        require(p.size() == rank, "perm has " + std::to_string(p.size()) + " entries for rank " + std::to_string(rank));
        std::vector<bool> seen(rank, false);
        for (int64_t a : p) {
            require(a >= 0 && a < static_cast<int64_t>(rank) && !seen[a], "perm " + dims_text(p) + " is not a permutation");
            seen[a] = true;
        }
        return p;
    }

    Dims perm_;
};

// ---- Concat (float at run time, or shape integers at plan time) --------------------------

template <typename T>
void concat(const std::vector<const T*>& parts, const std::vector<Dims>& shapes, int64_t axis, T* out) {
    const int64_t outer = numel(Dims(shapes[0].begin(), shapes[0].begin() + axis));
    for (int64_t o = 0; o < outer; ++o) {
        for (size_t i = 0; i < parts.size(); ++i) {
            const int64_t chunk = numel(Dims(shapes[i].begin() + axis, shapes[i].end()));
            std::copy(parts[i] + o * chunk, parts[i] + (o + 1) * chunk, out);
            out += chunk;
        }
    }
}

class ConcatOp : public Op {
   public:
    explicit ConcatOp(const Node& node) : Op(node), axis_(node.attr_int("axis", 0)) {}

    std::vector<ValueInfo> infer(const Infos& in) const override {
        require(!in.empty(), "needs at least one input");
        const ValueInfo& first = input(in, 0);
        const int64_t rank = static_cast<int64_t>(first.shape.size());
        const int64_t axis = normalize_axis(axis_, rank, node_);
        Dims out = first.shape;
        out[axis] = 0;
        for (size_t i = 0; i < in.size(); ++i) {
            const ValueInfo& v = input(in, i);
            require(v.dtype == first.dtype, "inputs have different dtypes");
            require(static_cast<int64_t>(v.shape.size()) == rank, "inputs have different ranks");
            for (int64_t d = 0; d < rank; ++d) {
                require(d == axis || v.shape[d] == first.shape[d], "input shapes " + dims_text(first.shape) + " and " + dims_text(v.shape) + " differ off the axis");
            }
            out[axis] += v.shape[axis];
        }
        if (first.dtype == DType::kFloat32) return {float_value(out)};
        std::vector<const int64_t*> parts;
        std::vector<Dims> shapes;
        for (size_t i = 0; i < in.size(); ++i) {
            parts.push_back(known_ints(in, i).data());
            shapes.push_back(in[i]->shape);
        }
        std::vector<int64_t> values(static_cast<size_t>(known_numel(out, node_.where())));
        concat(parts, shapes, axis, values.data());
        return {known_value(out, std::move(values))};
    }

    void run(const Infos& in, const Infos&, RunContext& ctx) const override {
        std::vector<Dims> shapes;
        for (const ValueInfo* v : in) shapes.push_back(v->shape);
        concat(ctx.in, shapes, normalize_axis(axis_, static_cast<int64_t>(shapes[0].size()), node_), ctx.out[0]);
    }

   private:
    int64_t axis_;
};

// ---- Shape arithmetic (plan time only) ---------------------------------------------------

class ShapeOp : public Op {
   public:
    explicit ShapeOp(const Node& node) : Op(node) {}
    std::vector<ValueInfo> infer(const Infos& in) const override {
        const Dims& s = input(in, 0).shape;
        const int64_t rank = static_cast<int64_t>(s.size());
        int64_t start = node_.attr_int("start", 0), end = node_.attr_int("end", rank);
        start = std::clamp<int64_t>(start < 0 ? start + rank : start, 0, rank);
        end = std::clamp<int64_t>(end < 0 ? end + rank : end, start, rank);
        std::vector<int64_t> values(s.begin() + start, s.begin() + end);
        return {known_value({end - start}, std::move(values))};
    }
    void run(const Infos&, const Infos&, RunContext&) const override {}
};

class GatherOp : public Op {
   public:
    explicit GatherOp(const Node& node) : Op(node), axis_(node.attr_int("axis", 0)) {}
    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo& data = input(in, 0);
        require(data.dtype == DType::kInt64 && data.known,
                "only shape arithmetic is supported (Gather of integers known before running)");
        const std::vector<int64_t>& indices = known_ints(in, 1);
        const int64_t rank = static_cast<int64_t>(data.shape.size());
        require(rank >= 1, "cannot gather from a scalar");
        const int64_t axis = normalize_axis(axis_, rank, node_);
        const int64_t extent = data.shape[axis];
        const int64_t inner = numel(Dims(data.shape.begin() + axis + 1, data.shape.end()));
        const int64_t outer = numel(Dims(data.shape.begin(), data.shape.begin() + axis));
        Dims out(data.shape.begin(), data.shape.begin() + axis);
        out.insert(out.end(), in[1]->shape.begin(), in[1]->shape.end());
        out.insert(out.end(), data.shape.begin() + axis + 1, data.shape.end());
        std::vector<int64_t> values;
        values.reserve(static_cast<size_t>(known_numel(out, node_.where())));
        for (int64_t o = 0; o < outer; ++o) {
            for (int64_t index : indices) {
                require(index >= -extent && index < extent, "index " + std::to_string(index) + " is out of range");
                const int64_t i = index < 0 ? index + extent : index;
                const int64_t* src = data.ints.data() + (o * extent + i) * inner;
                values.insert(values.end(), src, src + inner);
            }
        }
        return {known_value(out, std::move(values))};
    }
    void run(const Infos&, const Infos&, RunContext&) const override {}

   private:
    int64_t axis_;
};

// ---- Slice (float at run time, or shape integers at plan time) and Split -----------------

// One axis of a slice: the first index read, the step between reads and how many are read.
struct SliceAxis {
    int64_t start = 0, step = 1, count = 0;
};

// y = x[axes[0].start :: axes[0].step][...] with axes[d].count entries per dimension.
template <typename T>
void slice_copy(const T* x, const Dims& shape, const std::vector<SliceAxis>& axes, T* y) {
    const size_t rank = shape.size();
    int64_t total = 1;
    for (const SliceAxis& a : axes) total *= a.count;
    if (total == 0) return;
    Dims stride(rank, 1);
    for (size_t i = rank - 1; i-- > 0;) stride[i] = stride[i + 1] * shape[i + 1];
    int64_t offset = 0;
    for (size_t d = 0; d < rank; ++d) offset += axes[d].start * stride[d];
    const int64_t inner = axes.back().count, inner_step = axes.back().step;
    Dims index(rank, 0);
    for (int64_t o = 0; o < total; o += inner) {
        for (int64_t j = 0; j < inner; ++j) y[o + j] = x[offset + j * inner_step];
        for (size_t d = rank - 1; d-- > 0;) {  // odometer over the outer dims
            offset += axes[d].step * stride[d];
            if (++index[d] < axes[d].count) break;
            offset -= axes[d].step * stride[d] * axes[d].count;
            index[d] = 0;
        }
    }
}

class SliceOp : public Op {
   public:
    SliceOp(const Node& node, int64_t opset) : Op(node), opset_(opset) {}

    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo& data = input(in, 0);
        const std::vector<SliceAxis> axes = slice_axes(data.shape, in);
        Dims out;
        for (const SliceAxis& a : axes) out.push_back(a.count);
        if (data.dtype == DType::kInt64) {
            require(data.known, "an integer input must be known before running (shape arithmetic)");
            std::vector<int64_t> values(static_cast<size_t>(known_numel(out, node_.where())));
            slice_copy(data.ints.data(), data.shape, axes, values.data());
            return {known_value(out, std::move(values))};
        }
        float_input(in, 0);
        return {float_value(out)};
    }

    void run(const Infos& in, const Infos&, RunContext& ctx) const override {
        slice_copy(ctx.in[0], in[0]->shape, slice_axes(in[0]->shape, in), ctx.out[0]);
    }

   private:
    // starts/ends/axes/steps: attributes before opset 10, inputs 1-4 from then on.
    std::vector<SliceAxis> slice_axes(const Dims& shape, const Infos& in) const {
        const int64_t rank = static_cast<int64_t>(shape.size());
        require(rank >= 1, "cannot slice a scalar");
        const bool inputs = opset_ >= 10;
        const std::vector<int64_t> starts = inputs ? known_ints(in, 1) : node_.attr_ints("starts", {});
        const std::vector<int64_t> ends = inputs ? known_ints(in, 2) : node_.attr_ints("ends", {});
        std::vector<int64_t> axes = inputs ? (in.size() > 3 && in[3] ? known_ints(in, 3) : std::vector<int64_t>{})
                                           : node_.attr_ints("axes", {});
        const std::vector<int64_t> steps = inputs && in.size() > 4 && in[4] ? known_ints(in, 4)
                                                                            : std::vector<int64_t>(starts.size(), 1);
        if (axes.empty()) {
            for (size_t i = 0; i < starts.size(); ++i) axes.push_back(static_cast<int64_t>(i));
        }
        require(ends.size() == starts.size() && axes.size() == starts.size() && steps.size() == starts.size(),
                "starts, ends, axes and steps have different lengths");
        std::vector<SliceAxis> out(static_cast<size_t>(rank));
        for (int64_t d = 0; d < rank; ++d) out[d] = {0, 1, shape[d]};
        std::vector<bool> seen(static_cast<size_t>(rank), false);
        for (size_t i = 0; i < starts.size(); ++i) {
            const int64_t axis = normalize_axis(axes[i], rank, node_), dim = shape[axis], step = steps[i];
            require(!seen[axis], "axis " + std::to_string(axes[i]) + " is repeated");
            seen[axis] = true;
            require(step != 0 && step >= -kMaxElements && step <= kMaxElements, "invalid step " + std::to_string(step));
            // ONNX clamping: negative indices count from the end; a negative step reads down to -1.
            int64_t start = starts[i] < 0 ? std::max(starts[i], -dim) + dim : starts[i];
            int64_t end = ends[i] < 0 ? std::max(ends[i], -dim - 1) + dim : ends[i];
            int64_t count = 0;
            if (step > 0) {
                start = std::min(start, dim);
                end = std::min(end, dim);
                count = end > start ? (end - start + step - 1) / step : 0;
            } else {
                start = std::min(start, dim - 1);
                end = std::max<int64_t>(std::min(end, dim - 1), -1);
                count = start > end ? (start - end - step - 1) / -step : 0;
            }
            out[axis] = {start, step, count};
        }
        return out;
    }

    int64_t opset_;
};

class SplitOp : public Op {
   public:
    SplitOp(const Node& node, int64_t opset) : Op(node), opset_(opset), axis_(node.attr_int("axis", 0)) {
        require(!node.outputs.empty(), "needs at least one output");
    }

    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo& x = float_input(in, 0);
        const int64_t axis = normalize_axis(axis_, static_cast<int64_t>(x.shape.size()), node_);
        std::vector<ValueInfo> out;
        for (int64_t size : parts(x.shape[axis], in)) {
            Dims shape = x.shape;
            shape[axis] = size;
            out.push_back(float_value(shape));
        }
        return out;
    }

    void run(const Infos& in, const Infos&, RunContext& ctx) const override {
        const Dims& s = in[0]->shape;
        const int64_t axis = normalize_axis(axis_, static_cast<int64_t>(s.size()), node_);
        const int64_t outer = numel(Dims(s.begin(), s.begin() + axis));
        const int64_t inner = numel(Dims(s.begin() + axis + 1, s.end()));
        const std::vector<int64_t> sizes = parts(s[axis], in);
        int64_t first = 0;  // of the current part along the axis
        for (size_t k = 0; k < sizes.size(); ++k) {
            const int64_t size = sizes[k];
            for (int64_t o = 0; ctx.out[k] && o < outer; ++o) {  // unused outputs have no buffer
                const float* src = ctx.in[0] + (o * s[axis] + first) * inner;
                std::copy(src, src + size * inner, ctx.out[k] + o * size * inner);
            }
            first += size;
        }
    }

   private:
    // The length of each part along the axis: `split` (an attribute before opset 13, an input
    // from then on), else equal parts (from opset 18 the last may be smaller).
    std::vector<int64_t> parts(int64_t dim, const Infos& in) const {
        const int64_t count = static_cast<int64_t>(node_.outputs.size());
        std::vector<int64_t> split;
        if (opset_ >= 13) {
            if (in.size() > 1 && in[1]) split = known_ints(in, 1);
        } else {
            split = node_.attr_ints("split", {});
        }
        if (!split.empty()) {
            require(static_cast<int64_t>(split.size()) == count,
                    "split has " + std::to_string(split.size()) + " entries for " + std::to_string(count) + " outputs");
            int64_t total = 0;
            for (int64_t v : split) {
                require(v >= 0 && v <= dim, "invalid split size " + std::to_string(v));
                total += v;
            }
            require(total == dim, "split sizes " + dims_text(split) + " do not add up to the dimension " + std::to_string(dim));
            return split;
        }
        if (opset_ >= 18 && node_.has_attr("num_outputs")) {
            const int64_t n = node_.attr_int("num_outputs", 0);
            require(n == count, "num_outputs " + std::to_string(n) + " does not match the " + std::to_string(count) + " outputs");
            const int64_t chunk = (dim + n - 1) / n, last = dim - chunk * (n - 1);
            require(last >= 0, "cannot split a dimension of " + std::to_string(dim) + " into " + std::to_string(n) + " parts");
            std::vector<int64_t> sizes(static_cast<size_t>(n), chunk);
            sizes.back() = last;
            return sizes;
        }
        require(dim % count == 0, "cannot split a dimension of " + std::to_string(dim) + " into " + std::to_string(count) + " equal parts");
        return std::vector<int64_t>(static_cast<size_t>(count), dim / count);
    }

    int64_t opset_, axis_;
};

class CastOp : public Op {
   public:
    explicit CastOp(const Node& node) : Op(node), to_(node.attr_int("to", 0)) {}
    std::vector<ValueInfo> infer(const Infos& in) const override {
        const ValueInfo& x = input(in, 0);
        constexpr int64_t kFloat = 1, kInt32 = 6, kInt64 = 7;
        if (x.dtype == DType::kFloat32 && to_ == kFloat) return {x};
        require(x.dtype == DType::kInt64 && x.known && (to_ == kInt64 || to_ == kInt32),
                "only float->float and shape-integer casts are supported");
        return {x};
    }
    void run(const Infos&, const Infos&, RunContext&) const override {}
    Sharing sharing() const override { return Sharing::kView; }

   private:
    int64_t to_;
};

}  // namespace

std::unique_ptr<Op> make_tensor_op(const Node& node, const PackedModel& model) {
    const std::string& op = node.op;
    if (op == "Reshape") return std::make_unique<ViewOp>(node, ViewKind::kReshape, model.opset);
    if (op == "Flatten") return std::make_unique<ViewOp>(node, ViewKind::kFlatten, model.opset);
    if (op == "Squeeze") return std::make_unique<ViewOp>(node, ViewKind::kSqueeze, model.opset);
    if (op == "Unsqueeze") return std::make_unique<ViewOp>(node, ViewKind::kUnsqueeze, model.opset);
    if (op == "Identity" || op == "Dropout") return std::make_unique<ViewOp>(node, ViewKind::kIdentity, model.opset);
    if (op == "Transpose") return std::make_unique<TransposeOp>(node);
    if (op == "Concat") return std::make_unique<ConcatOp>(node);
    if (op == "Shape") return std::make_unique<ShapeOp>(node);
    if (op == "Gather") return std::make_unique<GatherOp>(node);
    if (op == "Slice") return std::make_unique<SliceOp>(node, model.opset);
    if (op == "Split") return std::make_unique<SplitOp>(node, model.opset);
    if (op == "Cast") return std::make_unique<CastOp>(node);
    return nullptr;
}

}  // namespace neuralmerge::detail
