// A small strict JSON reader for the .nmpack header.
//
// Hand-written because the runtime must build with nothing but a C++17 compiler and BLAS, and
// because the header is untrusted input: the parser bounds nesting depth, rejects trailing bytes
// and keeps integers exact (int64) so that shapes and offsets never pass through a double.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace neuralmerge::json {

class Value {
   public:
    enum class Kind { kNull, kBool, kInt, kDouble, kString, kArray, kObject };

    Kind kind() const { return kind_; }
    bool is_int() const { return kind_ == Kind::kInt; }
    bool is_number() const { return kind_ == Kind::kInt || kind_ == Kind::kDouble; }
    bool is_string() const { return kind_ == Kind::kString; }
    bool is_array() const { return kind_ == Kind::kArray; }
    bool is_object() const { return kind_ == Kind::kObject; }

    int64_t as_int() const { return int_; }
    double as_double() const { return kind_ == Kind::kInt ? static_cast<double>(int_) : double_; }
    bool as_bool() const { return bool_; }
    const std::string& as_string() const { return string_; }
    const std::vector<Value>& items() const { return items_; }
    const std::vector<std::pair<std::string, Value>>& members() const { return members_; }

    /// Member `key` of an object, or nullptr when absent (or when this is not an object).
    const Value* find(std::string_view key) const;

   private:
    friend class Parser;
    Kind kind_ = Kind::kNull;
    bool bool_ = false;
    int64_t int_ = 0;
    double double_ = 0.0;
    std::string string_;
    std::vector<Value> items_;
    std::vector<std::pair<std::string, Value>> members_;
};

/// Parses a whole document; throws std::runtime_error naming the byte offset of the problem.
Value parse(std::string_view text);

}  // namespace neuralmerge::json
