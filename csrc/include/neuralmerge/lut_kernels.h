// Exact fp32 lookup-table kernels for jointly encoded layers (docs/format.md).
//
// An encoded layer stores no dense weight: each 1x1xr slice of a kernel is an index into a
// codebook. A layer is computed by first building a table of dot products between the input
// and every codeword (one sgemm per segment), then summing table entries chosen by the codes.
//
// This header is plain C++17 with no Python or BLAS types, so the kernels can be used from a
// C++ program directly. All pointers are borrowed; nothing is retained after a call returns.
// Every function validates its inputs and throws std::invalid_argument with a one-line message
// before touching memory that the shapes would not allow.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace neuralmerge {

/// Element type of a code array (docs/format.md: uint8 when C <= 256, otherwise uint16).
enum class CodeType { kUInt8, kUInt16 };

/// One encoded layer, as stored in a merged file (docs/format.md, EConv / EGemm inputs).
///
/// Segment v uses codebook rows offsets[v] .. offsets[v] + C_v - 1. C_v is segment_codewords[v]
/// when given (a merged file records it per group), else implied by the offsets: up to
/// offsets[v+1]-1, and for the last segment up to codebook_rows-1.
struct EncodedWeight {
    const float* codebook = nullptr;  ///< [codebook_rows, segment_length], row-major
    /// Alternative to `codebook`: IEEE half-precision bits, same layout. The prepared layers
    /// (EConvLayer, EGemmLayer) widen it once; the reference econv()/egemm() need `codebook`.
    const uint16_t* codebook_fp16 = nullptr;
    int64_t codebook_rows = 0;        ///< K
    int64_t segment_length = 0;       ///< r
    const void* codes = nullptr;      ///< conv [out, kernel_h, kernel_w, segments]; fc [out, segments]
    CodeType code_type = CodeType::kUInt8;
    const int64_t* offsets = nullptr;  ///< [segments], first codebook row of each segment
    int64_t segments = 0;              ///< rho = ceil(depth / r)
    int64_t depth = 0;                 ///< d: C_in / group (conv) or n_in (fc)
    const float* bias = nullptr;       ///< [out_channels]
    int64_t out_channels = 0;          ///< p (conv) or n_out (fc)
    int64_t kernel_h = 1;              ///< 1 for fc
    int64_t kernel_w = 1;              ///< 1 for fc
    const int64_t* segment_codewords = nullptr;  ///< optional [segments]: C_v of each segment
};

/// Convolution attributes with ONNX meanings; pads are [top, left, bottom, right]. Built by
/// aggregate initialisation in this field order.
struct ConvGeometry {
    int64_t stride_h = 1, stride_w = 1;
    int64_t pad_top = 0, pad_left = 0, pad_bottom = 0, pad_right = 0;
    int64_t dilation_h = 1, dilation_w = 1;
    int64_t group = 1;
};

/// Shape of an NCHW activation tensor.
struct Shape4 {
    int64_t n = 0, c = 0, h = 0, w = 0;
};

/// Checks an encoded weight (offsets, depth against segments*r, every code below its C_v) and
/// returns, per segment, the number of table rows a kernel must build: 1 + the largest code
/// used in that segment.
std::vector<int64_t> validate_encoded_weight(const EncodedWeight& weight);

/// Output shape of econv() for an input of shape `input`; throws if the geometry is invalid
/// or the output would be empty.
Shape4 econv_output_shape(const Shape4& input, const EncodedWeight& weight, const ConvGeometry& geometry);

/// Encoded 2-D convolution: y = Conv(x, decode(weight)) + bias.
/// x is NCHW fp32 of shape `input`; y must hold econv_output_shape(...) floats.
void econv(const float* x, const Shape4& input, const EncodedWeight& weight, const ConvGeometry& geometry,
           float* y);

/// Encoded fully-connected layer: y[m] = decode(weight) @ x[m] + bias for m < rows.
/// x is [rows, weight.depth] fp32; y is [rows, weight.out_channels] fp32.
void egemm(const float* x, int64_t rows, const EncodedWeight& weight, float* y);

// ---------------------------------------------------------------------------------------------
// Prepared fast layers (docs/runtime.md). A layer is built once at load: it validates codes, offsets
// and shapes once, owns copies of everything it needs (in kernel-friendly layouts), and picks
// a kernel for the CPU it runs on. run() is const and thread-safe.

/// Element type of the lookup table. fp32 is exact (up to summation order); the others trade
/// accuracy for table bandwidth: fp16 (~1e-4 relative RMS), int16 (~1e-4), int8 (~1e-2).
enum class LutPrecision { kFp32, kFp16, kInt16, kInt8 };

/// Instruction set a layer may use; kAuto picks the best this CPU supports. Forcing an ISA the
/// CPU lacks throws std::invalid_argument.
enum class LutIsa { kAuto, kAvx512, kAvx2, kScalar };

struct LutOptions {
    LutPrecision precision = LutPrecision::kFp32;
    int threads = 1;            ///< E-Conv: threads splitting strips of output rows; E-FC: unused
    /// int8: fixed activation step from calibration (largest |input| / 127: x ~ input_scale * q
    /// with q int8 for inputs with negative values; inputs >= 0 use steps of input_scale *
    /// 127/255, the same range over all uint8 levels); 0 = this input's range. Used where the
    /// table is built from quantised activations (AVX-512 VNNI, E-Conv and E-FC); the other
    /// int8 kernels build the table in fp32 and narrow it, so they validate this value but do
    /// not need it.
    float input_scale = 0.f;
    LutIsa isa = LutIsa::kAuto;
    /// Apply max(0, .) to the output: a Relu folded into the layer, so that no separate pass
    /// reads and writes the output again.
    bool relu = false;
};

/// Encoded 2-D convolution y = Conv(x, decode(weight)) + bias on lookup-table kernels.
class EConvLayer {
 public:
    EConvLayer(const EncodedWeight& w, const ConvGeometry& g, const LutOptions& opt);
    ~EConvLayer();
    EConvLayer(EConvLayer&&) noexcept;
    EConvLayer& operator=(EConvLayer&&) noexcept;

    /// Throws std::invalid_argument on a bad input shape or geometry.
    Shape4 output_shape(const Shape4& in) const;
    /// Floats of scratch run() needs for an input of shape `in` on `threads` threads (pass it to
    /// avoid an allocation); threads 0 means the LutOptions' count.
    size_t workspace_floats(const Shape4& in, int threads = 0) const;
    /// x is NCHW fp32 of shape `in`; y holds output_shape(in) floats; workspace is null or
    /// holds workspace_floats(in, threads) floats (64-byte alignment is not required). threads 0
    /// means the LutOptions' count.
    void run(const float* x, const Shape4& in, float* y, float* workspace = nullptr, int threads = 0) const;
    /// Kernel in use: "<fp32|fp16|int16|int8>-<avx512|avx2|scalar>".
    const char* kernel_name() const;

    struct Impl;

 private:
    std::unique_ptr<Impl> impl_;
};

/// Encoded fully-connected layer y[m] = decode(weight) @ x[m] + bias on lookup-table kernels.
class EGemmLayer {
 public:
    EGemmLayer(const EncodedWeight& w, const LutOptions& opt);
    ~EGemmLayer();
    EGemmLayer(EGemmLayer&&) noexcept;
    EGemmLayer& operator=(EGemmLayer&&) noexcept;

    int64_t in_features() const;
    int64_t out_features() const;
    /// x is [rows, in_features] fp32, y is [rows, out_features] fp32.
    void run(const float* x, int64_t rows, float* y) const;
    const char* kernel_name() const;

    struct Impl;

 private:
    std::unique_ptr<Impl> impl_;
};

/// Instruction-set features of this CPU the kernels care about, e.g.
/// "avx512f avx512bw avx512vl avx512vnni avx512vbmi avx2 fma f16c" (for benchmark headers).
std::string cpu_features();

}  // namespace neuralmerge
