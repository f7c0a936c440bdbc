// Session: compiles every node of a packed model at load, plans buffers per (requested outputs,
// input shapes) and runs the plan.
//
// Planning infers every shape, evaluates the integer shape arithmetic, lets views and in-place
// elementwise ops share memory, and packs all remaining tensors into one arena by liveness:
// a tensor's bytes are reused as soon as the last node that reads it has run.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "../kernels/parallel.h"
#include "model.h"
#include "neuralmerge/executor.h"
#include "op.h"

namespace neuralmerge {

using detail::Dims;
using detail::DType;
using detail::Op;
using detail::ValueInfo;

namespace {

constexpr size_t kMaxCachedPlans = 8;
// Activations and workspaces of one plan, in floats (4 GiB): a small file can ask for far more
// (a Resize by 32768, padding of 2^14 around a 1x1 input), which no device has to give.
constexpr size_t kMaxPlanFloats = size_t{1} << 30;
constexpr int kNoValue = -1;

// A Relu whose input is an E-layer's output and nothing else's (not a graph output either) is
// folded into the layer, which clamps as it writes: one pass less over every activation that a
// Relu follows (the LeNet pair spent ~3% of its int8 time in those passes).
std::vector<detail::Node> fold_relus(const detail::PackedModel& model) {
    std::unordered_map<std::string, int> uses;
    std::unordered_map<std::string, size_t> producer;
    for (size_t i = 0; i < model.nodes.size(); ++i) {
        for (const std::string& name : model.nodes[i].inputs) ++uses[name];
        for (const std::string& name : model.nodes[i].outputs) producer[name] = i;
    }
    for (const TensorInfo& output : model.outputs) ++uses[output.name];
    std::vector<detail::Node> nodes = model.nodes;
    std::vector<bool> folded(nodes.size(), false);
    for (size_t j = 0; j < nodes.size(); ++j) {
        const detail::Node& relu = nodes[j];
        if (relu.op != "Relu" || (!relu.domain.empty() && relu.domain != "ai.onnx") || relu.inputs.size() != 1 ||
            relu.outputs.size() != 1 || relu.inputs[0].empty() || uses[relu.inputs[0]] != 1) {
            continue;
        }
        const auto found = producer.find(relu.inputs[0]);
        if (found == producer.end()) continue;  // a graph input
        detail::Node& layer = nodes[found->second];
        if (layer.domain != "ai.neuralmerge" || (layer.op != "EConv" && layer.op != "EGemm") ||
            layer.outputs.size() != 1 || layer.fused_relu) {
            continue;
        }
        layer.outputs[0] = relu.outputs[0];
        layer.fused_relu = true;
        folded[j] = true;
    }
    std::vector<detail::Node> kept;
    for (size_t i = 0; i < nodes.size(); ++i) {
        if (!folded[i]) kept.push_back(std::move(nodes[i]));
    }
    return kept;
}

// Where a root tensor's bytes live.
enum class Storage { kNone, kConstant, kFeed, kArena };

// How a plan with independent tasks runs. Undecided plans try both ways on their first runs
// and keep the faster: whether running whole tasks side by side (one thread each) beats
// splitting every op over the threads depends on the tasks' balance and the ops' sizes (the
// LeNet pair: 2x faster side by side; the VGG-avg + ZF pair, one task 5x the other: slower).
enum class TaskMode { kUndecided, kOneByOne, kSideBySide };
constexpr int kWarmupRuns = 1, kTrialRuns = 3;  // per way, after the warm-up; the fastest counts

struct Plan {
    std::vector<ValueInfo> infos;        // per value id
    std::vector<int> root;               // per value id: the value whose memory it uses
    std::vector<Storage> storage;        // per root
    std::vector<size_t> offset;          // per root: arena offset (floats) or feed index
    std::vector<size_t> steps;           // nodes to run, in order
    std::vector<int> outputs;            // value ids of the requested outputs
    std::vector<float> arena, workspace;
    // Independent tasks (with threads >= 2): steps that pass no value to each other, e.g. the
    // models of a merged file, which share only weights. Each task has its own arena region and
    // workspace, so tasks may run side by side, one per thread.
    std::vector<std::vector<size_t>> tasks;  // step indices, in order
    std::vector<size_t> task_workspace;      // per task: offset into workspace
    TaskMode mode = TaskMode::kOneByOne;
    int runs = 0;  // while undecided
    double fastest_one_by_one = INFINITY, fastest_side_by_side = INFINITY;
};


size_t round_up(size_t n) { return (n + 15) / 16 * 16; }  // 64-byte alignment in floats

// First-fit allocator over one arena: best-fitting free block, else grow at the end.
class ArenaAllocator {
   public:
    size_t allocate(size_t size) {
        size = std::max<size_t>(round_up(size), 16);
        auto best = blocks_.end();
        for (auto it = blocks_.begin(); it != blocks_.end(); ++it) {
            if (it->free && it->size >= size && (best == blocks_.end() || it->size < best->size)) best = it;
        }
        if (best == blocks_.end()) {
            if (!blocks_.empty() && blocks_.back().free) {  // grow the free tail block
                blocks_.back().free = false;
                blocks_.back().size = size;
                end_ = std::max(end_, blocks_.back().offset + size);
                return blocks_.back().offset;
            }
            blocks_.push_back({end_, size, false});
            end_ += size;
            return blocks_.back().offset;
        }
        const size_t offset = best->offset, spare = best->size - size;
        best->free = false;
        best->size = size;
        if (spare > 0) blocks_.insert(best + 1, Block{offset + size, spare, true});  // split
        return offset;
    }

    void release(size_t offset) {
        for (size_t i = 0; i < blocks_.size(); ++i) {
            if (blocks_[i].offset != offset) continue;
            blocks_[i].free = true;
            if (i + 1 < blocks_.size() && blocks_[i + 1].free) {
                blocks_[i].size += blocks_[i + 1].size;
                blocks_.erase(blocks_.begin() + static_cast<long>(i) + 1);
            }
            if (i > 0 && blocks_[i - 1].free) {
                blocks_[i - 1].size += blocks_[i].size;
                blocks_.erase(blocks_.begin() + static_cast<long>(i));
            }
            return;
        }
    }

    size_t size() const { return end_; }

   private:
    struct Block {
        size_t offset, size;
        bool free;
    };
    std::vector<Block> blocks_;
    size_t end_ = 0;
};

}  // namespace

class SessionImpl {
   public:
    SessionImpl(std::shared_ptr<const detail::PackedModel> model, const SessionOptions& options)
        : model_(std::move(model)), options_(options) {
        if (options.threads < 1 || options.threads > 1024) throw std::invalid_argument("threads must be in [1, 1024]");
        detail::use_single_threaded_blas();  // dense ops split their sgemm over our own workers
        for (const auto& [name, constant] : model_->constants) {
            const int id = add_value(name);
            ValueInfo info;
            info.dtype = constant.dtype;
            info.shape = constant.shape;
            if (constant.dtype == DType::kFloat32) info.constant = static_cast<const float*>(constant.data);
            if (constant.dtype == DType::kInt64 && constant.numel <= detail::kMaxKnownInts) {
                const auto* p = static_cast<const int64_t*>(constant.data);
                info.known = true;
                info.ints.assign(p, p + constant.numel);
            }
            constant_infos_[id] = std::move(info);
        }
        for (const TensorInfo& input : model_->inputs) input_ids_.push_back(add_value(input.name));
        nodes_ = fold_relus(*model_);
        for (const detail::Node& node : nodes_) {
            std::vector<int> ins, outs;
            for (const std::string& name : node.inputs) ins.push_back(name.empty() ? kNoValue : values_.at(name));
            for (const std::string& name : node.outputs) outs.push_back(name.empty() ? kNoValue : add_value(name));
            node_inputs_.push_back(std::move(ins));
            node_outputs_.push_back(std::move(outs));
            ops_.push_back(detail::make_op(node, *model_, options_));
        }
        node_calls_.assign(nodes_.size(), 0);
        node_seconds_.assign(nodes_.size(), 0.0);
        release_copied_constants();
        for (const TensorInfo& output : model_->outputs) output_ids_.push_back(values_.at(output.name));

        // Plan once for every output with free dimensions set to 1: shape errors surface at load.
        std::vector<Dims> shapes;
        for (const TensorInfo& input : model_->inputs) {
            Dims s = input.shape;
            for (int64_t& d : s) d = d < 0 ? 1 : d;
            shapes.push_back(s);
        }
        std::vector<bool> fed(model_->inputs.size(), true);
        const std::unique_ptr<Plan> plan = make_plan(output_ids_, shapes, fed);
        // Outputs report the shapes the graph computes: a file's declared shapes can be wrong
        // (onnx's shape inference and onnxruntime disagree on some ceil_mode pools, and
        // onnxruntime only warns). Dimensions declared free stay free.
        outputs_ = model_->outputs;
        for (size_t i = 0; i < outputs_.size(); ++i) {
            Dims& declared = outputs_[i].shape;
            const Dims& computed = plan->infos[static_cast<size_t>(output_ids_[i])].shape;
            if (declared.size() != computed.size()) {
                declared = computed;
                continue;
            }
            for (size_t d = 0; d < computed.size(); ++d) declared[d] = declared[d] < 0 ? -1 : computed[d];
        }
    }

    const std::vector<TensorInfo>& inputs() const { return model_->inputs; }
    const std::vector<TensorInfo>& outputs() const { return outputs_; }

    std::vector<Tensor> run(const std::vector<std::pair<std::string, TensorView>>& feeds,
                            const std::vector<std::string>& output_names) {
        std::vector<int> wanted;
        std::vector<std::string> wanted_names = output_names;
        if (wanted_names.empty()) {
            for (const TensorInfo& o : model_->outputs) wanted_names.push_back(o.name);
        }
        for (const std::string& name : wanted_names) {
            const auto it = std::find_if(model_->outputs.begin(), model_->outputs.end(), [&](const TensorInfo& o) { return o.name == name; });
            if (it == model_->outputs.end()) throw InputError("unknown output '" + name + "'; the model's outputs are: " + names(model_->outputs));
            wanted.push_back(values_.at(name));
        }

        // Check every feed against the declared inputs before touching its data.
        std::vector<const float*> data(model_->inputs.size(), nullptr);
        std::vector<Dims> shapes(model_->inputs.size());
        std::vector<bool> fed(model_->inputs.size(), false);
        for (const auto& [name, view] : feeds) {
            const auto it = std::find_if(model_->inputs.begin(), model_->inputs.end(), [&](const TensorInfo& i) { return i.name == name; });
            if (it == model_->inputs.end()) throw InputError("unknown input '" + name + "'; the model's inputs are: " + names(model_->inputs));
            const size_t index = static_cast<size_t>(it - model_->inputs.begin());
            if (fed[index]) throw InputError("input '" + name + "' is fed twice");
            check_feed(*it, view);
            fed[index] = true;
            data[index] = view.data;
            shapes[index] = view.shape;
        }

        std::lock_guard<std::mutex> lock(mutex_);
        std::string key;
        for (int id : wanted) key += std::to_string(id) + ",";
        for (size_t i = 0; i < shapes.size(); ++i) key += (fed[i] ? detail::dims_text(shapes[i]) : "-") + ";";
        auto found = plans_.find(key);
        if (found == plans_.end()) {
            if (plans_.size() >= kMaxCachedPlans) plans_.clear();
            std::unique_ptr<Plan> plan;
            try {
                plan = make_plan(wanted, shapes, fed);
            } catch (const ModelError& e) {
                throw InputError(std::string("the model cannot run on these input shapes: ") + e.what());
            }
            found = plans_.emplace(key, std::move(plan)).first;
        }
        return execute(*found->second, data);
    }

    // The graph inputs `output` depends on, in input order: a walk back from it over the nodes.
    std::vector<std::string> inputs_needed(const std::string& output) const {
        const auto found = std::find_if(model_->outputs.begin(), model_->outputs.end(),
                                        [&](const TensorInfo& info) { return info.name == output; });
        if (found == model_->outputs.end()) {
            throw InputError("no output named '" + output + "' (outputs: " + names(model_->outputs) + ")");
        }
        std::vector<bool> needed, needed_node;
        walk_back({values_.at(output)}, needed, needed_node);
        std::vector<std::string> inputs;
        for (size_t i = 0; i < input_ids_.size(); ++i) {
            if (needed[input_ids_[i]]) inputs.push_back(model_->inputs[i].name);
        }
        return inputs;
    }

    std::vector<std::string> describe_kernels() const {
        std::vector<std::string> lines;
        for (const auto& op : ops_) {
            if (!op->kernel().empty()) lines.push_back(op->node().name + ": " + op->node().op + " " + op->kernel());
        }
        return lines;
    }

    std::vector<NodeProfile> profile() {
        std::lock_guard<std::mutex> lock(mutex_);
        std::vector<NodeProfile> nodes;
        for (size_t n = 0; n < ops_.size(); ++n) {
            if (node_calls_[n] == 0) continue;
            const detail::Node& node = ops_[n]->node();
            nodes.push_back({node.name, node.op, ops_[n]->kernel(), node_calls_[n], node_seconds_[n]});
        }
        return nodes;
    }

    void reset_profile() {
        std::lock_guard<std::mutex> lock(mutex_);
        std::fill(node_calls_.begin(), node_calls_.end(), 0);
        std::fill(node_seconds_.begin(), node_seconds_.end(), 0.0);
    }

   private:
    // Constants that no op reads at run time (E-layers copy their codebooks, codes, offsets and
    // biases into their own layouts when they are built; plans only pass such pointers along, and
    // int64 constants were copied into constant_infos_) hand their whole pages back to the OS:
    // E-layer tensors are most of a merged file (55 of the VGG-16 + ZF-Net pair's 86 MiB).
    // Reading such a page again would see zeros, never fault.
    void release_copied_constants() const {
#if defined(__linux__)
        std::unordered_set<std::string> read;
        for (const auto& op : ops_) {
            const std::vector<std::string>& inputs = op->node().inputs;
            for (size_t i = 0; i < inputs.size(); ++i) {
                if (op->reads_at_run(i)) read.insert(inputs[i]);
            }
        }
        for (const TensorInfo& output : model_->outputs) read.insert(output.name);
        const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
        for (const auto& [name, constant] : model_->constants) {
            if (read.count(name) || !constant.data) continue;
            const auto first = reinterpret_cast<uintptr_t>(constant.data);
            const uintptr_t end = first + static_cast<uintptr_t>(constant.numel) * detail::dtype_size(constant.dtype);
            const uintptr_t start = (first + page - 1) / page * page, stop = end / page * page;
            if (stop > start) madvise(reinterpret_cast<void*>(start), stop - start, MADV_DONTNEED);
        }
#endif
    }

    static std::string names(const std::vector<TensorInfo>& infos) {
        std::string text;
        for (const TensorInfo& i : infos) text += (text.empty() ? "" : ", ") + i.name;
        return text;
    }

    static void check_feed(const TensorInfo& info, const TensorView& view) {
        const std::string where = "input '" + info.name + "'";
        if (view.shape.size() != info.shape.size()) {
            throw InputError(where + " must have rank " + std::to_string(info.shape.size()) + " (shape " +
                             detail::dims_text(info.shape) + ", -1 = any), got shape " + detail::dims_text(view.shape));
        }
        int64_t count = 1;
        for (size_t i = 0; i < view.shape.size(); ++i) {
            const int64_t d = view.shape[i];
            if (d < 1 || d > detail::kMaxElements || count > detail::kMaxElements / d) {
                throw InputError(where + " has an empty or too large shape " + detail::dims_text(view.shape));
            }
            count *= d;
            if (info.shape[i] >= 0 && d != info.shape[i]) {
                throw InputError(where + " must have shape " + detail::dims_text(info.shape) + " (-1 = any), got " +
                                 detail::dims_text(view.shape));
            }
        }
        if (!view.data) throw InputError(where + " has no data");
        // A NaN or infinity would come out as a plausible answer (max-pooling and the fused ReLUs
        // map NaN to 0): refuse it. An exponent of all ones marks both; integer ops vectorise.
        uint32_t non_finite = 0;
        for (int64_t i = 0; i < count; ++i) {
            uint32_t bits;
            std::memcpy(&bits, view.data + i, sizeof bits);
            non_finite |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
        }
        if (non_finite) throw InputError(where + " holds NaN or infinite values");
    }

    int add_value(const std::string& name) {
        const int id = static_cast<int>(values_.size());
        values_.emplace(name, id);
        return id;
    }

    // The values and nodes the `wanted` values depend on: a walk back over the nodes (file order is
    // topological).
    void walk_back(const std::vector<int>& wanted, std::vector<bool>& needed_value,
                   std::vector<bool>& needed_node) const {
        needed_value.assign(values_.size(), false);
        needed_node.assign(ops_.size(), false);
        for (int id : wanted) needed_value[id] = true;
        for (size_t n = ops_.size(); n-- > 0;) {
            bool used = false;
            for (int id : node_outputs_[n]) used |= id != kNoValue && needed_value[id];
            if (!used) continue;
            needed_node[n] = true;
            for (int id : node_inputs_[n]) {
                if (id != kNoValue) needed_value[id] = true;
            }
        }
    }

    std::unique_ptr<Plan> make_plan(const std::vector<int>& wanted, const std::vector<Dims>& shapes, const std::vector<bool>& fed) {
        const size_t value_count = values_.size(), node_count = ops_.size();
        std::vector<int> producer(value_count, -1);
        for (size_t n = 0; n < node_count; ++n) {
            for (int id : node_outputs_[n]) {
                if (id != kNoValue) producer[id] = static_cast<int>(n);
            }
        }
        std::vector<bool> needed_value, needed_node;
        walk_back(wanted, needed_value, needed_node);

        auto plan = std::make_unique<Plan>();
        plan->infos.resize(value_count);
        plan->root.assign(value_count, kNoValue);
        plan->storage.assign(value_count, Storage::kNone);
        plan->offset.assign(value_count, 0);
        plan->outputs = wanted;
        std::vector<bool> ready(value_count, false);
        for (const auto& [id, info] : constant_infos_) {
            plan->infos[id] = info;
            ready[id] = true;
            plan->root[id] = id;
            plan->storage[id] = info.dtype == DType::kFloat32 ? Storage::kConstant : Storage::kNone;
        }
        for (size_t i = 0; i < input_ids_.size(); ++i) {
            const int id = input_ids_[i];
            if (!fed[i]) {
                if (needed_value[id]) {
                    throw InputError("missing feed for input '" + model_->inputs[i].name + "', which the requested outputs need");
                }
                continue;
            }
            plan->infos[id] = detail::float_value(shapes[i]);
            ready[id] = true;
            plan->root[id] = id;
            plan->storage[id] = Storage::kFeed;
            plan->offset[id] = i;
        }

        // Shapes, plan-time values and which nodes must run.
        std::vector<int64_t> last_use(value_count, -1);
        for (size_t n = 0; n < node_count; ++n) {
            if (!needed_node[n]) continue;
            const Op& op = *ops_[n];
            detail::Infos in;
            for (int id : node_inputs_[n]) in.push_back(id == kNoValue ? nullptr : &plan->infos[id]);
            std::vector<ValueInfo> out;
            try {
                out = op.infer(in);
            } catch (const ModelError& error) {  // shape helpers know no node: name it here
                const std::string message = error.what(), where = op.node().where();
                if (message.find(where) != std::string::npos) throw;
                detail::model_error(where + ": " + message);
            }
            const std::vector<int>& out_ids = node_outputs_[n];
            if (out.size() > out_ids.size()) detail::model_error(op.node().where() + " has too few outputs");
            bool runs = false;
            for (size_t k = 0; k < out_ids.size(); ++k) {
                if (out_ids[k] == kNoValue) continue;
                if (k >= out.size()) detail::model_error(op.node().where() + ": output " + std::to_string(k) + " is not supported");
                if (!out[k].known && out[k].dtype != DType::kFloat32) {
                    detail::model_error(op.node().where() + " computes a " + detail::dtype_name(out[k].dtype) +
                                        " tensor at run time, which the runtime does not support");
                }
                runs |= !out[k].known && out[k].constant == nullptr;
                plan->infos[out_ids[k]] = std::move(out[k]);
                ready[out_ids[k]] = true;
            }
            if (!runs) continue;
            const size_t step = plan->steps.size();
            plan->steps.push_back(n);
            for (int id : node_inputs_[n]) {
                if (id != kNoValue) last_use[id] = static_cast<int64_t>(step);
            }
        }
        for (int id : wanted) {
            if (plan->infos[id].dtype != DType::kFloat32) detail::model_error("output is not a float32 tensor");
            last_use[id] = INT64_MAX;
        }

        // Roots: views and in-place ops reuse their input's memory.
        std::vector<int64_t> root_last_use(value_count, -1);
        for (size_t id = 0; id < value_count; ++id) {
            if (plan->root[id] != kNoValue) root_last_use[id] = last_use[id];
        }
        std::vector<std::vector<int>> created_at(plan->steps.size());
        for (size_t s = 0; s < plan->steps.size(); ++s) {
            const size_t n = plan->steps[s];
            const Op& op = *ops_[n];
            const std::vector<int>& ins = node_inputs_[n];
            for (size_t k = 0; k < node_outputs_[n].size(); ++k) {
                const int id = node_outputs_[n][k];
                if (id == kNoValue) continue;
                int root = id;
                const int source = ins.empty() ? kNoValue : ins[0];
                if (k == 0 && source != kNoValue && plan->infos[source].dtype == DType::kFloat32 && !plan->infos[source].known) {
                    const int source_root = plan->root[source];
                    if (op.sharing() == Op::Sharing::kView) {
                        root = source_root;
                    } else if (op.sharing() == Op::Sharing::kInPlace && plan->storage[source_root] == Storage::kArena &&
                               root_last_use[source_root] <= static_cast<int64_t>(s) &&
                               plan->infos[source].shape == plan->infos[id].shape &&
                               std::count(ins.begin(), ins.end(), source) == 1) {
                        root = source_root;
                    }
                }
                plan->root[id] = root;
                if (root == id) {
                    plan->storage[id] = Storage::kArena;
                    created_at[s].push_back(id);
                }
                root_last_use[root] = std::max(root_last_use[root], std::max(last_use[id], static_cast<int64_t>(s)));
            }
        }

        find_tasks(*plan);
        // Arena offsets by liveness: outputs are placed before the step's dead inputs are freed,
        // so an op never writes over what it reads (except in place, decided above). Tasks get
        // regions of their own, one after another.
        std::vector<std::vector<int>> dies_after(plan->steps.size());
        for (size_t id = 0; id < value_count; ++id) {
            if (plan->storage[id] == Storage::kArena && root_last_use[id] != INT64_MAX) {
                dies_after[static_cast<size_t>(root_last_use[id])].push_back(static_cast<int>(id));
            }
        }
        std::vector<std::vector<size_t>> regions = plan->tasks;
        if (regions.empty()) {
            regions.emplace_back(plan->steps.size());
            for (size_t s = 0; s < plan->steps.size(); ++s) regions[0][s] = s;
        }
        size_t arena_end = 0, workspace_end = 0;
        for (const std::vector<size_t>& region : regions) {
            ArenaAllocator arena;
            size_t workspace = 0;
            for (size_t s : region) {
                for (int id : created_at[s]) {
                    plan->offset[id] = arena_end + arena.allocate(static_cast<size_t>(plan->infos[id].numel()));
                }
                const size_t n = plan->steps[s];
                detail::Infos in, out;
                for (int id : node_inputs_[n]) in.push_back(id == kNoValue ? nullptr : &plan->infos[id]);
                for (int id : node_outputs_[n]) out.push_back(id == kNoValue ? nullptr : &plan->infos[id]);
                workspace = std::max(workspace, ops_[n]->workspace_floats(in, out));
                for (int id : dies_after[s]) arena.release(plan->offset[id] - arena_end);
            }
            if (!plan->tasks.empty()) plan->task_workspace.push_back(workspace_end);
            arena_end += round_up(arena.size());
            workspace_end += round_up(workspace);
        }
        if (arena_end + workspace_end > kMaxPlanFloats) {
            detail::model_error("the model needs " + std::to_string((arena_end + workspace_end) >> 28) +
                                " GiB of activations and workspace, more than the runtime's limit of " +
                                std::to_string(kMaxPlanFloats >> 28) + " GiB");
        }
        plan->arena.assign(arena_end, 0.0f);
        plan->workspace.assign(workspace_end, 0.0f);
        return plan;
    }

    // Splits the plan's steps into independent tasks when the session has threads to run them
    // side by side (union-find over the values steps pass to each other).
    void find_tasks(Plan& plan) const {
        if (options_.threads < 2) return;
        const size_t count = plan.steps.size();
        std::vector<size_t> parent(count);
        for (size_t s = 0; s < count; ++s) parent[s] = s;
        auto find = [&](size_t s) {
            while (parent[s] != s) s = parent[s] = parent[parent[s]];
            return s;
        };
        std::unordered_map<int, size_t> producer;  // value id -> step
        for (size_t s = 0; s < count; ++s) {
            const size_t n = plan.steps[s];
            for (int id : node_inputs_[n]) {
                const auto it = id == kNoValue ? producer.end() : producer.find(id);
                if (it != producer.end()) parent[find(s)] = find(it->second);
            }
            for (int id : node_outputs_[n]) {
                if (id != kNoValue) producer[id] = s;
            }
        }
        std::unordered_map<size_t, size_t> task_of_root;
        std::vector<std::vector<size_t>> tasks;
        for (size_t s = 0; s < count; ++s) {
            const auto [it, added] = task_of_root.emplace(find(s), tasks.size());
            if (added) tasks.emplace_back();
            tasks[it->second].push_back(s);
        }
        if (tasks.size() < 2) return;
        plan.tasks = std::move(tasks);
        plan.mode = TaskMode::kUndecided;
    }

    const float* pointer(Plan& plan, const std::vector<const float*>& feeds, int id) {
        if (id == kNoValue || plan.infos[id].known) return nullptr;
        if (plan.infos[id].constant) return plan.infos[id].constant;  // an initializer or a view of one
        const int root = plan.root[id];
        switch (plan.storage[root]) {
            case Storage::kConstant: return plan.infos[root].constant;
            case Storage::kFeed: return feeds[plan.offset[root]];
            case Storage::kArena: return plan.arena.data() + plan.offset[root];
            case Storage::kNone: return nullptr;
        }
        return nullptr;
    }

    void run_step(Plan& plan, const std::vector<const float*>& feeds, size_t step, detail::RunContext& ctx) {
        const size_t n = plan.steps[step];
        ctx.in.clear();
        ctx.out.clear();
        detail::Infos in, out;
        for (int id : node_inputs_[n]) {
            ctx.in.push_back(pointer(plan, feeds, id));
            in.push_back(id == kNoValue ? nullptr : &plan.infos[id]);
        }
        for (int id : node_outputs_[n]) {
            ctx.out.push_back(const_cast<float*>(pointer(plan, feeds, id)));  // arena memory: writable
            out.push_back(id == kNoValue ? nullptr : &plan.infos[id]);
        }
        if (!options_.profile) {
            ops_[n]->run(in, out, ctx);
            return;
        }
        // Tasks running side by side run different nodes, so each slot has one writer; run()
        // holds mutex_, so profile() never reads a slot while it is written.
        const auto start = std::chrono::steady_clock::now();
        ops_[n]->run(in, out, ctx);
        node_seconds_[n] += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        ++node_calls_[n];
    }

    float* task_workspace(Plan& plan, size_t task) {
        return plan.workspace.empty() ? nullptr : plan.workspace.data() + plan.task_workspace[task];
    }

    std::vector<Tensor> execute(Plan& plan, const std::vector<const float*>& feeds) {
        if (plan.tasks.empty()) {
            run_one_by_one(plan, feeds);
        } else if (plan.mode != TaskMode::kUndecided) {
            plan.mode == TaskMode::kSideBySide ? run_side_by_side(plan, feeds) : run_one_by_one(plan, feeds);
        } else {
            const int run = plan.runs++;
            const bool side_by_side = run >= kWarmupRuns + kTrialRuns;
            const auto start = std::chrono::steady_clock::now();
            side_by_side ? run_side_by_side(plan, feeds) : run_one_by_one(plan, feeds);
            const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            if (run >= kWarmupRuns) {
                double& fastest = side_by_side ? plan.fastest_side_by_side : plan.fastest_one_by_one;
                fastest = std::min(fastest, seconds);
            }
            if (plan.runs == kWarmupRuns + 2 * kTrialRuns) {
                plan.mode = plan.fastest_side_by_side < plan.fastest_one_by_one ? TaskMode::kSideBySide
                                                                                : TaskMode::kOneByOne;
            }
        }
        std::vector<Tensor> results;
        for (int id : plan.outputs) {
            Tensor t;
            t.shape = plan.infos[id].shape;
            const float* src = pointer(plan, feeds, id);
            t.data.assign(src, src + plan.infos[id].numel());
            results.push_back(std::move(t));
        }
        return results;
    }

    // Every step in order, each op splitting its work over the session's threads.
    void run_one_by_one(Plan& plan, const std::vector<const float*>& feeds) {
        detail::RunContext ctx;
        ctx.threads = options_.threads;
        if (plan.tasks.empty()) {
            ctx.workspace = plan.workspace.empty() ? nullptr : plan.workspace.data();
            for (size_t s = 0; s < plan.steps.size(); ++s) run_step(plan, feeds, s, ctx);
            return;
        }
        for (size_t t = 0; t < plan.tasks.size(); ++t) {
            ctx.workspace = task_workspace(plan, t);
            for (size_t s : plan.tasks[t]) run_step(plan, feeds, s, ctx);
        }
    }

    // Every task on one thread, tasks spread over the session's threads.
    void run_side_by_side(Plan& plan, const std::vector<const float*>& feeds) {
        std::vector<std::exception_ptr> errors(plan.tasks.size());
        detail::parallel_units(static_cast<int64_t>(plan.tasks.size()), options_.threads, [&](int64_t, int64_t t) {
            try {
                detail::RunContext ctx;
                ctx.threads = 1;
                ctx.workspace = task_workspace(plan, static_cast<size_t>(t));
                for (size_t s : plan.tasks[static_cast<size_t>(t)]) run_step(plan, feeds, s, ctx);
            } catch (...) {
                errors[static_cast<size_t>(t)] = std::current_exception();  // rethrown on the caller's thread
            }
        });
        for (const std::exception_ptr& error : errors) {
            if (error) std::rethrow_exception(error);
        }
    }

    std::shared_ptr<const detail::PackedModel> model_;
    std::vector<TensorInfo> outputs_;  // the model's outputs with the shapes the graph computes
    SessionOptions options_;
    std::unordered_map<std::string, int> values_;
    std::unordered_map<int, ValueInfo> constant_infos_;
    std::vector<int> input_ids_, output_ids_;
    std::vector<std::vector<int>> node_inputs_, node_outputs_;
    std::vector<detail::Node> nodes_;  // the model's, with Relus folded into E-layers; ops_ refer to them
    std::vector<std::unique_ptr<Op>> ops_;
    std::vector<int64_t> node_calls_;  // per node: runs and seconds since the last reset_profile()
    std::vector<double> node_seconds_;
    std::map<std::string, std::unique_ptr<Plan>> plans_;
    std::mutex mutex_;
};

Precision parse_precision(const std::string& name) {
    if (name == "fp32") return Precision::kFp32;
    if (name == "fp16") return Precision::kFp16;
    if (name == "int16") return Precision::kInt16;
    if (name == "int8") return Precision::kInt8;
    throw std::invalid_argument("unknown lookup-table precision '" + name + "' (expected fp32, fp16, int16 or int8)");
}

Session Session::from_buffer(const void* data, size_t size, const SessionOptions& options) {
    if (!data && size) throw ModelError("null model buffer");
    std::shared_ptr<unsigned char> bytes = detail::aligned_bytes(size);
    if (size) std::memcpy(bytes.get(), data, size);
    return Session(std::make_unique<SessionImpl>(detail::read_pack(std::move(bytes), size), options));
}

Session Session::from_file(const std::string& path, const SessionOptions& options) {
    std::error_code error;
    if (!std::filesystem::is_regular_file(path, error)) {  // an ifstream opens a directory, and its size is absurd
        throw ModelError(std::filesystem::exists(path, error) ? "'" + path + "' is not a regular file"
                                                              : "no such model file '" + path + "'");
    }
    std::ifstream file(path, std::ios::binary | std::ios::ate);
    if (!file) throw ModelError("cannot open model file '" + path + "'");
    const std::streamoff end = file.tellg();
    if (end < 0) throw ModelError("cannot read model file '" + path + "'");
    const size_t size = static_cast<size_t>(end);
    std::shared_ptr<unsigned char> bytes = detail::aligned_bytes(size);
    file.seekg(0);
    if (size && !file.read(reinterpret_cast<char*>(bytes.get()), static_cast<std::streamsize>(size))) {
        throw ModelError("cannot read model file '" + path + "'");
    }
    return Session(std::make_unique<SessionImpl>(detail::read_pack(std::move(bytes), size), options));
}

Session::Session(std::unique_ptr<SessionImpl> impl) : impl_(std::move(impl)) {}
Session::Session(Session&&) noexcept = default;
Session& Session::operator=(Session&&) noexcept = default;
Session::~Session() = default;

const std::vector<TensorInfo>& Session::inputs() const { return impl_->inputs(); }
const std::vector<TensorInfo>& Session::outputs() const { return impl_->outputs(); }
std::vector<Tensor> Session::run(const std::vector<std::pair<std::string, TensorView>>& feeds,
                                 const std::vector<std::string>& output_names) {
    return impl_->run(feeds, output_names);
}
std::vector<std::string> Session::describe_kernels() const { return impl_->describe_kernels(); }
std::vector<std::string> Session::inputs_needed(const std::string& output) const {
    return impl_->inputs_needed(output);
}
std::vector<NodeProfile> Session::profile() const { return impl_->profile(); }
void Session::reset_profile() { impl_->reset_profile(); }

}  // namespace neuralmerge
