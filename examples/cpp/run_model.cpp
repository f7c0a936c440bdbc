// Loads a packed merged model (.nmpack, written by `neuralmerge pack merged.onnx -o merged.nmpack`)
// and runs it without Python. Each input is read from a raw float32 file (NAME=FILE) or, when not
// given, filled with 0.5; free dimensions are 1. Prints every output's shape and arg-max; with
// --profile RUNS, then each node's mean time over RUNS more runs.
//
//   run_model merged.nmpack [--lut fp32|fp16|int16|int8] [--output NAME] [--profile RUNS] [NAME=input.f32 ...]
#include <neuralmerge/executor.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s MODEL.nmpack [--lut P] [--output NAME] [--profile RUNS] [NAME=FILE.f32 ...]\n",
                     argv[0]);
        return 2;
    }
    neuralmerge::SessionOptions options;
    std::vector<std::string> outputs;
    std::map<std::string, std::string> files;
    long profile_runs = 0;
    for (int i = 2; i < argc; ++i) {
        const std::string arg = argv[i];
        if (arg == "--lut" && i + 1 < argc) {
            try {
                options.precision = neuralmerge::parse_precision(argv[++i]);
            } catch (const std::invalid_argument& e) {
                std::fprintf(stderr, "error: %s\n", e.what());
                return 2;
            }
        } else if (arg == "--output" && i + 1 < argc) {
            outputs.emplace_back(argv[++i]);
        } else if (arg == "--profile" && i + 1 < argc) {
            profile_runs = std::strtol(argv[++i], nullptr, 10);
            if (profile_runs < 1) {
                std::fprintf(stderr, "error: --profile needs a number of runs >= 1, got '%s'\n", argv[i]);
                return 2;
            }
            options.profile = true;
        } else if (arg.find('=') != std::string::npos) {
            files[arg.substr(0, arg.find('='))] = arg.substr(arg.find('=') + 1);
        } else {
            std::fprintf(stderr, "error: unexpected argument '%s'\n", arg.c_str());
            return 2;
        }
    }
    try {
        neuralmerge::Session session = neuralmerge::Session::from_file(argv[1], options);
        for (const auto& [name, path] : files) {
            bool known = false;
            std::string names;
            for (const neuralmerge::TensorInfo& input : session.inputs()) {
                known |= input.name == name;
                names += (names.empty() ? "" : ", ") + input.name;
            }
            if (!known) {
                std::fprintf(stderr, "error: the model has no input '%s' (its inputs: %s)\n", name.c_str(), names.c_str());
                return 1;
            }
        }
        std::vector<std::vector<float>> data;
        std::vector<std::pair<std::string, neuralmerge::TensorView>> feeds;
        for (const neuralmerge::TensorInfo& input : session.inputs()) {
            neuralmerge::TensorView view;
            size_t count = 1;
            for (int64_t d : input.shape) {
                view.shape.push_back(d < 0 ? 1 : d);
                count *= static_cast<size_t>(view.shape.back());
            }
            std::vector<float> values(count, 0.5f);
            const auto file = files.find(input.name);
            if (file != files.end()) {
                std::ifstream in(file->second, std::ios::binary | std::ios::ate);
                if (!in) {
                    std::fprintf(stderr, "error: cannot open %s\n", file->second.c_str());
                    return 1;
                }
                const std::streamoff bytes = in.tellg();  // exactly one input's floats, no more, no less
                in.seekg(0);
                if (bytes != static_cast<std::streamoff>(count * sizeof(float)) ||
                    !in.read(reinterpret_cast<char*>(values.data()), static_cast<std::streamsize>(bytes))) {
                    std::fprintf(stderr, "error: %s holds %lld bytes, not the %zu float32 values of input '%s'\n",
                                 file->second.c_str(), static_cast<long long>(bytes), count, input.name.c_str());
                    return 1;
                }
            }
            data.push_back(std::move(values));
            view.data = data.back().data();
            feeds.emplace_back(input.name, std::move(view));
        }
        const std::vector<neuralmerge::Tensor> results = session.run(feeds, outputs);
        for (size_t k = 0; k < results.size(); ++k) {
            const std::string name = outputs.empty() ? session.outputs()[k].name : outputs[k];
            const neuralmerge::Tensor& t = results[k];
            size_t best = 0;
            for (size_t i = 1; i < t.data.size(); ++i) best = t.data[i] > t.data[best] ? i : best;
            std::string shape;
            for (int64_t d : t.shape) shape += (shape.empty() ? "" : "x") + std::to_string(d);
            std::printf("%s: %s, arg-max %zu (%.4f)\n", name.c_str(), shape.c_str(), best, t.data[best]);
        }
        if (profile_runs > 0) {
            session.reset_profile();  // the first run above planned buffers and warmed the caches
            for (long run = 0; run < profile_runs; ++run) session.run(feeds, outputs);
            std::printf("node times, mean of %ld runs:\n", profile_runs);
            for (const neuralmerge::NodeProfile& node : session.profile()) {
                std::printf("%10.1f us  %s  %s%s%s\n", node.seconds / static_cast<double>(node.calls) * 1e6,
                            node.name.c_str(), node.op.c_str(), node.kernel.empty() ? "" : "  ", node.kernel.c_str());
            }
        }
    } catch (const std::exception& e) {  // ModelError, InputError
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
