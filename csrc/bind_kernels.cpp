// Kernel bindings of neuralmerge._lut: numpy arrays in, C++ kernels (lut_kernels.h) out.
//
// The Python front (neuralmerge/runtime/kernels.py) converts dtypes and allocates outputs; this
// layer still checks every dtype, layout and shape itself, because a wrong array reaching C++
// would read out of bounds. Errors are std::invalid_argument, which Python sees as ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "neuralmerge/lut_kernels.h"

namespace py = pybind11;
namespace nm = neuralmerge;

namespace {

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

std::string shape_text(const py::array& a) {
    std::string text = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) text += (i ? ", " : "") + std::to_string(a.shape(i));
    return text + (a.ndim() == 1 ? ",)" : ")");
}

template <typename T>
void require_array(const py::array& a, const char* name, py::ssize_t ndim) {
    if (!py::isinstance<py::array_t<T>>(a)) {
        fail(std::string(name) + " must have dtype " + std::string(py::str(py::dtype::of<T>())) + ", got " +
             std::string(py::str(a.dtype())));
    }
    if (a.ndim() != ndim) {
        fail(std::string(name) + " must be " + std::to_string(ndim) + "-D, got shape " + shape_text(a));
    }
    if (!(a.flags() & py::array::c_style)) fail(std::string(name) + " must be C-contiguous");
}

void require_shape(const py::array& a, const char* name, const std::vector<py::ssize_t>& expected) {
    for (size_t i = 0; i < expected.size(); ++i) {
        if (a.shape(i) != expected[i]) {
            std::string want = "(";
            for (size_t j = 0; j < expected.size(); ++j) want += (j ? ", " : "") + std::to_string(expected[j]);
            fail(std::string(name) + " must have shape " + want + (expected.size() == 1 ? ",)" : ")") + ", got " +
                 shape_text(a));
        }
    }
}

bool is_float16(const py::array& a) { return a.dtype().kind() == 'f' && a.dtype().itemsize() == 2; }

// Builds an EncodedWeight over the caller's arrays; codes must be [out, kh, kw, rho] (conv,
// code_ndim 4) or [out, rho] (fc, code_ndim 2). A float16 codebook is accepted only where
// `allow_fp16` (the prepared layers widen it themselves).
nm::EncodedWeight encoded_weight(const py::array& codebook, const py::array& codes, const py::array& offsets,
                                 int64_t depth, const py::array& bias, py::ssize_t code_ndim,
                                 bool allow_fp16 = false) {
    const bool half = allow_fp16 && is_float16(codebook);
    if (half) {
        if (codebook.ndim() != 2) fail("codebook must be 2-D, got shape " + shape_text(codebook));
        if (!(codebook.flags() & py::array::c_style)) fail("codebook must be C-contiguous");
    } else {
        require_array<float>(codebook, "codebook", 2);
    }
    require_array<int64_t>(offsets, "offsets", 1);
    require_array<float>(bias, "bias", 1);
    nm::EncodedWeight w;
    if (py::isinstance<py::array_t<uint8_t>>(codes)) {
        require_array<uint8_t>(codes, "codes", code_ndim);
        w.code_type = nm::CodeType::kUInt8;
    } else {
        require_array<uint16_t>(codes, "codes", code_ndim);
        w.code_type = nm::CodeType::kUInt16;
    }
    w.out_channels = codes.shape(0);
    w.segments = codes.shape(code_ndim - 1);
    if (code_ndim == 4) {
        w.kernel_h = codes.shape(1);
        w.kernel_w = codes.shape(2);
    }
    require_shape(offsets, "offsets", {static_cast<py::ssize_t>(w.segments)});
    require_shape(bias, "bias", {static_cast<py::ssize_t>(w.out_channels)});
    if (half) {
        w.codebook_fp16 = static_cast<const uint16_t*>(codebook.data());
    } else {
        w.codebook = static_cast<const float*>(codebook.data());
    }
    w.codebook_rows = codebook.shape(0);
    w.segment_length = codebook.shape(1);
    w.codes = codes.data();
    w.offsets = static_cast<const int64_t*>(offsets.data());
    w.depth = depth;
    w.bias = static_cast<const float*>(bias.data());
    return w;
}

nm::Shape4 shape4(const py::array& x) {
    return nm::Shape4{x.shape(0), x.shape(1), x.shape(2), x.shape(3)};
}

nm::ConvGeometry geometry(const std::array<int64_t, 2>& strides, const std::array<int64_t, 4>& pads,
                          const std::array<int64_t, 2>& dilations, int64_t group) {
    return nm::ConvGeometry{strides[0], strides[1], pads[0], pads[1], pads[2], pads[3], dilations[0], dilations[1],
                            group};
}

std::array<int64_t, 4> econv_output_shape(const py::array& x, const py::array& codebook, const py::array& codes,
                                          const py::array& offsets, int64_t depth, const py::array& bias,
                                          const std::array<int64_t, 2>& strides, const std::array<int64_t, 4>& pads,
                                          const std::array<int64_t, 2>& dilations, int64_t group) {
    require_array<float>(x, "x", 4);
    const nm::EncodedWeight w = encoded_weight(codebook, codes, offsets, depth, bias, 4);
    const nm::Shape4 out = nm::econv_output_shape(shape4(x), w, geometry(strides, pads, dilations, group));
    return {out.n, out.c, out.h, out.w};
}

void econv(const py::array& x, const py::array& codebook, const py::array& codes, const py::array& offsets,
           int64_t depth, const py::array& bias, const std::array<int64_t, 2>& strides,
           const std::array<int64_t, 4>& pads, const std::array<int64_t, 2>& dilations, int64_t group,
           py::array out) {
    require_array<float>(x, "x", 4);
    const nm::EncodedWeight w = encoded_weight(codebook, codes, offsets, depth, bias, 4);
    const nm::ConvGeometry g = geometry(strides, pads, dilations, group);
    const nm::Shape4 in = shape4(x);
    const nm::Shape4 o = nm::econv_output_shape(in, w, g);
    require_array<float>(out, "out", 4);
    require_shape(out, "out", {o.n, o.c, o.h, o.w});
    if (!out.writeable()) fail("out must be writeable");
    const auto* x_data = static_cast<const float*>(x.data());
    auto* y_data = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release release;
    nm::econv(x_data, in, w, g, y_data);
}

void egemm(const py::array& x, const py::array& codebook, const py::array& codes, const py::array& offsets,
           int64_t depth, const py::array& bias, py::array out) {
    require_array<float>(x, "x", 2);
    const nm::EncodedWeight w = encoded_weight(codebook, codes, offsets, depth, bias, 2);
    if (x.shape(1) != depth) {
        fail("x has " + std::to_string(x.shape(1)) + " features but depth is " + std::to_string(depth));
    }
    require_array<float>(out, "out", 2);
    require_shape(out, "out", {x.shape(0), static_cast<py::ssize_t>(w.out_channels)});
    if (!out.writeable()) fail("out must be writeable");
    const auto* x_data = static_cast<const float*>(x.data());
    auto* y_data = static_cast<float*>(out.mutable_data());
    const int64_t rows = x.shape(0);
    py::gil_scoped_release release;
    nm::egemm(x_data, rows, w, y_data);
}

nm::LutOptions lut_options(const std::string& lut, int threads, float input_scale, const std::string& isa) {
    nm::LutOptions options;
    if (lut == "fp32") {
        options.precision = nm::LutPrecision::kFp32;
    } else if (lut == "fp16") {
        options.precision = nm::LutPrecision::kFp16;
    } else if (lut == "int16") {
        options.precision = nm::LutPrecision::kInt16;
    } else if (lut == "int8") {
        options.precision = nm::LutPrecision::kInt8;
    } else {
        fail("lut must be fp32, fp16, int16 or int8, got '" + lut + "'");
    }
    if (isa == "auto") {
        options.isa = nm::LutIsa::kAuto;
    } else if (isa == "avx512") {
        options.isa = nm::LutIsa::kAvx512;
    } else if (isa == "avx2") {
        options.isa = nm::LutIsa::kAvx2;
    } else if (isa == "scalar") {
        options.isa = nm::LutIsa::kScalar;
    } else {
        fail("isa must be auto, avx512, avx2 or scalar, got '" + isa + "'");
    }
    options.threads = threads;
    options.input_scale = input_scale;
    return options;
}

// Points w.segment_codewords at `counts` (int64 [rho]) unless it is None.
void attach_segment_codewords(nm::EncodedWeight& w, const py::object& counts) {
    if (counts.is_none()) return;
    const auto array = counts.cast<py::array>();
    require_array<int64_t>(array, "segment_codewords", 1);
    require_shape(array, "segment_codewords", {static_cast<py::ssize_t>(w.segments)});
    w.segment_codewords = static_cast<const int64_t*>(array.data());
}

nm::EConvLayer make_econv_layer(const py::array& codebook, const py::array& codes, const py::array& offsets,
                                int64_t depth, const py::array& bias, const std::array<int64_t, 2>& strides,
                                const std::array<int64_t, 4>& pads, const std::array<int64_t, 2>& dilations,
                                int64_t group, const std::string& lut, int threads, float input_scale,
                                const py::object& segment_codewords, const std::string& isa) {
    nm::EncodedWeight w = encoded_weight(codebook, codes, offsets, depth, bias, 4, true);
    attach_segment_codewords(w, segment_codewords);
    return nm::EConvLayer(w, geometry(strides, pads, dilations, group), lut_options(lut, threads, input_scale, isa));
}

std::array<int64_t, 4> econv_layer_output_shape(const nm::EConvLayer& layer, const std::array<int64_t, 4>& shape) {
    const nm::Shape4 out = layer.output_shape(nm::Shape4{shape[0], shape[1], shape[2], shape[3]});
    return {out.n, out.c, out.h, out.w};
}

void econv_layer_run(const nm::EConvLayer& layer, const py::array& x, py::array out) {
    require_array<float>(x, "x", 4);
    const nm::Shape4 in = shape4(x);
    const nm::Shape4 o = layer.output_shape(in);
    require_array<float>(out, "out", 4);
    require_shape(out, "out", {o.n, o.c, o.h, o.w});
    if (!out.writeable()) fail("out must be writeable");
    const auto* x_data = static_cast<const float*>(x.data());
    auto* y_data = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release release;
    layer.run(x_data, in, y_data);
}

nm::EGemmLayer make_egemm_layer(const py::array& codebook, const py::array& codes, const py::array& offsets,
                                int64_t depth, const py::array& bias, const std::string& lut, int threads,
                                float input_scale, const py::object& segment_codewords, const std::string& isa) {
    nm::EncodedWeight w = encoded_weight(codebook, codes, offsets, depth, bias, 2, true);
    attach_segment_codewords(w, segment_codewords);
    return nm::EGemmLayer(w, lut_options(lut, threads, input_scale, isa));
}

void egemm_layer_run(const nm::EGemmLayer& layer, const py::array& x, py::array out) {
    require_array<float>(x, "x", 2);
    if (x.shape(1) != layer.in_features()) {
        fail("x has " + std::to_string(x.shape(1)) + " features but the layer takes " +
             std::to_string(layer.in_features()));
    }
    require_array<float>(out, "out", 2);
    require_shape(out, "out", {x.shape(0), static_cast<py::ssize_t>(layer.out_features())});
    if (!out.writeable()) fail("out must be writeable");
    const auto* x_data = static_cast<const float*>(x.data());
    auto* y_data = static_cast<float*>(out.mutable_data());
    const int64_t rows = x.shape(0);
    py::gil_scoped_release release;
    layer.run(x_data, rows, y_data);
}

}  // namespace

void bind_kernels(py::module_& m) {
    py::class_<nm::EConvLayer>(m, "EConvLayer",
                               "Prepared encoded convolution on lookup-table kernels (copies what it needs).")
        .def(py::init(&make_econv_layer), py::arg("codebook"), py::arg("codes"), py::arg("offsets"),
             py::arg("depth"), py::arg("bias"), py::arg("strides"), py::arg("pads"), py::arg("dilations"),
             py::arg("group"), py::arg("lut"), py::arg("threads"), py::arg("input_scale"),
             py::arg("segment_codewords"), py::arg("isa"))
        .def("output_shape", &econv_layer_output_shape, py::arg("shape"),
             "Output shape (N, p, OH, OW) for an input of shape (N, C, H, W).")
        .def("run", &econv_layer_run, py::arg("x"), py::arg("out"), "Writes the layer's output for x into out.")
        .def_property_readonly("kernel_name", &nm::EConvLayer::kernel_name);
    py::class_<nm::EGemmLayer>(m, "EGemmLayer",
                               "Prepared encoded fully-connected layer on lookup-table kernels.")
        .def(py::init(&make_egemm_layer), py::arg("codebook"), py::arg("codes"), py::arg("offsets"),
             py::arg("depth"), py::arg("bias"), py::arg("lut"), py::arg("threads"), py::arg("input_scale"),
             py::arg("segment_codewords"), py::arg("isa"))
        .def_property_readonly("in_features", &nm::EGemmLayer::in_features)
        .def_property_readonly("out_features", &nm::EGemmLayer::out_features)
        .def("run", &egemm_layer_run, py::arg("x"), py::arg("out"), "Writes the layer's output for x [rows, n_in].")
        .def_property_readonly("kernel_name", &nm::EGemmLayer::kernel_name);
    m.def("cpu_features", &nm::cpu_features, "Instruction-set features of this CPU the kernels use.");

    m.def("econv_output_shape", &econv_output_shape, py::arg("x"), py::arg("codebook"), py::arg("codes"),
          py::arg("offsets"), py::arg("depth"), py::arg("bias"), py::arg("strides"), py::arg("pads"),
          py::arg("dilations"), py::arg("group"),
          "Output shape (N, p, OH, OW) of econv for these inputs; raises ValueError if they are invalid.");
    m.def("econv", &econv, py::arg("x"), py::arg("codebook"), py::arg("codes"), py::arg("offsets"),
          py::arg("depth"), py::arg("bias"), py::arg("strides"), py::arg("pads"), py::arg("dilations"),
          py::arg("group"), py::arg("out"),
          "Encoded 2-D convolution into `out` (float32, C-contiguous, econv_output_shape).");
    m.def("egemm", &egemm, py::arg("x"), py::arg("codebook"), py::arg("codes"), py::arg("offsets"),
          py::arg("depth"), py::arg("bias"), py::arg("out"),
          "Encoded fully-connected layer into `out` (float32 [rows, n_out]).");
}
