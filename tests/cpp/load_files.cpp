// Loads every .nmpack file named on the command line and runs it once on inputs of ones (free
// dimensions set to 1). A file the runtime refuses prints "refused: <message>"; anything else it
// does (a crash, or a sanitizer report in the NEURALMERGE_SANITIZE build) is a bug.
//
//   nm_load_files a.nmpack b.nmpack ...   -> "<file>: ran" / "<file>: refused: ..." per file
#include <neuralmerge/executor.h>

#include <cstdio>
#include <string>
#include <utility>
#include <vector>

int main(int argc, char** argv) {
    int refused = 0, ran = 0;
    for (int i = 1; i < argc; ++i) {
        try {
            neuralmerge::Session session = neuralmerge::Session::from_file(argv[i]);
            std::vector<std::vector<float>> data;
            std::vector<std::pair<std::string, neuralmerge::TensorView>> feeds;
            for (const neuralmerge::TensorInfo& input : session.inputs()) {
                neuralmerge::TensorView view;
                size_t count = 1;
                for (int64_t d : input.shape) {
                    view.shape.push_back(d < 0 ? 1 : d);
                    count *= static_cast<size_t>(view.shape.back());
                }
                data.emplace_back(count, 1.0f);
                view.data = data.back().data();
                feeds.emplace_back(input.name, std::move(view));
            }
            session.run(feeds);
            ++ran;
            std::printf("%s: ran\n", argv[i]);
        } catch (const neuralmerge::ModelError& e) {
            ++refused;
            std::printf("%s: refused: %s\n", argv[i], e.what());
        } catch (const neuralmerge::InputError& e) {
            ++refused;
            std::printf("%s: refused: %s\n", argv[i], e.what());
        }
    }
    std::printf("ran %d, refused %d\n", ran, refused);
    return 0;
}
