// The interface every executor op implements, and helpers shared by the op files.
//
// An op is compiled once per node at load (reading its attributes and constant inputs). At plan
// time `infer` turns input shapes into output shapes (and computes integer shape tensors such as
// Shape -> Gather -> Concat outright); at run time `run` computes float32 outputs.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model.h"
#include "neuralmerge/executor.h"

namespace neuralmerge::detail {

using Dims = std::vector<int64_t>;

/// What the planner knows about one tensor.
struct ValueInfo {
    DType dtype = DType::kFloat32;
    Dims shape;
    bool known = false;          ///< int64 values known at plan time (initializers, shape arithmetic)
    std::vector<int64_t> ints;   ///< the values, when known
    const float* constant = nullptr;  ///< float32 initializer data
    int64_t numel() const;
};

/// Buffers of one node call. Plan-time inputs and omitted inputs have a nullptr.
struct RunContext {
    std::vector<const float*> in;
    std::vector<float*> out;
    float* workspace = nullptr;
    int threads = 1;  ///< the session's threads, for ops that split their work (kernels/parallel.h)
};

using Infos = std::vector<const ValueInfo*>;  // nullptr for omitted optional inputs/outputs

class Op {
   public:
    /// Whether output 0 may live in input 0's memory.
    enum class Sharing {
        kNone,
        kView,     ///< always the same bytes (Reshape, Flatten, Identity, ...): no copy at all
        kInPlace,  ///< elementwise: may overwrite input 0 when nothing reads it afterwards
    };

    explicit Op(const Node& node) : node_(node) {}
    virtual ~Op() = default;

    /// Output infos (one per node output) for these inputs; throws ModelError.
    virtual std::vector<ValueInfo> infer(const Infos& in) const = 0;
    /// Computes the float outputs. Not called when infer() left every output known at plan time.
    virtual void run(const Infos& in, const Infos& out, RunContext& ctx) const = 0;
    virtual size_t workspace_floats(const Infos& /*in*/, const Infos& /*out*/) const { return 0; }
    virtual Sharing sharing() const { return Sharing::kNone; }
    /// The kernel used, for E-layers ("" for others).
    virtual std::string kernel() const { return ""; }
    /// Whether run() reads input i's data; false for constants the op copied when it was built
    /// (the session then hands their pages back to the OS).
    virtual bool reads_at_run(size_t /*input*/) const { return true; }

    const Node& node() const { return node_; }

   protected:
    [[noreturn]] void fail(const std::string& message) const { model_error(node_.where() + ": " + message); }
    void require(bool condition, const std::string& message) const {
        if (!condition) fail(message);
    }
    /// Input i, which must be present.
    const ValueInfo& input(const Infos& in, size_t i) const;
    /// Input i as float32 computed or constant data.
    const ValueInfo& float_input(const Infos& in, size_t i) const;
    /// Input i as integers known at plan time (an initializer or shape arithmetic).
    const std::vector<int64_t>& known_ints(const Infos& in, size_t i) const;
    /// A float32 initializer input, read at compile time; `expected_numel` < 0 skips the size check.
    const Constant& constant_input(const PackedModel& model, size_t i, int64_t expected_numel = -1) const;

    const Node& node_;
};

std::unique_ptr<Op> make_op(const Node& node, const PackedModel& model, const SessionOptions& options);

// Per-file factories (each returns nullptr when it does not know the op).
std::unique_ptr<Op> make_elementwise_op(const Node& node, const PackedModel& model);
std::unique_ptr<Op> make_nn_op(const Node& node, const PackedModel& model, const SessionOptions& options);
std::unique_ptr<Op> make_tensor_op(const Node& node, const PackedModel& model);
std::unique_ptr<Op> make_reduce_op(const Node& node, const PackedModel& model);
std::unique_ptr<Op> make_resample_op(const Node& node, const PackedModel& model);

int64_t numel(const Dims& shape);
std::string dims_text(const Dims& shape);
/// Normalises a possibly negative axis against `rank` (inclusive upper bound when `extra` is 1).
int64_t normalize_axis(int64_t axis, int64_t rank, const Node& node, int64_t extra = 0);

ValueInfo float_value(Dims shape);
ValueInfo known_value(Dims shape, std::vector<int64_t> ints);
/// Integers known before running (shape arithmetic) are small: a larger constant is data, and
/// an op computing more than this (a broadcast, a Gather) is an error before it allocates.
constexpr int64_t kMaxKnownInts = int64_t{1} << 16;
/// checked_numel of a known result's shape, checked against kMaxKnownInts.
int64_t known_numel(const Dims& shape, const std::string& what);

}  // namespace neuralmerge::detail
