// Executor bindings of neuralmerge._lut: a Session over a .nmpack file or buffer (see
// neuralmerge/runtime/session.py for the Python front). Feeds are checked here before C++ reads
// them: dtype float32 exactly (no silent casts), any layout (copied to C order if needed).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "bindings.h"
#include "neuralmerge/executor.h"
#include "neuralmerge/lut_kernels.h"

namespace py = pybind11;
namespace nm = neuralmerge;

namespace {

nm::SessionOptions session_options(const std::string& lut, int threads, bool profile) {
    nm::SessionOptions options;
    options.precision = nm::parse_precision(lut);
    options.threads = threads;
    options.profile = profile;
    return options;
}

py::list describe(const std::vector<nm::TensorInfo>& infos) {
    py::list out;
    for (const nm::TensorInfo& info : infos) out.append(py::make_tuple(info.name, info.dtype, info.shape));
    return out;
}

py::list run(nm::Session& session, const py::dict& feeds, const std::vector<std::string>& outputs) {
    std::vector<py::array_t<float, py::array::c_style>> keep;  // owns C-ordered copies while C++ runs
    std::vector<std::pair<std::string, nm::TensorView>> views;
    for (const auto& item : feeds) {
        const std::string name = py::str(item.first);
        if (!py::isinstance<py::array>(item.second)) throw nm::InputError("input '" + name + "' must be a numpy array");
        const py::array array = py::reinterpret_borrow<py::array>(item.second);
        if (!py::isinstance<py::array_t<float>>(array)) {
            throw nm::InputError("input '" + name + "' must have dtype float32, got " + std::string(py::str(array.dtype())));
        }
        keep.push_back(py::array_t<float, py::array::c_style>::ensure(array));
        nm::TensorView view;
        view.data = keep.back().data();
        view.shape.assign(array.shape(), array.shape() + array.ndim());
        views.emplace_back(name, std::move(view));
    }
    std::vector<nm::Tensor> results;
    {
        py::gil_scoped_release release;
        results = session.run(views, outputs);
    }
    py::list out;
    for (nm::Tensor& t : results) {
        auto* data = new std::vector<float>(std::move(t.data));  // handed to numpy without a copy
        py::capsule owner(data, [](void* p) { delete static_cast<std::vector<float>*>(p); });
        out.append(py::array_t<float>(t.shape, data->data(), owner));
    }
    return out;
}

}  // namespace

void bind_executor(py::module_& m) {
    // Messages may quote bytes of a corrupt file: decode them leniently rather than fail in
    // the translation (pybind11's default translator needs valid UTF-8).
    static py::exception<nm::ModelError> model_error(m, "ModelError", PyExc_ValueError);
    static py::exception<nm::InputError> input_error(m, "InputError", PyExc_ValueError);
    py::register_exception_translator([](std::exception_ptr error) {
        const auto raise = [](PyObject* type, const char* what) {
            PyObject* message = PyUnicode_DecodeUTF8(what, static_cast<Py_ssize_t>(std::strlen(what)), "replace");
            PyErr_SetObject(type, message);
            Py_XDECREF(message);
        };
        try {
            if (error) std::rethrow_exception(error);
        } catch (const nm::ModelError& e) {
            raise(model_error.ptr(), e.what());
        } catch (const nm::InputError& e) {
            raise(input_error.ptr(), e.what());
        }
    });

    py::class_<nm::Session>(m, "Session", "A loaded .nmpack model (use neuralmerge.runtime.Session).")
        .def_static("from_file", [](const std::string& path, const std::string& lut, int threads, bool profile) {
            py::gil_scoped_release release;
            return nm::Session::from_file(path, session_options(lut, threads, profile));
        }, py::arg("path"), py::arg("lut") = "fp32", py::arg("threads") = 1, py::arg("profile") = false)
        .def_static("from_buffer", [](const py::bytes& data, const std::string& lut, int threads, bool profile) {
            const std::string_view bytes = data;
            py::gil_scoped_release release;
            return nm::Session::from_buffer(bytes.data(), bytes.size(), session_options(lut, threads, profile));
        }, py::arg("data"), py::arg("lut") = "fp32", py::arg("threads") = 1, py::arg("profile") = false)
        .def("inputs", [](const nm::Session& s) { return describe(s.inputs()); }, "[(name, dtype, shape)], -1 = free")
        .def("outputs", [](const nm::Session& s) { return describe(s.outputs()); }, "[(name, dtype, shape)], -1 = free")
        .def("run", &run, py::arg("feeds"), py::arg("outputs") = std::vector<std::string>{},
             "Run on {name: float32 array}; returns the requested outputs (all when empty) in order.")
        .def("inputs_needed", &nm::Session::inputs_needed, py::arg("output"),
             "The graph inputs an output depends on, in input order.")
        .def("describe_kernels", &nm::Session::describe_kernels, "One line per E-layer: node, op, kernel.")
        .def("profile", [](const nm::Session& s) {
            py::list out;
            for (const nm::NodeProfile& p : s.profile()) out.append(py::make_tuple(p.name, p.op, p.kernel, p.calls, p.seconds));
            return out;
        }, "[(node, op, kernel, calls, seconds)] of the nodes that ran since the last reset (profiling sessions).")
        .def("reset_profile", &nm::Session::reset_profile, "Zero every node's calls and seconds.");
    m.def("cpu_features", &nm::cpu_features, "Instruction-set features of this CPU the kernels use.");
}
