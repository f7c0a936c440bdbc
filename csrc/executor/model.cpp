// Reads a .nmpack file and checks every byte range, shape and reference in it before any of it
// is used (docs/runtime.md). Nothing here trusts the header: all arithmetic on its numbers is
// overflow-checked and every tensor range must lie inside the file.
#include "model.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <tuple>
#include <unordered_set>

#include "../kernels/lut_internal.h"

namespace neuralmerge::detail {
namespace {

uint64_t read_u64(const unsigned char* p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];  // little-endian on every host
    return v;
}

uint32_t read_u32(const unsigned char* p) {
    return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16 |
           static_cast<uint32_t>(p[3]) << 24;
}

const json::Value& member(const json::Value& object, const char* key, const std::string& where) {
    const json::Value* v = object.find(key);
    if (!v) model_error(where + " has no '" + key + "'");
    return *v;
}

const std::string& string_member(const json::Value& object, const char* key, const std::string& where) {
    const json::Value& v = member(object, key, where);
    if (!v.is_string()) model_error(where + ": '" + key + "' must be a string");
    return v.as_string();
}

const std::vector<json::Value>& array_member(const json::Value& object, const char* key, const std::string& where) {
    const json::Value& v = member(object, key, where);
    if (!v.is_array()) model_error(where + ": '" + key + "' must be an array");
    return v.items();
}

std::vector<int64_t> int_list(const json::Value& v, const std::string& where) {
    if (!v.is_array()) model_error(where + " must be an array of integers");
    std::vector<int64_t> out;
    out.reserve(v.items().size());
    for (const json::Value& item : v.items()) {
        if (!item.is_int()) model_error(where + " must be an array of integers");
        out.push_back(item.as_int());
    }
    return out;
}

std::vector<std::string> string_list(const json::Value& v, const std::string& where) {
    if (!v.is_array()) model_error(where + " must be an array of strings");
    std::vector<std::string> out;
    for (const json::Value& item : v.items()) {
        if (!item.is_string()) model_error(where + " must be an array of strings");
        out.push_back(item.as_string());
    }
    return out;
}

DType parse_dtype(const std::string& name, const std::string& where) {
    if (name == "float32") return DType::kFloat32;
    if (name == "float16") return DType::kFloat16;
    if (name == "int64") return DType::kInt64;
    if (name == "uint8") return DType::kUInt8;
    if (name == "uint16") return DType::kUInt16;
    model_error(where + " has unsupported dtype '" + name + "'");
}

TensorInfo read_io(const json::Value& v, const std::string& where) {
    if (!v.is_object()) model_error(where + " must be an object");
    TensorInfo info;
    info.name = string_member(v, "name", where);
    if (info.name.empty()) model_error(where + " has an empty name");
    const std::string named = where + " '" + info.name + "'";
    info.dtype = string_member(v, "dtype", named);
    if (info.dtype != "float32") model_error(named + " has dtype " + info.dtype + "; only float32 is supported");
    info.shape = int_list(member(v, "shape", named), named + " shape");
    if (info.shape.empty() || static_cast<int64_t>(info.shape.size()) > kMaxRank) {
        model_error(named + " must have rank 1.." + std::to_string(kMaxRank));
    }
    std::vector<int64_t> pinned = info.shape;
    for (int64_t& d : pinned) {
        if (d == -1) d = 1;
        else if (d < 1) model_error(named + " has dimension " + std::to_string(d) + " (must be >= 1, or -1 if free)");
    }
    checked_numel(pinned, named);
    return info;
}

}  // namespace

size_t dtype_size(DType dtype) {
    switch (dtype) {
        case DType::kFloat32: return 4;
        case DType::kFloat16: return 2;
        case DType::kInt64: return 8;
        case DType::kUInt8: return 1;
        case DType::kUInt16: return 2;
    }
    return 0;
}

const char* dtype_name(DType dtype) {
    switch (dtype) {
        case DType::kFloat32: return "float32";
        case DType::kFloat16: return "float16";
        case DType::kInt64: return "int64";
        case DType::kUInt8: return "uint8";
        case DType::kUInt16: return "uint16";
    }
    return "?";
}

void model_error(const std::string& message) { throw ModelError(message); }

int64_t checked_numel(const std::vector<int64_t>& shape, const std::string& what) {
    if (static_cast<int64_t>(shape.size()) > kMaxRank) model_error(what + " has rank above " + std::to_string(kMaxRank));
    int64_t n = 1;
    for (int64_t d : shape) {
        if (d < 0) model_error(what + " has negative dimension " + std::to_string(d));
        if (d > kMaxElements || (d > 0 && n > kMaxElements / d)) {
            model_error(what + " has more than " + std::to_string(kMaxElements) + " elements");
        }
        n *= d;
    }
    return n;
}

int64_t Node::attr_int(const char* key, int64_t fallback) const {
    const json::Value* v = attrs.find(key);
    if (!v) return fallback;
    if (!v->is_int()) model_error(where() + ": attribute '" + key + "' must be an integer");
    return v->as_int();
}

float Node::attr_float(const char* key, float fallback) const {
    const json::Value* v = attrs.find(key);
    if (!v) return fallback;
    if (!v->is_number()) model_error(where() + ": attribute '" + key + "' must be a number");
    return static_cast<float>(v->as_double());
}

std::string Node::attr_string(const char* key, const std::string& fallback) const {
    const json::Value* v = attrs.find(key);
    if (!v) return fallback;
    if (!v->is_string()) model_error(where() + ": attribute '" + key + "' must be a string");
    return v->as_string();
}

std::vector<int64_t> Node::attr_ints(const char* key, const std::vector<int64_t>& fallback) const {
    const json::Value* v = attrs.find(key);
    if (!v) return fallback;
    return int_list(*v, where() + ": attribute '" + key + "'");
}

std::string Node::where() const { return "op '" + op + "' (node '" + name + "')"; }

std::shared_ptr<unsigned char> aligned_bytes(size_t size) {
    const size_t rounded = (size + 63) / 64 * 64 + 64;
    void* p = std::aligned_alloc(64, rounded);
    if (!p) throw std::bad_alloc();
    return std::shared_ptr<unsigned char>(static_cast<unsigned char*>(p), [](unsigned char* q) { std::free(q); });
}

std::shared_ptr<const PackedModel> read_pack(std::shared_ptr<unsigned char> bytes, size_t size) {
    const unsigned char* base = bytes.get();
    if (size < kPackPrefixBytes) model_error("file is truncated: " + std::to_string(size) + " bytes");
    if (std::memcmp(base, kPackMagic, sizeof kPackMagic) != 0) model_error("not a .nmpack file (bad magic)");
    const uint32_t version = read_u32(base + 8);
    if (version != kPackVersion) {
        model_error(".nmpack version " + std::to_string(version) + " is not supported (this runtime reads version " +
                    std::to_string(kPackVersion) + ")");
    }
    const uint64_t header_size = read_u64(base + 16), data_offset = read_u64(base + 24);
    if (header_size > size - kPackPrefixBytes) model_error("header size runs past the end of the file (truncated?)");
    if (data_offset < kPackPrefixBytes + header_size || data_offset > size || data_offset % 64 != 0) {
        model_error("data offset " + std::to_string(data_offset) + " is invalid for a file of " +
                    std::to_string(size) + " bytes");
    }
    const uint64_t data_size = size - data_offset;

    json::Value header;
    try {
        header = json::parse(std::string_view(reinterpret_cast<const char*>(base + kPackPrefixBytes), header_size));
    } catch (const std::runtime_error& e) {
        model_error(e.what());
    }
    if (!header.is_object()) model_error("header must be a JSON object");

    auto model = std::make_shared<PackedModel>();
    const json::Value& opset = member(header, "opset", "header");
    if (!opset.is_int() || opset.as_int() < 1 || opset.as_int() > 1000) model_error("header: invalid opset");
    model->opset = opset.as_int();

    std::unordered_set<std::string> defined;
    std::vector<std::tuple<uint64_t, uint64_t, std::string>> ranges;  // byte ranges: offset, size, name
    for (const json::Value& t : array_member(header, "tensors", "header")) {
        if (!t.is_object()) model_error("header: every tensor must be an object");
        const std::string& name = string_member(t, "name", "a tensor");
        const std::string where = "tensor '" + name + "'";
        if (name.empty() || !defined.insert(name).second) model_error(where + " is unnamed or defined twice");
        Constant c;
        c.dtype = parse_dtype(string_member(t, "dtype", where), where);
        c.shape = int_list(member(t, "shape", where), where + " shape");
        c.numel = checked_numel(c.shape, where);
        const json::Value& offset = member(t, "offset", where);
        const json::Value& nbytes = member(t, "size", where);
        if (!offset.is_int() || !nbytes.is_int() || offset.as_int() < 0 || nbytes.as_int() < 0) {
            model_error(where + ": offset and size must be non-negative integers");
        }
        const uint64_t off = static_cast<uint64_t>(offset.as_int()), len = static_cast<uint64_t>(nbytes.as_int());
        if (len != static_cast<uint64_t>(c.numel) * dtype_size(c.dtype)) {
            model_error(where + ": size " + std::to_string(len) + " bytes does not match shape and dtype (" +
                        std::to_string(c.numel * static_cast<int64_t>(dtype_size(c.dtype))) + " bytes)");
        }
        if (off % 64 != 0) model_error(where + ": offset " + std::to_string(off) + " is not 64-byte aligned");
        if (off > data_size || len > data_size - off) {
            model_error(where + ": bytes [" + std::to_string(off) + ", +" + std::to_string(len) +
                        ") lie outside the data section of " + std::to_string(data_size) + " bytes (truncated file?)");
        }
        if (len > 0) ranges.emplace_back(off, len, name);
        c.data = base + data_offset + off;
        if (c.dtype == DType::kFloat16) {
            const auto* h = static_cast<const unsigned char*>(c.data);
            std::vector<float> wide(static_cast<size_t>(c.numel));
            for (int64_t i = 0; i < c.numel; ++i) wide[i] = half_to_float(static_cast<uint16_t>(h[2 * i] | h[2 * i + 1] << 8));
            model->widened.push_back(std::move(wide));
            c.data = model->widened.back().data();
            c.dtype = DType::kFloat32;
        }
        model->constants.emplace(name, std::move(c));
    }

    // Tensors must not share bytes: the session hands the pages of the constants E-layers copy
    // back to the OS, which would zero any other tensor stored in them.
    std::sort(ranges.begin(), ranges.end());
    for (size_t i = 1; i < ranges.size(); ++i) {
        const auto& [off, len, name] = ranges[i - 1];
        if (off + len > std::get<0>(ranges[i])) {
            model_error("tensors '" + name + "' and '" + std::get<2>(ranges[i]) + "' overlap in the data section");
        }
    }

    for (const json::Value& v : array_member(header, "inputs", "header")) {
        TensorInfo info = read_io(v, "input");
        if (!defined.insert(info.name).second) model_error("input '" + info.name + "' is defined twice");
        model->inputs.push_back(std::move(info));
    }
    if (model->inputs.empty()) model_error("the model has no inputs");

    size_t index = 0;
    for (const json::Value& n : array_member(header, "nodes", "header")) {
        if (!n.is_object()) model_error("header: every node must be an object");
        Node node;
        const std::string where = "node #" + std::to_string(index++);
        node.name = string_member(n, "name", where);
        if (node.name.empty()) node.name = where;
        node.op = string_member(n, "op", where);
        const json::Value* domain = n.find("domain");
        if (domain) {
            if (!domain->is_string()) model_error(where + ": domain must be a string");
            node.domain = domain->as_string();
        }
        node.inputs = string_list(member(n, "inputs", where), where + " inputs");
        node.outputs = string_list(member(n, "outputs", where), where + " outputs");
        const json::Value* attrs = n.find("attrs");
        if (attrs) {
            if (!attrs->is_object()) model_error(node.where() + ": attrs must be an object");
            node.attrs = *attrs;
        } else {
            node.attrs = json::parse("{}");
        }
        for (const std::string& in : node.inputs) {
            if (!in.empty() && !defined.count(in)) {
                model_error(node.where() + " reads '" + in + "' before it is defined");
            }
        }
        for (const std::string& out : node.outputs) {
            if (!out.empty() && !defined.insert(out).second) model_error(node.where() + " redefines '" + out + "'");
        }
        model->nodes.push_back(std::move(node));
    }

    for (const json::Value& v : array_member(header, "outputs", "header")) {
        TensorInfo info = read_io(v, "output");
        if (!defined.count(info.name)) model_error("output '" + info.name + "' is not produced by any node");
        for (const TensorInfo& earlier : model->outputs) {
            if (earlier.name == info.name) model_error("output '" + info.name + "' is listed twice");
        }
        model->outputs.push_back(std::move(info));
    }
    if (model->outputs.empty()) model_error("the model has no outputs");

    if (const json::Value* elayers = header.find("elayers")) {
        if (!elayers->is_object()) model_error("header: 'elayers' must be an object");
        for (const auto& [name, info] : elayers->members()) {
            const std::string where = "elayers['" + name + "']";
            if (!info.is_object()) model_error(where + " must be an object");
            ELayerInfo e;
            if (const json::Value* codewords = info.find("segment_codewords")) {
                e.segment_codewords = int_list(*codewords, where + " segment_codewords");
            }
            if (const json::Value* scale = info.find("input_scale")) {
                const double value = scale->is_number() ? scale->as_double() : -1.0;
                if (!(value >= 0.0 && value <= 1e30) || !valid_input_scale(static_cast<float>(value))) {
                    model_error(where + ": input_scale must be 0 or between 1e-30 and 1e30");
                }
                e.input_scale = static_cast<float>(scale->as_double());
            }
            model->elayers[name] = std::move(e);
        }
    }
    model->bytes = std::move(bytes);
    return model;
}

}  // namespace neuralmerge::detail
