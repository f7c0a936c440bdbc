"""Every fast LUT kernel variant against the decoded dense reference (one harness, like ggml's
test-backend-ops): precision (fp32/fp16/int16/int8) x instruction set (avx512/avx2/scalar, those
this CPU has) x conv geometry / FC shape, each held to a per-precision relative RMS bound.
"""
from __future__ import annotations

import numpy as np
import pytest

from neuralmerge.runtime import kernels
from neuralmerge.runtime.kernels import EConv, EGemm, KernelInputError
from tests.test_lut_kernels import conv2d_reference, decode_weight, random_encoding

# Relative RMS error bounds, about 3x what the kernels measure on these cases (fp16: 1.5x on CPUs
# with AVX512-FP16, whose partial sums in fp16 measure 3-4e-4 here, twice the fp32 sums' error).
TOLERANCE = {"fp32": 1e-6, "fp16": 6e-4, "int16": 4e-4, "int8": 5e-2}
FEATURES = kernels.cpu_features().split()
ISAS = ["scalar"]
if {"avx2", "fma", "f16c"} <= set(FEATURES):
    ISAS.append("avx2")
if {"avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512vbmi"} <= set(FEATURES):
    ISAS.append("avx512")
# The AVX-512 fp16 E-Conv sum then adds four terms at a time in fp16 (docs/runtime.md); cpu_features
# lists avx512fp16 only when this build has that kernel.
FP16_ARITHMETIC = "avx512" in ISAS and "avx512fp16" in FEATURES
VARIANTS = [(lut, isa) for lut in TOLERANCE for isa in ISAS]

# kernel, stride, pads [t, l, b, r], dilation, group, depth per group, p, r, max codewords
CONV_CASES = {
    "3x3": ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 12, 6, 4, 16),
    "5x5-r-not-dividing-depth": ((5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 1, 10, 5, 4, 40),
    "stride2-asymmetric": ((3, 3), (2, 2), (0, 1, 2, 0), (1, 1), 1, 8, 4, 3, 12),
    "stride4-even-kernel": ((4, 4), (4, 4), (1, 2, 1, 2), (1, 1), 1, 6, 3, 2, 9),
    "dilation": ((3, 3), (1, 2), (2, 2, 2, 2), (2, 2), 1, 5, 4, 5, 7),
    "grouped": ((3, 2), (1, 1), (1, 0, 1, 1), (1, 1), 2, 6, 6, 4, 11),
    "depthwise": ((3, 3), (2, 1), (1, 1, 1, 1), (1, 1), 8, 1, 8, 1, 5),
    "1x1-many-terms": ((1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, 300, 5, 1, 30),
    # r = 8 and 16 (segments of 8 and 16 channels build tables on compile-time unrolled loops)
    "r16-segments-of-16-16-8": ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 40, 5, 16, 24),
    "r8-lenet-like": ((5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 1, 16, 6, 8, 20),
    # r = 20 and 32: the int8 table build's dot products unrolled for 5 and 8 quads of channels
    "r20-segments-of-20-7": ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 27, 4, 20, 18),
    "r32-segments-of-32-32-12": ((3, 3), (1, 1), (0, 1, 1, 0), (1, 1), 1, 76, 5, 32, 24),
}
FC_CASES = {
    "small": (37, 70, 4, 12, np.uint8),
    "byte-permute": (96, 130, 8, 128, np.uint8),
    "many-segments": (300, 9, 1, 20, np.uint8),
    "uint16-codes": (50, 33, 3, 300, np.uint16),
}


def relative_rms(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.sqrt(np.mean((actual - expected) ** 2) / np.mean(expected**2)))


@pytest.fixture(scope="module")
def conv_cases():
    cases = {}
    for name, (kernel, stride, pads, dilation, group, depth, p, r, codewords) in CONV_CASES.items():
        rng = np.random.default_rng(len(name))
        codebook, codes, offsets = random_encoding(rng, (p, *kernel), depth, r, codewords)
        bias = rng.standard_normal(p).astype(np.float32)
        x = np.maximum(rng.standard_normal((2, depth * group, 11, 14)), -0.5).astype(np.float32)
        weight = decode_weight(codebook, codes, offsets, depth).transpose(0, 3, 1, 2)
        layer = (codebook, codes, offsets, depth, bias, stride, pads, dilation, group)
        cases[name] = (layer, x, conv2d_reference(x, weight, bias, stride, pads, dilation, group))
    return cases


@pytest.fixture(scope="module")
def fc_cases():
    cases = {}
    for name, (n_in, n_out, r, codewords, code_dtype) in FC_CASES.items():
        rng = np.random.default_rng(len(name) + 100)
        codebook, codes, offsets = random_encoding(rng, (n_out,), n_in, r, codewords, code_dtype)
        bias = rng.standard_normal(n_out).astype(np.float32)
        weight = decode_weight(codebook, codes, offsets, n_in)
        layer = (codebook, codes, offsets, n_in, bias)
        # Signed inputs and ReLU'd ones: the int8 VNNI build quantises them differently (a zero
        # point of 128 against all 256 levels).
        for sign, x in (("", rng.standard_normal((2, n_in))), ("-relu", np.maximum(rng.standard_normal((2, n_in)), 0))):
            x = x.astype(np.float32)
            cases[name + sign] = (layer, x, x.astype(np.float64) @ weight.T + bias)
    return cases


@pytest.mark.parametrize("lut, isa", VARIANTS)
def test_econv_variant_matches_dense_reference(conv_cases, lut, isa):
    for name, (layer_args, x, expected) in conv_cases.items():
        layer = EConv(*layer_args, lut=lut, isa=isa)
        assert layer.kernel_name == f"{lut}-{isa}"
        y = layer(x)
        assert y.shape == expected.shape and y.dtype == np.float32
        assert relative_rms(y, expected) <= TOLERANCE[lut], name


@pytest.mark.parametrize("lut, isa", VARIANTS)
def test_egemm_variant_matches_dense_reference(fc_cases, lut, isa):
    for name, (layer_args, x, expected) in fc_cases.items():
        layer = EGemm(*layer_args, lut=lut, isa=isa)
        assert layer.kernel_name.endswith(isa)
        assert relative_rms(layer(x), expected) <= TOLERANCE[lut], name


def test_isa_variants_agree_closely(conv_cases):
    layer_args, x, _ = conv_cases["stride2-asymmetric"]
    for lut in TOLERANCE:
        outputs = {isa: EConv(*layer_args, lut=lut, isa=isa)(x) for isa in ISAS}
        for isa, y in outputs.items():
            # The AVX-512 int8 layer builds its table from 8-bit activations and codewords
            # (VNNI), a different quantisation from the fp32-built table of the other ISAs:
            # measured 2.3e-2 apart here, each ~2e-2 from the exact result.
            # On CPUs with AVX512-FP16 the fp16 sum adds four terms at a time in fp16: measured
            # 3.2e-4 apart here.
            bound = 5e-2 if lut == "int8" and isa == "avx512" else 1e-6
            if lut == "fp16" and isa == "avx512" and FP16_ARITHMETIC:
                bound = TOLERANCE["fp16"]
            assert relative_rms(y, outputs["scalar"]) <= bound


@pytest.mark.skipif(not FP16_ARITHMETIC, reason="the fp16 partial sums need AVX512-FP16")
def test_fp16_partial_sums_only_while_they_stay_finite(conv_cases):
    layer_args, x, _ = conv_cases["3x3"]
    reference = EConv(*layer_args, lut="fp16", isa="scalar")
    fast = EConv(*layer_args, lut="fp16", isa="avx512")
    assert relative_rms(fast(x), reference(x)) > 1e-5  # four terms summed in fp16
    # Table entries of a few thousand (within fp16) whose bound, times four, is past 65504: the
    # layer sums this input in fp32, exactly as the other instruction sets do.
    large = x * np.float32(2000)
    expected = reference(large)
    assert np.isfinite(expected).all() and np.abs(expected).max() > 1e4
    assert relative_rms(fast(large), expected) <= 1e-6


@pytest.mark.skipif("avx512" not in ISAS, reason="the quantised-activation (VNNI) int8 build needs AVX-512 VNNI")
def test_int8_input_scale_sets_the_activation_quantisation():
    rng = np.random.default_rng(7)
    codebook, codes, offsets = random_encoding(rng, (6, 3, 3), 12, 4, 16)
    bias = rng.standard_normal(6).astype(np.float32)
    x = np.maximum(rng.standard_normal((1, 12, 11, 14)), 0).astype(np.float32)  # one image: one per-call scale
    weight = decode_weight(codebook, codes, offsets, 12).transpose(0, 3, 1, 2)
    expected = conv2d_reference(x, weight, bias, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    layer_args = (codebook, codes, offsets, 12, bias, (1, 1), (1, 1, 1, 1))
    per_call = EConv(*layer_args, lut="int8", isa="avx512")(x)
    # A calibrated step is largest |input| / 127, and a ReLU'd input spreads that range over all
    # 255 levels: the input's own max / 127 reproduces the per-call quantisation (step max / 255).
    same = EConv(*layer_args, lut="int8", isa="avx512", input_scale=float(np.float32(x.max()) / np.float32(127)))(x)
    np.testing.assert_allclose(same, per_call, rtol=0, atol=1e-6 * float(np.abs(per_call).max()))
    # A scale 8x too small saturates the large activations, and the error shows it.
    clipped = EConv(*layer_args, lut="int8", isa="avx512", input_scale=float(x.max()) / 127 / 8)(x)
    assert relative_rms(per_call, expected) <= TOLERANCE["int8"] < relative_rms(clipped, expected)


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf"), 1e-40, 2e30])
def test_layers_refuse_an_input_scale_they_cannot_invert(scale):
    rng = np.random.default_rng(3)
    codebook, codes, offsets = random_encoding(rng, (4, 3, 3), 8, 4, 16)
    with pytest.raises(KernelInputError, match="input_scale must be 0 or between 1e-30 and 1e30"):
        EConv(codebook, codes, offsets, 8, np.zeros(4, np.float32), (1, 1), (1, 1, 1, 1), lut="int8",
              input_scale=scale)
    codebook, codes, offsets = random_encoding(rng, (4,), 8, 4, 16)
    with pytest.raises(KernelInputError, match="input_scale must be 0 or between 1e-30 and 1e30"):
        EGemm(codebook, codes, offsets, 8, np.zeros(4, np.float32), lut="int8", input_scale=scale)


@pytest.mark.skipif("avx512" not in ISAS, reason="the quantised-activation (VNNI) int8 build needs AVX-512 VNNI")
def test_int8_fc_input_scale_sets_the_activation_quantisation(fc_cases):
    layer_args, x, expected = fc_cases["byte-permute-relu"]
    x, expected = x[:1], expected[:1]  # one row: one per-call range
    per_call = EGemm(*layer_args, lut="int8", isa="avx512")(x)
    same = EGemm(*layer_args, lut="int8", isa="avx512", input_scale=float(np.float32(x.max()) / np.float32(127)))(x)
    np.testing.assert_allclose(same, per_call, rtol=0, atol=1e-6 * float(np.abs(per_call).max()))
    clipped = EGemm(*layer_args, lut="int8", isa="avx512", input_scale=float(x.max()) / 127 / 8)(x)
    assert relative_rms(per_call, expected) <= TOLERANCE["int8"] < relative_rms(clipped, expected)


@pytest.mark.parametrize("lut", TOLERANCE)
def test_large_tables_are_built_a_chunk_of_segments_at_a_time(lut):
    # 16 segments x 256 codewords on a 40x40 input: a strip's table outgrows the 2 MB budget,
    # so it is built and summed in chunks of segments; the layer also sees three input shapes in
    # turn (its term offsets are cached per shape). At 44x44 the strips of 8 output rows end in
    # one of 4, whose build stops at the table columns its sums read.
    rng = np.random.default_rng(3)
    codebook, codes, offsets = random_encoding(rng, (4, 3, 3), 64, 4, 256)
    bias = rng.standard_normal(4).astype(np.float32)
    weight = decode_weight(codebook, codes, offsets, 64).transpose(0, 3, 1, 2)
    layer = EConv(codebook, codes, offsets, 64, bias, (1, 1), (1, 1, 1, 1), lut=lut)
    for size in (40, 9, 44, 40):
        x = np.maximum(rng.standard_normal((1, 64, size, size)), 0).astype(np.float32)
        expected = conv2d_reference(x, weight, bias, (1, 1), (1, 1, 1, 1), (1, 1), 1)
        assert relative_rms(layer(x), expected) <= TOLERANCE[lut]


def test_threads_split_strips_without_changing_results(conv_cases):
    layer_args, x, _ = conv_cases["5x5-r-not-dividing-depth"]
    for lut in TOLERANCE:
        single = EConv(*layer_args, lut=lut)(x)
        np.testing.assert_array_equal(EConv(*layer_args, lut=lut, threads=3)(x), single)


def test_egemm_byte_permute_kernel_is_chosen_for_small_codebooks(fc_cases):
    if "avx512" not in ISAS:
        pytest.skip("needs AVX-512 VBMI")
    assert EGemm(*fc_cases["byte-permute"][0], lut="int8", isa="avx512").kernel_name == "int8-avx512"
    assert EGemm(*fc_cases["uint16-codes"][0], lut="int8", isa="avx512").kernel_name == "int8-gather-avx512"


def test_fp16_codebook_is_exact_in_fp32_tables():
    rng = np.random.default_rng(5)
    codebook, codes, offsets = random_encoding(rng, (4, 3, 3), 7, 3, codebook_dtype=np.float16)
    bias = rng.standard_normal(4).astype(np.float32)
    x = rng.standard_normal((1, 7, 8, 9)).astype(np.float32)
    weight = decode_weight(codebook, codes, offsets, 7).transpose(0, 3, 1, 2)
    expected = conv2d_reference(x, weight, bias, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    y = EConv(codebook, codes, offsets, 7, bias, (1, 1), (1, 1, 1, 1), lut="fp32")(x)
    assert relative_rms(y, expected) <= 1e-6


def test_segment_codewords_bound_every_code():
    rng = np.random.default_rng(9)
    codebook, codes, offsets = random_encoding(rng, (4, 3, 3), 6, 3, max_codewords=5, trail_rows=0)
    bias = np.zeros(4, dtype=np.float32)
    counts = [int(codes[..., v].max()) + 1 for v in range(codes.shape[-1])]
    EConv(codebook, codes, offsets, 6, bias, segment_codewords=counts)  # exactly enough rows: accepted
    counts[1] -= 1
    with pytest.raises(KernelInputError, match="exceeds segment 1's"):
        EConv(codebook, codes, offsets, 6, bias, segment_codewords=counts)
    with pytest.raises(KernelInputError, match="claims"):
        EConv(codebook, codes, offsets, 6, bias, segment_codewords=[1, len(codebook)])


@pytest.mark.parametrize("bad, message", [
    (dict(lut="int4"), "lut must be"),
    (dict(isa="neon"), "isa must be"),
    (dict(threads=0), "threads must be"),
])
def test_bad_options_are_rejected(bad, message):
    rng = np.random.default_rng(3)
    codebook, codes, offsets = random_encoding(rng, (2, 1, 1), 4, 2)
    with pytest.raises(KernelInputError, match=message):
        EConv(codebook, codes, offsets, 4, np.zeros(2, np.float32), **bad)


def test_bad_inputs_are_rejected_at_run():
    rng = np.random.default_rng(4)
    codebook, codes, offsets = random_encoding(rng, (2, 3, 3), 4, 2)
    layer = EConv(codebook, codes, offsets, 4, np.zeros(2, np.float32))
    good = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    expected = layer(good)
    # Invalid inputs are never remembered: a second call is checked again, beside valid shapes
    # whose output shapes are.
    for _ in range(2):
        with pytest.raises(KernelInputError, match="channels"):
            layer(np.zeros((1, 5, 6, 6), np.float32))
        with pytest.raises(KernelInputError, match="larger than the padded input"):
            layer(np.zeros((1, 4, 2, 2), np.float32))
        with pytest.raises(KernelInputError, match="4-D"):
            layer(np.zeros((4, 6, 6), np.float32))
        with pytest.raises(KernelInputError, match="floating-point"):
            layer(good.astype(np.int32))
        np.testing.assert_array_equal(layer(good), expected)
        np.testing.assert_array_equal(layer(good.astype(np.float64)), expected)  # converted
        np.testing.assert_array_equal(layer(np.asfortranarray(good)), expected)  # made contiguous
    fc_codebook, fc_codes, fc_offsets = random_encoding(rng, (3,), 6, 2)
    fc = EGemm(fc_codebook, fc_codes, fc_offsets, 6, np.zeros(3, np.float32))
    with pytest.raises(KernelInputError, match="features"):
        fc(np.zeros((1, 5), np.float32))
    # One feature: a 0-d input is one row of it, whatever its dtype.
    one = EGemm(*random_encoding(rng, (3,), 1, 1), 1, np.zeros(3, np.float32))
    row = one(np.array([2.0], np.float32))
    for scalar in (np.array(2.0, np.float32), np.array(2.0), np.float32(2.0)):
        np.testing.assert_array_equal(one(scalar), row)


def test_set_isa_changes_the_default_variant():
    rng = np.random.default_rng(6)
    codebook, codes, offsets = random_encoding(rng, (2, 1, 1), 4, 2)
    try:
        kernels.set_isa("scalar")
        assert EConv(codebook, codes, offsets, 4, np.zeros(2, np.float32)).kernel_name == "fp32-scalar"
    finally:
        kernels.set_isa("auto")
    with pytest.raises(KernelInputError, match="isa must be"):
        kernels.set_isa("sse9")
