"""The runtime never trusts a file: every bad .nmpack is a ModelError, never a crash (docs/runtime.md)."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from neuralmerge.errors import NeuralMergeError
from neuralmerge.export.functions import DOMAIN, econv_function, egemm_function
from neuralmerge.runtime import ModelError, Session, pack_model

PREFIX = struct.Struct("<8sIIQQ")


def tiny_merged_model() -> onnx.ModelProto:
    """EConv 3->4 (3x3, r=2, two segments of 3 and 2 codewords) -> Relu -> GAP -> Flatten -> EGemm 4->5."""
    rng = np.random.default_rng(0)
    conv_codebook = rng.standard_normal((5, 2)).astype(np.float32)
    conv_codes = np.stack([rng.integers(0, 3, (4, 3, 3)), rng.integers(0, 2, (4, 3, 3))], axis=-1).astype(np.uint8)
    fc_codebook = rng.standard_normal((6, 2)).astype(np.float32)
    fc_codes = rng.integers(0, 3, (5, 2)).astype(np.uint8)
    inits = [
        numpy_helper.from_array(conv_codebook, "nm.conv1.codebook"),
        numpy_helper.from_array(conv_codes, "m0.conv.codes"),
        numpy_helper.from_array(np.array([0, 3], np.int64), "m0.conv.offsets"),
        numpy_helper.from_array(np.array([3], np.int64), "m0.conv.depth"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "m0.conv.bias"),
        numpy_helper.from_array(fc_codebook, "nm.fc1.codebook"),
        numpy_helper.from_array(fc_codes, "m0.fc.codes"),
        numpy_helper.from_array(np.array([0, 3], np.int64), "m0.fc.offsets"),
        numpy_helper.from_array(np.array([4], np.int64), "m0.fc.depth"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "m0.fc.bias"),
    ]
    nodes = [
        helper.make_node("EConv", ["x", "nm.conv1.codebook", "m0.conv.codes", "m0.conv.offsets", "m0.conv.depth",
                                   "m0.conv.bias"], ["c"], name="m0.conv", domain=DOMAIN, strides=[1, 1],
                         pads=[1, 1, 1, 1], dilations=[1, 1], group=1),
        helper.make_node("Relu", ["c"], ["r"], name="m0.relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="m0.gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="m0.flatten"),
        helper.make_node("EGemm", ["f", "nm.fc1.codebook", "m0.fc.codes", "m0.fc.offsets", "m0.fc.depth",
                                   "m0.fc.bias"], ["y"], name="m0.fc", domain=DOMAIN),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, functions=[econv_function(17), egemm_function(17)], ir_version=8,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    groups = [{"name": "conv1", "kind": "conv", "r": 2, "segment_codewords": [3, 2], "segments": 2,
               "members": [{"model": 0, "node": "m0.conv", "depth": 3, "segments": 2}]},
              {"name": "fc1", "kind": "fc", "r": 2, "segment_codewords": [3, 3], "segments": 2,
               "members": [{"model": 0, "node": "m0.fc", "depth": 4, "segments": 2}]}]
    helper.set_model_props(model, {"neuralmerge.format_version": "1", "neuralmerge.groups": json.dumps(groups)})
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return tiny_merged_model()


@pytest.fixture(scope="module")
def packed(model) -> bytes:
    return pack_model(model)


def split(data: bytes) -> tuple[dict, bytes]:
    magic, version, flags, header_size, data_offset = PREFIX.unpack_from(data)
    return json.loads(data[PREFIX.size:PREFIX.size + header_size]), data[data_offset:]


def join(header: dict, blob: bytes) -> bytes:
    text = json.dumps(header).encode()
    data_offset = (PREFIX.size + len(text) + 63) // 64 * 64
    out = bytearray(data_offset)
    PREFIX.pack_into(out, 0, b"NMPACK\r\n", 1, 0, len(text), data_offset)
    out[PREFIX.size:PREFIX.size + len(text)] = text
    return bytes(out) + blob


def tensor(header: dict, name: str) -> dict:
    return next(t for t in header["tensors"] if t["name"] == name)


def load_fails(data: bytes, *words: str) -> str:
    with pytest.raises(ModelError) as info:
        Session(data)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_good_pack_matches_onnxruntime(model, packed):
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(Session(packed).run({"x": x})["y"], want, rtol=1e-4, atol=1e-5)
    assert issubclass(ModelError, NeuralMergeError) and issubclass(ModelError, ValueError)


@pytest.mark.parametrize("size", [0, 7, 31, 40, 200])
def test_truncated_file(packed, size):
    load_fails(packed[:size])


def test_truncated_inside_the_last_tensor(packed):
    header, _ = split(packed)
    data_offset = PREFIX.unpack_from(packed)[4]
    end = max(data_offset + t["offset"] + t["size"] for t in header["tensors"])
    load_fails(packed[:end - 1], "outside the data section")


def test_bad_magic_and_version(packed):
    load_fails(b"XXPACK\r\n" + packed[8:], "magic")
    load_fails(packed[:8] + struct.pack("<I", 7) + packed[12:], "version 7")


def test_code_index_not_below_its_segment_codewords(packed):
    header, blob = split(packed)
    codes = tensor(header, "m0.conv.codes")
    mutated = bytearray(blob)
    mutated[codes["offset"] + 1] = 2  # segment 1 has only 2 codewords
    load_fails(join(header, bytes(mutated)), "m0.conv", "code 2")
    mutated[codes["offset"] + 1] = 255
    load_fails(join(header, bytes(mutated)), "code 255")


def test_codebook_and_codes_disagree(packed):
    header, blob = split(packed)
    codebook = tensor(header, "nm.conv1.codebook")
    codebook["shape"] = [2, 5]  # same bytes, r = 5: depth 3 no longer fits two segments
    load_fails(join(header, blob), "depth 3")
    header, blob = split(packed)
    codebook = tensor(header, "nm.conv1.codebook")
    codebook["shape"], codebook["size"] = [4, 2], 32  # 4 rows: segment 1 (offset 3, C=2) overruns
    load_fails(join(header, blob), "outside the codebook")


def test_segment_codewords_disagree_with_offsets(packed):
    header, blob = split(packed)
    header["elayers"]["m0.conv"]["segment_codewords"] = [3, 2, 2]
    load_fails(join(header, blob), "segment_codewords")


@pytest.mark.parametrize("scale", [-1.0, 1e-40, 1e31, "0.5", None])
def test_bad_input_scale(packed, scale):
    # 1e-40 is a float32 whose inverse is infinite: it would quantise zeros as NaN.
    header, blob = split(packed)
    header["elayers"]["m0.conv"]["input_scale"] = scale
    load_fails(join(header, blob), "input_scale must be 0 or between 1e-30 and 1e30")


@pytest.mark.parametrize("shape", [[-4, 2], [1 << 40, 1 << 40], [1 << 62, 2]])
def test_negative_or_absurd_dimensions(packed, shape):
    header, blob = split(packed)
    tensor(header, "nm.conv1.codebook")["shape"] = shape
    load_fails(join(header, blob), "nm.conv1.codebook")


def test_absurd_input_dimension(packed):
    header, blob = split(packed)
    header["inputs"][0]["shape"] = [1, 3, 1 << 31, 1 << 31]
    load_fails(join(header, blob), "input 'x'")
    header["inputs"][0]["shape"] = [0, 3, 6, 6]
    load_fails(join(header, blob), "input 'x'")


@pytest.mark.parametrize("offset, size", [(1 << 40, 40), (64 * 1000, 40), (8, 40), (0, 41), (-64, 40)])
def test_bad_offsets(packed, offset, size):
    header, blob = split(packed)
    t = tensor(header, "nm.conv1.codebook")
    t["offset"], t["size"] = offset, size
    load_fails(join(header, blob), "nm.conv1.codebook")


def test_bad_header_offsets(packed):
    load_fails(packed[:16] + struct.pack("<QQ", 1 << 60, 64) + packed[32:], "header size")
    load_fails(packed[:24] + struct.pack("<Q", 33) + packed[32:], "data offset")


def test_undefined_and_redefined_names(packed):
    header, blob = split(packed)
    header["nodes"][1]["inputs"] = ["nowhere"]
    load_fails(join(header, blob), "reads 'nowhere' before it is defined")
    header, blob = split(packed)
    header["nodes"][2]["outputs"] = ["c"]
    load_fails(join(header, blob), "redefines 'c'")
    header, blob = split(packed)
    header["nodes"].reverse()
    load_fails(join(header, blob), "before it is defined")


def test_unsupported_op_names_the_fallback(packed):
    header, blob = split(packed)
    header["nodes"][1]["op"] = "Hardmax"
    load_fails(join(header, blob), "op 'Hardmax' (node 'm0.relu') is not supported by the neuralmerge runtime",
               "onnxruntime.InferenceSession")


def test_malformed_json_header(packed):
    header_size = PREFIX.unpack_from(packed)[3]
    for garbage in (b"}", b"[" * 100 + b"]" * 100, b'{"opset": 1e999}', b"\xff\xfe"):
        data = bytearray(packed)
        data[PREFIX.size:PREFIX.size + len(garbage)] = garbage
        assert len(garbage) <= header_size
        load_fails(bytes(data))


def nmpack(tensors: dict, inputs: dict, outputs: dict, nodes: list, elayers: dict | None = None) -> bytes:
    """A .nmpack written by hand, past the packer's own checks: the runtime alone must refuse it."""
    header = {"format": "neuralmerge-pack", "opset": 17, "tensors": [], "nodes": nodes, "elayers": elayers or {},
              "inputs": [{"name": n, "dtype": "float32", "shape": s} for n, s in inputs.items()],
              "outputs": [{"name": n, "dtype": "float32", "shape": s} for n, s in outputs.items()], "metadata": {}}
    blob = bytearray()
    for name, array in tensors.items():
        header["tensors"].append({"name": name, "dtype": str(array.dtype), "shape": list(array.shape),
                                  "offset": len(blob), "size": array.nbytes})
        blob += array.tobytes() + bytes(-array.nbytes % 64)
    return join(header, bytes(blob))


def node(op: str, inputs: list, outputs: list, **attrs) -> dict:
    domain = DOMAIN if op in ("EConv", "EGemm") else ""
    return {"name": f"{op}->{outputs[0]}", "op": op, "domain": domain, "inputs": inputs, "outputs": outputs,
            "attrs": attrs}


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def hostile_files() -> dict[str, tuple[bytes, str]]:
    """Small files that asked for wrapped integers, huge allocations or shared bytes before the
    runtime checked for them (a review of the loader found each): name -> (file, what the error says)."""
    packed = pack_model(tiny_merged_model())

    def mutated(change) -> bytes:
        header, blob = split(packed)
        change(header)
        return join(header, blob)

    def reshape(a: np.ndarray, b: np.ndarray, op: str) -> bytes:  # x reshaped to the shape a op b
        return nmpack({"a": a, "b": b}, {"x": [1, 4]}, {"y": [4]}, [node(op, ["a", "b"], ["s"]),
                                                                     node("Reshape", ["x", "s"], ["y"])])
    econv = {"cb": np.zeros((2, 1), np.float32), "codes": np.zeros((1, 2, 1, 1), np.uint8), "off": i64(0),
             "depth": i64(1), "bias": np.zeros(1, np.float32)}
    scales = np.array([1, 1, 32768, 32768], np.float32)
    return {
        "INT64_MIN / -1": (reshape(i64(-2**63), i64(-1), "Div"), "integer overflow"),
        "2^62 * 4": (reshape(i64(2**62), i64(4), "Mul"), "integer overflow"),
        "Gemm with a [4, 0] weight": (
            nmpack({"w": np.zeros((4, 0), np.float32)}, {"x": [1, 4]}, {"y": [1, 1]}, [node("Gemm", ["x", "w"], ["y"])]),
            "empty weight"),
        "three Resizes by 32768": (
            nmpack({"scales": scales}, {"x": [1, 1, 1, 1]}, {f"y{i}": [1, 1, 32768, 32768] for i in range(3)},
                   [node("Resize", ["x", "", "scales"], [f"y{i}"]) for i in range(3)]),
            "more than the runtime's limit"),
        "a 1x1 input padded by 16387": (
            nmpack({"w": np.ones((1, 1, 8, 8), np.float32)}, {"x": [1, 1, 1, 1]}, {"y": [1, 1, 32768, 32768]},
                   [node("Conv", ["x", "w"], ["y"], pads=[16387] * 4)]),
            "more than the runtime's limit"),
        "a Gather of 2^30 known integers": (
            nmpack({"d": np.zeros((1, 16384), np.int64), "i": np.zeros(65536, np.int64)}, {"x": [1, 4]}, {"y": [4]},
                   [node("Gather", ["d", "i"], ["g"]), node("Reshape", ["x", "g"], ["y"])]),
            "shape arithmetic on 1073741824 integers"),
        "an EConv dilated by 2^30": (
            nmpack(econv, {"x": [1, 1, 1, 1]}, {"y": [1, 1, 1, 1]},
                   [node("EConv", ["x", "cb", "codes", "off", "depth", "bias"], ["y"], dilations=[2**30, 1],
                         pads=[2**29, 0, 2**29, 2**20 - 1])], {"EConv->y": {"segment_codewords": [2]}}),
            "too large"),
        "segments claiming the same codebook rows": (
            mutated(lambda h: h["elayers"]["m0.conv"].update(segment_codewords=[4, 2])), "overlapping codebook rows"),
        "tensors sharing bytes": (
            mutated(lambda h: tensor(h, "m0.fc.bias").update(offset=tensor(h, "m0.conv.bias")["offset"])),
            "overlap in the data section"),
    }


HOSTILE = hostile_files()


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_files_are_refused_before_they_allocate(name):
    data, words = HOSTILE[name]
    load_fails(data, words)


def test_outputs_report_the_shapes_the_graph_computes(packed):
    # A declared shape can be wrong (onnx's shape inference gets some ceil_mode pools wrong and
    # onnxruntime only warns): Session.outputs reports what the graph computes, free dims free.
    header, blob = split(packed)
    header["outputs"][0]["shape"] = [-1, 7]
    session = Session(join(header, blob))
    assert [tuple(o.shape) for o in session.outputs] == [tuple(o.shape) for o in Session(packed).outputs]
    assert session.outputs[0].shape[1] == 5
    assert session.run({"x": np.ones((2, 3, 6, 6), np.float32)})["y"].shape == (2, 5)


def test_packing_refuses_to_fold_a_huge_constant(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["big"]), helper.make_node("ReduceSum", ["big"], ["s"]),
         helper.make_node("Add", ["x", "s"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [numpy_helper.from_array(i64(2**29), "shape")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "big.onnx")
    with pytest.raises(ModelError, match="ConstantOfShape -> 'big' would make 536870912 elements"):
        Session(tmp_path / "big.onnx")


def test_random_mutations_never_crash(packed):
    """300 mutated files (bytes flipped in the header and the data): each loads and runs, or is refused."""
    rng = np.random.default_rng(0)
    x = np.ones((1, 3, 6, 6), np.float32)
    header_end = PREFIX.size + PREFIX.unpack_from(packed)[3]
    outcomes = {"refused": 0, "ran": 0}
    for _ in range(300):
        data = bytearray(packed)
        for _ in range(int(rng.integers(1, 4))):
            # Digits and brackets of the header make more interesting mutations than random bytes.
            position = int(rng.integers(0, header_end if rng.random() < 0.7 else len(data)))
            data[position] = int(rng.choice([rng.integers(0, 256), ord(str(rng.integers(0, 10))), ord("-"), ord("]")]))
        try:
            Session(bytes(data)).run({"x": x})
            outcomes["ran"] += 1
        except (ModelError, NeuralMergeError):
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100 and sum(outcomes.values()) == 300


@pytest.fixture(scope="module")
def sanitized_loader() -> Path:
    """nm_load_files built with ASan+UBSan (CMake -DNEURALMERGE_SANITIZE=ON).

    The build directory (build/asan in the checkout, git-ignored) is kept between runs: ~35 s the
    first time on 2 cores, incremental after.
    """
    root = Path(__file__).resolve().parents[1]
    build = root / "build" / "asan"
    configure = ["cmake", "-S", str(root), "-B", str(build), "-G", "Ninja", "-DNEURALMERGE_SANITIZE=ON",
                 "-DNEURALMERGE_BUILD_PYTHON=OFF", "-DNEURALMERGE_BUILD_TESTS=ON", f"-DPython_EXECUTABLE={sys.executable}"]
    subprocess.run(configure, check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "nm_load_files"], check=True, capture_output=True)
    return build / "nm_load_files"


def test_worker_pool_runs_every_unit_once_under_changing_worker_counts(sanitized_loader):
    """20 000 pool calls with 4 threads and 2-4 units (tests/cpp/pool_stress.cpp), under ASan+UBSan.
    Before the pool's generation and worker count were read together, runs of 100 000 calls hung
    or ran a unit twice (then crashed) within seconds."""
    build = sanitized_loader.parent
    subprocess.run(["cmake", "--build", str(build), "--target", "nm_pool_stress"], check=True, capture_output=True)
    result = subprocess.run([str(build / "nm_pool_stress"), "20000"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout == "ok 20000\n", result.stdout + result.stderr[-3000:]


def test_sanitized_cpp_loader_survives_mutations(packed, sanitized_loader, tmp_path):
    """The sanitized C++ loader loads and runs 150 mutated files: no crash, no sanitizer report."""
    rng = np.random.default_rng(1)
    header_end = PREFIX.size + PREFIX.unpack_from(packed)[3]
    paths = [tmp_path / "good.nmpack", tmp_path / "truncated.nmpack"]
    paths[0].write_bytes(packed)
    paths[1].write_bytes(packed[:len(packed) // 2])
    for i in range(150):
        data = bytearray(packed)
        for _ in range(int(rng.integers(1, 4))):
            position = int(rng.integers(0, header_end if rng.random() < 0.7 else len(data)))
            data[position] = int(rng.choice([rng.integers(0, 256), ord(str(rng.integers(0, 10))), ord("-"), ord("]")]))
        paths.append(tmp_path / f"mutated{i}.nmpack")
        paths[-1].write_bytes(bytes(data))
    result = subprocess.run([str(sanitized_loader), *map(str, paths)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Sanitizer" not in result.stderr and "runtime error" not in result.stderr, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].endswith("good.nmpack: ran") and "truncated.nmpack: refused" in lines[1]
    assert len(lines) == len(paths) + 1


def test_sanitized_cpp_runtime_runs_the_dense_ops(sanitized_loader, tmp_path):
    """The op subset (the session tests' op zoo), pooling windows of several geometries and
    batch-1 Gemm/MatMul (sgemv) run under ASan+UBSan without a report."""
    from tests.test_runtime_session import op_zoo_model

    models = {"zoo": op_zoo_model()}
    geometries = [([3, 3], [2, 2], [0, 0, 0, 0], 0, [1, 1]), ([3, 3], [1, 1], [1, 1, 1, 1], 0, [1, 1]),
                  ([2, 3], [2, 1], [1, 0, 0, 2], 1, [1, 1]), ([3, 2], [3, 2], [0, 1, 2, 1], 1, [1, 1]),
                  ([3, 3], [2, 1], [1, 2, 1, 2], 0, [2, 3]), ([7, 9], [1, 1], [0, 0, 0, 0], 0, [1, 1])]
    for i, (kernel, strides, pads, ceil, dilations) in enumerate(geometries):
        for op in ("MaxPool", "AveragePool"):
            attrs = dict(kernel_shape=kernel, strides=strides, pads=pads, ceil_mode=ceil)
            if op == "MaxPool":
                attrs["dilations"] = dilations
            elif dilations != [1, 1]:
                continue
            graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], **attrs)], "pool",
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 9, 41])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
            models[f"{op}{i}"] = onnx.shape_inference.infer_shapes(
                helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    rng = np.random.default_rng(2)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in [("g", (61, 130)), ("m", (61, 130))]]
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "g"], ["a"], transB=1), helper.make_node("MatMul", ["a", "m"], ["y"])],
                              "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 130])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 130])], weights)
    models["gemv"] = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    paths = []
    for name, model in models.items():
        paths.append(tmp_path / f"{name}.nmpack")
        paths[-1].write_bytes(pack_model(model))
    result = subprocess.run([str(sanitized_loader), *map(str, paths)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Sanitizer" not in result.stderr and "runtime error" not in result.stderr, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == f"ran {len(paths)}, refused 0"


def test_sanitized_cpp_loader_refuses_hostile_files(sanitized_loader, tmp_path):
    """The hostile files above, in the sanitized C++ loader: each refused, no sanitizer report
    (signed overflow and division traps included)."""
    paths = []
    for i, (data, _) in enumerate(HOSTILE.values()):
        paths.append(tmp_path / f"hostile{i}.nmpack")
        paths[-1].write_bytes(data)
    result = subprocess.run([str(sanitized_loader), *map(str, paths)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Sanitizer" not in result.stderr and "runtime error" not in result.stderr, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == f"ran 0, refused {len(paths)}", result.stdout
