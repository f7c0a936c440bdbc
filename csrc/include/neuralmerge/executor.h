// The neuralmerge graph executor: loads a packed merged model (.nmpack, docs/runtime.md) and runs
// it on lookup-table kernels, without Python or protobuf.
//
//   neuralmerge::SessionOptions options;
//   options.precision = neuralmerge::Precision::kInt8;
//   neuralmerge::Session session = neuralmerge::Session::from_file("merged.nmpack", options);
//   std::vector<neuralmerge::Tensor> out = session.run({{"m0.input", {x.data(), {1, 1, 32, 32}}}}, {"m0.logits"});
//
// A file is never trusted: every offset, size, shape, dtype, code and node reference is checked at
// load and a violation throws ModelError with a one-line message. Bad feeds throw InputError.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace neuralmerge {

/// A model file (or buffer) is malformed, inconsistent, or uses an op the runtime cannot run.
class ModelError : public std::runtime_error {
   public:
    using std::runtime_error::runtime_error;
};

/// Feeds handed to Session::run do not match the model (name, rank, shape) or are missing.
class InputError : public std::invalid_argument {
   public:
    using std::invalid_argument::invalid_argument;
};

/// Arithmetic used for the lookup tables of encoded layers; kFp32 is exact.
enum class Precision { kFp32, kFp16, kInt16, kInt8 };

struct SessionOptions {
    Precision precision = Precision::kFp32;
    /// Threads a run may use: ops split their work, or independent tasks run side by side
    /// (whichever the first runs measured faster; docs/runtime.md).
    int threads = 1;
    /// Time every node of every run (Session::profile): two clock reads per node, so off by default.
    bool profile = false;
};

/// Time one node took over the runs since the session was created or its profile was reset.
struct NodeProfile {
    std::string name;    ///< the node's name in the model
    std::string op;      ///< its op type
    std::string kernel;  ///< the kernel an E-layer runs on, "+ Relu" when one was folded into it ("" for other ops)
    int64_t calls = 0;
    double seconds = 0.0;  ///< wall time inside the node, summed over its calls
};

/// Name, element type and shape of a graph input or output; -1 marks a dimension fixed per call.
struct TensorInfo {
    std::string name;
    std::string dtype;  ///< "float32" (the only type graph inputs/outputs may have)
    std::vector<int64_t> shape;
};

/// A borrowed float32 tensor (row-major, contiguous).
struct TensorView {
    const float* data = nullptr;
    std::vector<int64_t> shape;
};

/// An owned float32 tensor (row-major, contiguous).
struct Tensor {
    std::vector<int64_t> shape;
    std::vector<float> data;
};

/// Parses a precision name: "fp32", "fp16", "int16" or "int8"; throws std::invalid_argument.
Precision parse_precision(const std::string& name);

class SessionImpl;

/// A loaded, validated model with its execution plans (one per requested outputs and input shapes).
/// run() is serialised by an internal mutex: one session may be shared by threads.
class Session {
   public:
    /// Both throw ModelError for a bad file and std::invalid_argument for options out of range
    /// (threads outside [1, 1024]).
    static Session from_file(const std::string& path, const SessionOptions& options = {});
    /// Copies nothing it does not need: tensors are copied out of `data` during the call.
    static Session from_buffer(const void* data, size_t size, const SessionOptions& options = {});

    Session(Session&&) noexcept;
    Session& operator=(Session&&) noexcept;
    ~Session();

    const std::vector<TensorInfo>& inputs() const;
    const std::vector<TensorInfo>& outputs() const;

    /// Runs the nodes the requested outputs need (all outputs when `output_names` is empty).
    /// Feeds not needed by those outputs may be omitted; every feed given must be a graph input.
    std::vector<Tensor> run(const std::vector<std::pair<std::string, TensorView>>& feeds,
                            const std::vector<std::string>& output_names = {});

    /// The graph inputs an output depends on (the feeds a run of that output alone needs), in
    /// input order; throws InputError for an unknown output name.
    std::vector<std::string> inputs_needed(const std::string& output) const;

    /// One line per E-layer: node name, kind and the kernel chosen for it.
    std::vector<std::string> describe_kernels() const;

    /// Nodes that ran since the session was created or reset_profile(), in model order (empty
    /// unless SessionOptions::profile). With threads >= 2 a merged model's tasks may run side by
    /// side, so node times can add up to more than a run's wall time.
    std::vector<NodeProfile> profile() const;
    void reset_profile();

   private:
    explicit Session(std::unique_ptr<SessionImpl> impl);
    std::unique_ptr<SessionImpl> impl_;
};

}  // namespace neuralmerge
