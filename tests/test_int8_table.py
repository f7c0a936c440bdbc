"""The torch simulation of the int8 runtime (encode/int8_table.py) against the native int8 kernels,
layer by layer and on a whole calibrated merge, and int8-aware calibration's wiring."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import neuralmerge
from neuralmerge.calibrate.data import split_holdout
from neuralmerge.encode import int8_table
from neuralmerge.encode.int8_table import econv_int8, elinear_int8
from neuralmerge.encode.modules import EConv2d
from neuralmerge.errors import ConfigError
from neuralmerge.graph.importer import OnnxModule
from neuralmerge.runtime import Session
from neuralmerge.runtime.kernels import EConv, EGemm, cpu_features
from neuralmerge.settings import CalibrationSettings, make_config
from hetero_models import hetero_pair
from tests.test_kernel_parity import CONV_CASES, FC_CASES, relative_rms
from tests.test_lut_kernels import conv2d_reference, decode_weight, random_encoding

# The simulation mirrors the VNNI int8 build (AVX-512 VNNI); other int8 kernels round differently,
# so the comparisons with the native runtime need it (the other tests run anywhere).
needs_vnni = pytest.mark.skipif("avx512vnni" not in cpu_features().split(),
                                reason="the simulated int8 arithmetic is the AVX-512 VNNI kernels'")


def tensors(*arrays):
    return [torch.from_numpy(np.asarray(a).astype(np.int64) if np.asarray(a).dtype.kind in "iu" else a)
            for a in arrays]


@needs_vnni
@pytest.mark.parametrize("peak", [0.0, 3.0])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("case", CONV_CASES)
def test_simulated_conv_is_the_native_int8_kernel(case, signed, peak):
    kernel, stride, pads, dilation, group, depth, p, r, codewords = CONV_CASES[case]
    rng = np.random.default_rng(len(case))
    codebook, codes, offsets = random_encoding(rng, (p, *kernel), depth, r, codewords)
    bias = rng.standard_normal(p).astype(np.float32)
    x = rng.standard_normal((2, depth * group, 11, 14)).astype(np.float32)
    x = x if signed else np.maximum(x, 0.0)
    native = EConv(codebook, codes, offsets, depth, bias, stride, pads, dilation, group, lut="int8", isa="avx512",
                   input_scale=peak / 127)(x)
    cb, cd, off, b, xt = tensors(codebook, codes, offsets, bias, x)
    simulated = econv_int8(cb, cd, off, depth, b, xt, strides=stride, pads=pads, dilations=dilation, group=group,
                           peak=peak, use_native=False).numpy()
    exact = conv2d_reference(x, decode_weight(codebook, codes, offsets, depth).transpose(0, 3, 1, 2), bias, stride,
                             pads, dilation, group)
    assert relative_rms(native, exact) > 3e-3  # int8 does round: the comparison below means something
    assert relative_rms(simulated, native) < 1e-6


@needs_vnni
@pytest.mark.parametrize("width", [3, 15, 16, 17, 33])
@pytest.mark.parametrize("pads", [(0, 0, 0, 0), (1, 2, 0, 3)])
def test_unit_stride_layers_quantise_rows_of_any_width(width, pads):
    # With unit strides the uint8 operands are quantised row by row straight from the input, the
    # last vector of a row masked, into padding that holds the zero point's byte.
    rng = np.random.default_rng(width)
    depth, p, r, codewords = 11, 5, 4, 13
    codebook, codes, offsets = random_encoding(rng, (p, 3, 3), depth, r, codewords)
    bias = rng.standard_normal(p).astype(np.float32)
    for x in (rng.standard_normal((2, depth, 5, width)), np.maximum(rng.standard_normal((2, depth, 5, width)), 0)):
        x = x.astype(np.float32)
        for peak in (0.0, 2.5):
            native = EConv(codebook, codes, offsets, depth, bias, (1, 1), pads, lut="int8", isa="avx512",
                           input_scale=peak / 127)(x)
            cb, cd, off, b, xt = tensors(codebook, codes, offsets, bias, x)
            simulated = econv_int8(cb, cd, off, depth, b, xt, strides=(1, 1), pads=pads, dilations=(1, 1), group=1,
                                   peak=peak, use_native=False).numpy()
            assert relative_rms(simulated, native) < 1e-6


@needs_vnni
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("case", FC_CASES)
def test_simulated_fc_is_the_native_int8_kernel(case, signed):
    n_out, n_in, r, codewords, dtype = FC_CASES[case]
    rng = np.random.default_rng(len(case))
    codebook, codes, offsets = random_encoding(rng, (n_out,), n_in, r, codewords)
    codes = codes.astype(dtype)
    bias = rng.standard_normal(n_out).astype(np.float32)
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    x = x if signed else np.maximum(x, 0.0)
    for peak in (0.0, 4.0):
        native = EGemm(codebook, codes, offsets, n_in, bias, lut="int8", isa="avx512", input_scale=peak / 127)(x)
        simulated = elinear_int8(*tensors(codebook, codes, offsets), n_in, torch.from_numpy(bias),
                                 torch.from_numpy(x), peak=peak, use_native=False).numpy()
        exact = x @ decode_weight(codebook, codes, offsets, n_in).T + bias
        assert relative_rms(native, exact) > 3e-3
        assert relative_rms(simulated, native) < 1e-6


def test_gradients_pass_the_roundings_straight_through():
    rng = np.random.default_rng(3)
    codebook, codes, offsets = random_encoding(rng, (6, 3, 3), 12, 4, 16)
    x0 = np.maximum(rng.standard_normal((2, 12, 9, 9)), 0).astype(np.float32)
    layers = []
    for int8 in (False, True):
        cb = torch.nn.Parameter(torch.from_numpy(codebook.copy()))
        layer = EConv2d(cb, torch.from_numpy(codes.astype(np.int64)), torch.from_numpy(offsets.astype(np.int64)), 12,
                        torch.nn.Parameter(torch.zeros(6)), pads=(1, 1, 1, 1))
        layer.int8_peak = 0.0 if int8 else None
        x = torch.from_numpy(x0.copy()).requires_grad_()
        layer(x).square().sum().backward()
        layers.append((cb.grad, x.grad))
    (cb_float, x_float), (cb_int8, x_int8) = layers
    assert cb_int8.abs().sum() > 0 and x_int8.abs().sum() > 0
    # the same direction as the float layer's, off by the roundings' small changes
    assert relative_rms(cb_int8.numpy(), cb_float.numpy()) < 0.05
    assert relative_rms(x_int8.numpy()[x_float.numpy() != 0], x_float.numpy()[x_float.numpy() != 0]) < 0.05


@pytest.fixture(scope="module")
def int8_aware_merge(tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8aware")
    a, b = hetero_pair(folder)
    rng = np.random.default_rng(0)
    xa, xb = folder / "a.npy", folder / "b.npy"
    np.save(xa, np.maximum(rng.standard_normal((80, 3, 40, 40)), -0.3).astype(np.float32))
    np.save(xb, rng.standard_normal((80, 1, 28, 28)).astype(np.float32))
    result = neuralmerge.merge([a, b], folder / "m.onnx", r=4, codewords=16, quiet=True, calib=[xa, xb],
                               calibration={"epochs": 1, "batch_size": 40, "int8_aware": True},
                               report=folder / "r.json")
    return folder, result, (a, b), (np.load(xa), np.load(xb))


@needs_vnni
@pytest.mark.parametrize("forward", ["torch", "native"])
def test_a_calibrated_merge_simulated_whole_is_the_native_int8_session(int8_aware_merge, forward, monkeypatch):
    """Both ways of computing the simulated forward: the torch gathers, and the runtime's kernels."""
    if forward == "torch":
        monkeypatch.setattr(int8_table, "_native_kernels", lambda: None)
    folder, result, _, data = int8_aware_merge
    scales = json.loads({p.key: p.value for p in result.model.metadata_props}["neuralmerge.int8_scales"])
    student = OnnxModule(result.model).eval()
    for node, peak in scales.items():
        student.elayer(node).int8_peak = peak
    native = Session(folder / "m.onnx", lut="int8")
    exact = Session(folder / "m.onnx", lut="fp32")
    for name, x in zip(["image", "img"], data):
        output = "scores" if name == "image" else "logits"
        with torch.no_grad():
            simulated = student.run({name: torch.from_numpy(x[:16])}, [output])[output].numpy()
        int8 = native.run({name: x[:16]}, outputs=[output])[output]
        assert relative_rms(int8, exact.run({name: x[:16]}, outputs=[output])[output]) > 1e-3
        assert relative_rms(simulated, int8) < 1e-5


@needs_vnni
def test_int8_aware_calibration_reports_the_int8_runtimes_fidelity(int8_aware_merge):
    """The held-out agreement the report gives is the native int8 session's on those samples."""
    folder, result, originals, data = int8_aware_merge
    cal = result.report["calibration"]
    assert cal["settings"]["int8_aware"] is True
    native = Session(folder / "m.onnx", lut="int8")
    for i, (source, x, name, output) in enumerate(zip(originals, data, ["image", "img"], ["scores", "logits"])):
        _, holdout = split_holdout(len(x), cal["settings"]["holdout"], i)  # seed 0 + model index, as the trainer
        reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
        want = np.concatenate([reference.run(None, {name: x[j:j + 1]})[0] for j in holdout]).argmax(1)
        got = native.run({name: x[holdout]}, outputs=[output])[output].argmax(1)
        assert cal["models"][i]["after"]["top1_agreement"] == pytest.approx(float((got == want).mean()))


def test_int8_aware_is_a_boolean_in_config_and_flags():
    with pytest.raises(ConfigError, match="calibration.int8_aware must be true or false, got 1"):
        make_config(config={"calibration": {"int8_aware": 1}})
    assert make_config(config={"calibration": {"int8_aware": True}}).calibration.int8_aware is True
    assert CalibrationSettings().with_overrides(int8_aware=True).int8_aware is True
    with pytest.raises(ConfigError, match="--int8-aware must be true or false"):
        CalibrationSettings().with_overrides(int8_aware="yes")
