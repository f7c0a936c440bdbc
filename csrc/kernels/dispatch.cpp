// Runtime choice of the kernel table by CPU feature (as faiss does): the library is built for
// baseline x86-64 and the AVX2 / AVX-512 kernels are compiled with function-level targets.
// Also the few portable helpers every ISA's layers share (half floats, the input_scale check).
#include <cstdio>
#include <cstring>
#include <stdexcept>
#if defined(__x86_64__)
#include <cpuid.h>
#endif
#include <string>

#include "lut_internal.h"

namespace neuralmerge {
namespace detail {
namespace {

#if defined(__x86_64__)
bool has_avx2() {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

bool has_avx512() {
    // One AVX-512 level for every kernel: the VBMI byte permute (E-FC) and VNNI (int8 build).
    return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("avx512vbmi");
}

// AVX512-FP16 (CPUID leaf 7, EDX bit 23), read directly: GCC before 12 has no name for it in
// __builtin_cpu_supports. The OS saves AVX-512 state if avx512f is reported.
bool has_avx512fp16() {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __builtin_cpu_supports("avx512f") && __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx >> 23 & 1u);
}

// The AVX-512 table, with the fp16 partial-sum kernel on CPUs that have fp16 arithmetic (and
// when the compiler could build it).
const KernelTable& avx512_table() {
    static const KernelTable table = [] {
        KernelTable t = avx512_kernels();
        if (has_avx512fp16()) t.accumulate_f16_partial = accumulate_f16_partial();  // may be null
        return t;
    }();
    return table;
}
#endif

}  // namespace

const KernelTable& select_kernels(LutIsa isa) {
#if defined(__x86_64__)
    switch (isa) {
        case LutIsa::kAuto:
            if (has_avx512()) return avx512_table();
            if (has_avx2()) return avx2_kernels();
            return scalar_kernels();
        case LutIsa::kAvx512:
            if (!has_avx512()) throw std::invalid_argument("this CPU lacks AVX-512 F/BW/VL/VNNI/VBMI");
            return avx512_table();
        case LutIsa::kAvx2:
            if (!has_avx2()) throw std::invalid_argument("this CPU lacks AVX2/FMA/F16C");
            return avx2_kernels();
        case LutIsa::kScalar:
            return scalar_kernels();
    }
#else
    if (isa == LutIsa::kAvx512 || isa == LutIsa::kAvx2) {
        throw std::invalid_argument("AVX kernels exist only on x86-64");
    }
    return scalar_kernels();
#endif
    throw std::invalid_argument("unknown instruction set");
}

uint16_t float_to_half(float value) {
    uint32_t f;
    std::memcpy(&f, &value, sizeof f);
    const uint32_t sign = (f >> 16) & 0x8000u;
    const uint32_t abs = f & 0x7fffffffu;
    if (abs >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
    if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to infinity
    if (abs < 0x38800000u) {                                                // half subnormal or zero
        if (abs < 0x33000000u) return static_cast<uint16_t>(sign);
        const uint32_t exponent = abs >> 23, mantissa = (abs & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - exponent;  // 14..24
        uint32_t half = mantissa >> shift;
        const uint32_t rest = mantissa & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rest > halfway || (rest == halfway && (half & 1u))) ++half;
        return static_cast<uint16_t>(sign | half);
    }
    uint32_t half = ((abs - 0x38000000u) >> 13);
    const uint32_t rest = abs & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
}

void require_valid_input_scale(float scale) {
    if (valid_input_scale(scale)) return;
    char value[32];
    std::snprintf(value, sizeof value, "%g", static_cast<double>(scale));
    throw std::invalid_argument(std::string("input_scale must be 0 or between 1e-30 and 1e30, got ") + value);
}

float half_to_float(uint16_t bits) {
    const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
    uint32_t exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
    uint32_t f;
    if (exponent == 0x1f) {
        f = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        f = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        f = sign;
    } else {  // subnormal half: normalise
        exponent = 113;
        while (!(mantissa & 0x400u)) {
            mantissa <<= 1;
            --exponent;
        }
        f = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
    }
    float value;
    std::memcpy(&value, &f, sizeof value);
    return value;
}

}  // namespace detail

std::string cpu_features() {
    std::string text;
#if defined(__x86_64__)
    // __builtin_cpu_supports needs a string literal, hence the spelled-out list.
    const struct {
        const char* name;
        bool present;
    } features[] = {
        {"avx512f", __builtin_cpu_supports("avx512f") != 0},
        {"avx512bw", __builtin_cpu_supports("avx512bw") != 0},
        {"avx512vl", __builtin_cpu_supports("avx512vl") != 0},
        {"avx512vnni", __builtin_cpu_supports("avx512vnni") != 0},
        {"avx512vbmi", __builtin_cpu_supports("avx512vbmi") != 0},
        // Only when this build has the kernel that uses it (a compiler before GCC 12 / Clang 14 has not).
        {"avx512fp16", detail::has_avx512fp16() && detail::accumulate_f16_partial() != nullptr},
        {"avx2", __builtin_cpu_supports("avx2") != 0},
        {"fma", __builtin_cpu_supports("fma") != 0},
        {"f16c", __builtin_cpu_supports("f16c") != 0},
    };
    for (const auto& feature : features) {
        if (feature.present) text += (text.empty() ? "" : " ") + std::string(feature.name);
    }
#endif
    return text.empty() ? "baseline" : text;
}

}  // namespace neuralmerge
