// The .nmpack file: reading and validating it (docs/runtime.md "The .nmpack format").
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "json.h"
#include "neuralmerge/executor.h"

namespace neuralmerge::detail {

constexpr char kPackMagic[8] = {'N', 'M', 'P', 'A', 'C', 'K', '\r', '\n'};
constexpr uint32_t kPackVersion = 1;
constexpr size_t kPackPrefixBytes = 32;      // magic, version, flags, header size, data offset
constexpr int64_t kMaxRank = 8;
constexpr int64_t kMaxElements = int64_t{1} << 30;  // per tensor: anything larger is not a CNN activation

enum class DType { kFloat32, kFloat16, kInt64, kUInt8, kUInt16 };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);

[[noreturn]] void model_error(const std::string& message);

/// Element count of `shape`, checking rank, every dimension (>= 0) and the kMaxElements cap.
int64_t checked_numel(const std::vector<int64_t>& shape, const std::string& what);

/// An initializer of the packed file. fp16 tensors are widened to fp32 at load, so float data is
/// always float32 here.
struct Constant {
    DType dtype = DType::kFloat32;
    std::vector<int64_t> shape;
    const void* data = nullptr;
    int64_t numel = 0;
};

struct Node {
    std::string name;
    std::string op;
    std::string domain;
    std::vector<std::string> inputs;   ///< "" marks an omitted optional input
    std::vector<std::string> outputs;  ///< "" marks an unused optional output
    json::Value attrs;                 ///< an object
    /// Set by the session, not read from the file: a Relu that consumed this node's only output
    /// was folded into it (the node then writes the Relu's output).
    bool fused_relu = false;

    bool has_attr(const char* key) const { return attrs.find(key) != nullptr; }
    int64_t attr_int(const char* key, int64_t fallback) const;
    float attr_float(const char* key, float fallback) const;
    std::string attr_string(const char* key, const std::string& fallback) const;
    std::vector<int64_t> attr_ints(const char* key, const std::vector<int64_t>& fallback) const;
    /// "op 'X' (node 'n')", used to prefix every message about this node.
    std::string where() const;
};

/// Per E-layer metadata: the codeword count C_v of each segment and the int8 input scale
/// (0 = measure the range per call).
struct ELayerInfo {
    std::vector<int64_t> segment_codewords;
    float input_scale = 0.0f;
};

struct PackedModel {
    int64_t opset = 0;
    std::vector<TensorInfo> inputs;
    std::vector<TensorInfo> outputs;
    std::unordered_map<std::string, Constant> constants;
    std::vector<Node> nodes;
    std::unordered_map<std::string, ELayerInfo> elayers;

    // Storage the constants point into: the file bytes (64-byte aligned) and widened fp16 tensors.
    std::shared_ptr<unsigned char> bytes;
    std::vector<std::vector<float>> widened;
};

/// Validates and adopts `bytes` (the whole file, 64-byte aligned); throws ModelError.
std::shared_ptr<const PackedModel> read_pack(std::shared_ptr<unsigned char> bytes, size_t size);

/// A 64-byte aligned buffer of `size` bytes (at least 1).
std::shared_ptr<unsigned char> aligned_bytes(size_t size);

}  // namespace neuralmerge::detail
