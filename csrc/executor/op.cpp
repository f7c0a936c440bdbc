// Op helpers and the registry that turns a node into an Op.
#include "op.h"

namespace neuralmerge::detail {

int64_t numel(const Dims& shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

int64_t ValueInfo::numel() const { return detail::numel(shape); }

std::string dims_text(const Dims& shape) {
    std::string text = "[";
    for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
    return text + "]";
}

int64_t normalize_axis(int64_t axis, int64_t rank, const Node& node, int64_t extra) {
    const int64_t limit = rank + extra;
    if (axis < -limit || axis >= limit) {
        model_error(node.where() + ": axis " + std::to_string(axis) + " is out of range for rank " +
                    std::to_string(rank));
    }
    return axis < 0 ? axis + limit : axis;
}

ValueInfo float_value(Dims shape) {
    ValueInfo v;
    v.shape = std::move(shape);
    checked_numel(v.shape, "a computed tensor");
    return v;
}

int64_t known_numel(const Dims& shape, const std::string& what) {
    const int64_t n = checked_numel(shape, what);
    if (n > kMaxKnownInts) {
        model_error(what + ": shape arithmetic on " + std::to_string(n) + " integers (at most " +
                    std::to_string(kMaxKnownInts) + ")");
    }
    return n;
}

ValueInfo known_value(Dims shape, std::vector<int64_t> ints) {
    ValueInfo v;
    v.dtype = DType::kInt64;
    v.shape = std::move(shape);
    v.known = true;
    v.ints = std::move(ints);
    return v;
}

const ValueInfo& Op::input(const Infos& in, size_t i) const {
    if (i >= in.size() || !in[i]) fail("input " + std::to_string(i) + " is missing");
    return *in[i];
}

const ValueInfo& Op::float_input(const Infos& in, size_t i) const {
    const ValueInfo& v = input(in, i);
    if (v.dtype != DType::kFloat32) {
        fail("input " + std::to_string(i) + " must be float32, got " + dtype_name(v.dtype));
    }
    return v;
}

const std::vector<int64_t>& Op::known_ints(const Infos& in, size_t i) const {
    const ValueInfo& v = input(in, i);
    if (v.dtype != DType::kInt64 || !v.known) {
        fail("input " + std::to_string(i) + " must be an int64 tensor known before running (a constant or shape "
             "arithmetic)");
    }
    return v.ints;
}

const Constant& Op::constant_input(const PackedModel& model, size_t i, int64_t expected_numel) const {
    if (i >= node_.inputs.size() || node_.inputs[i].empty()) fail("input " + std::to_string(i) + " is missing");
    const auto it = model.constants.find(node_.inputs[i]);
    if (it == model.constants.end()) fail("input '" + node_.inputs[i] + "' must be a constant (an initializer)");
    const Constant& c = it->second;
    if (c.dtype != DType::kFloat32) fail("constant '" + node_.inputs[i] + "' must be float32");
    if (expected_numel >= 0 && c.numel != expected_numel) {
        fail("constant '" + node_.inputs[i] + "' has " + std::to_string(c.numel) + " elements, expected " +
             std::to_string(expected_numel));
    }
    return c;
}

std::unique_ptr<Op> make_op(const Node& node, const PackedModel& model, const SessionOptions& options) {
    if (node.domain != "" && node.domain != "ai.onnx" && node.domain != "ai.neuralmerge") {
        model_error(node.where() + " is in domain '" + node.domain + "', which the neuralmerge runtime does not run; "
                    "run this file with onnxruntime.InferenceSession");
    }
    std::unique_ptr<Op> op;
    if (node.domain == "ai.neuralmerge") {
        op = make_nn_op(node, model, options);
    } else {
        op = make_elementwise_op(node, model);
        if (!op) op = make_nn_op(node, model, options);
        if (!op) op = make_tensor_op(node, model);
        if (!op) op = make_reduce_op(node, model);
        if (!op) op = make_resample_op(node, model);
    }
    if (!op) {
        model_error("op '" + node.op + "' (node '" + node.name +
                    "') is not supported by the neuralmerge runtime; run this file with onnxruntime.InferenceSession");
    }
    return op;
}

}  // namespace neuralmerge::detail
