"""The exact fp32 LUT kernels (neuralmerge._lut) against a direct numpy reference.

The reference decodes the weight exactly as docs/format.md states and runs a plain float64
convolution / matmul, so any indexing error in the table build or the table sums shows up.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from neuralmerge.errors import NeuralMergeError
from neuralmerge.runtime import kernels
from neuralmerge.runtime.kernels import KernelInputError, econv, egemm


# ---------------------------------------------------------------------------------------------
# reference


def decode_weight(codebook, codes, offsets, depth):
    """docs/format.md: W[..., v*r + k] = codebook[offsets[v] + codes[..., v], k], cut to depth."""
    vectors = codebook.astype(np.float64)[codes.astype(np.int64) + offsets]  # [..., rho, r]
    return vectors.reshape(*codes.shape[:-1], -1)[..., :depth]


def conv2d_reference(x, weight, bias, strides, pads, dilations, group):
    """Direct float64 convolution, ONNX semantics; weight is OIHW [p, d, kh, kw]."""
    x = x.astype(np.float64)
    top, left, bottom, right = pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    batch, _, padded_h, padded_w = x.shape
    p, depth, kh, kw = weight.shape
    (sh, sw), (dh, dw) = strides, dilations
    out_h = (padded_h - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded_w - dw * (kw - 1) - 1) // sw + 1
    y = np.empty((batch, p, out_h, out_w))
    per_group = p // group
    for t in range(p):
        g = t // per_group
        x_group = x[:, g * depth:(g + 1) * depth]
        acc = np.full((batch, out_h, out_w), float(bias[t]))
        for i0, j0 in itertools.product(range(kh), range(kw)):
            rows = slice(i0 * dh, i0 * dh + sh * (out_h - 1) + 1, sh)
            cols = slice(j0 * dw, j0 * dw + sw * (out_w - 1) + 1, sw)
            acc += np.einsum("ndhw,d->nhw", x_group[:, :, rows, cols], weight[t, :, i0, j0])
        y[:, t] = acc
    return y


def random_encoding(rng, code_shape, depth, r, max_codewords=12, code_dtype=np.uint8,
                    codebook_dtype=np.float32, lead_rows=3, trail_rows=5):
    """A random encoded weight with ragged per-segment codeword counts.

    The codebook also holds `lead_rows` rows before the layer's first segment and `trail_rows`
    after its last one (other layers of a shared group), which the kernel must not use.
    """
    rho = -(-depth // r)
    counts = rng.integers(1, max_codewords + 1, size=rho)
    offsets = lead_rows + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    rows = lead_rows + int(counts.sum()) + trail_rows
    codebook = rng.standard_normal((rows, r)).astype(codebook_dtype)
    codes = np.stack([rng.integers(0, c, size=code_shape) for c in counts], axis=-1).astype(code_dtype)
    return codebook, codes, offsets


def assert_close(actual, expected):
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def check_econv(rng, *, kernel, strides, pads, dilations, group, depth, r, p, size=(12, 13),
                code_dtype=np.uint8, codebook_dtype=np.float32, max_codewords=12, batch=2):
    in_channels = depth * group
    codebook, codes, offsets = random_encoding(rng, (p, *kernel), depth, r, max_codewords, code_dtype,
                                               codebook_dtype)
    bias = rng.standard_normal(p).astype(np.float32)
    x = rng.standard_normal((batch, in_channels, *size)).astype(np.float32)
    y = econv(x, codebook, codes, offsets, depth, bias, strides, pads, dilations, group)
    weight = decode_weight(codebook, codes, offsets, depth).transpose(0, 3, 1, 2)
    assert_close(y, conv2d_reference(x, weight, bias, strides, pads, dilations, group))


# ---------------------------------------------------------------------------------------------
# E-Conv


GROUPINGS = {"dense": (1, 5, 4), "grouped": (2, 5, 4), "depthwise": (4, 1, 8)}  # group, depth, p


@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("stride", [1, 2, 4])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("pads", [(2, 2, 2, 2), (0, 3, 1, 2)], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_econv_geometry_matches_reference(kernel, stride, dilation, pads, grouping):
    group, depth, p = GROUPINGS[grouping]
    rng = np.random.default_rng([kernel, stride, dilation, pads[1], group])
    check_econv(rng, kernel=(kernel, kernel), strides=(stride, stride), pads=pads, dilations=(dilation, dilation),
                group=group, depth=depth, r=min(3, depth), p=p)


@pytest.mark.parametrize("r, depth", [(1, 5), (3, 7), (3, 9), (8, 20), (8, 8), (8, 3)])
@pytest.mark.parametrize("code_dtype, max_codewords", [(np.uint8, 256), (np.uint16, 700)])
def test_econv_segment_lengths_and_code_types(r, depth, code_dtype, max_codewords):
    rng = np.random.default_rng([r, depth, max_codewords])
    check_econv(rng, kernel=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1), group=1, depth=depth, r=r,
                p=6, code_dtype=code_dtype, max_codewords=max_codewords)


def test_econv_anisotropic_geometry():
    rng = np.random.default_rng(7)
    check_econv(rng, kernel=(3, 2), strides=(1, 3), pads=(0, 2, 3, 0), dilations=(2, 1), group=2, depth=6, r=4,
                p=4, size=(9, 14), batch=3)


def test_econv_fp16_codebook_is_widened_exactly():
    rng = np.random.default_rng(11)
    codebook, codes, offsets = random_encoding(rng, (4, 3, 3), depth=7, r=3, codebook_dtype=np.float16)
    bias = rng.standard_normal(4).astype(np.float32)
    x = rng.standard_normal((2, 7, 8, 8)).astype(np.float32)
    y16 = econv(x, codebook, codes, offsets, 7, bias, pads=(1, 1, 1, 1))
    y32 = econv(x, codebook.astype(np.float32), codes, offsets, 7, bias, pads=(1, 1, 1, 1))
    np.testing.assert_array_equal(y16, y32)
    check_econv(rng, kernel=(7, 7), strides=(2, 2), pads=(3, 3, 3, 3), dilations=(1, 1), group=1, depth=3, r=3,
                p=5, codebook_dtype=np.float16)


def test_econv_selecting_identity_codewords_copies_channels():
    # 1x1 kernel, r = 1, codebook row c = c: output t is exactly (code of t) * x[:, 0] + bias[t].
    codebook = np.arange(4, dtype=np.float32).reshape(4, 1)
    codes = np.array([3, 0, 2], dtype=np.uint8).reshape(3, 1, 1, 1)
    x = np.arange(2 * 1 * 2 * 3, dtype=np.float32).reshape(2, 1, 2, 3)
    bias = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    y = econv(x, codebook, codes, np.array([0]), 1, bias)
    expected = np.stack([3 * x[:, 0] + 0.5, 0 * x[:, 0] - 1.0, 2 * x[:, 0] + 2.0], axis=1)
    np.testing.assert_array_equal(y, expected)


def test_econv_accepts_depth_as_stored_in_the_file():
    rng = np.random.default_rng(3)
    codebook, codes, offsets = random_encoding(rng, (2, 1, 1), depth=4, r=2)
    x = rng.standard_normal((1, 4, 3, 3)).astype(np.float32)
    bias = np.zeros(2, np.float32)
    np.testing.assert_array_equal(econv(x, codebook, codes, offsets, np.array([4]), bias),
                                  econv(x, codebook, codes, offsets, 4, bias))


# ---------------------------------------------------------------------------------------------
# E-FC


@pytest.mark.parametrize("r, n_in", [(1, 5), (3, 20), (8, 20), (8, 64)])
@pytest.mark.parametrize("code_dtype, max_codewords, codebook_dtype",
                         [(np.uint8, 200, np.float32), (np.uint16, 600, np.float16)])
def test_egemm_matches_reference(r, n_in, code_dtype, max_codewords, codebook_dtype):
    rng = np.random.default_rng([r, n_in, max_codewords])
    codebook, codes, offsets = random_encoding(rng, (9,), n_in, r, max_codewords, code_dtype, codebook_dtype)
    bias = rng.standard_normal(9).astype(np.float32)
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    weight = decode_weight(codebook, codes, offsets, n_in)
    assert_close(egemm(x, codebook, codes, offsets, n_in, bias), x.astype(np.float64) @ weight.T + bias)


def test_egemm_keeps_leading_dimensions():
    rng = np.random.default_rng(5)
    codebook, codes, offsets = random_encoding(rng, (6,), 10, 4)
    bias = rng.standard_normal(6).astype(np.float32)
    x = rng.standard_normal((2, 3, 10)).astype(np.float32)
    y = egemm(x, codebook, codes, offsets, 10, bias)
    assert y.shape == (2, 3, 6)
    np.testing.assert_array_equal(y[1, 2], egemm(x[1, 2:3], codebook, codes, offsets, 10, bias)[0])


# ---------------------------------------------------------------------------------------------
# invalid inputs: a clear ValueError (KernelInputError), never a crash or an out-of-bounds read


def conv_inputs():
    """A valid EConv call: depth 5, r 2 (3 segments), p 4, 3x3, on a [2, 5, 6, 6] input."""
    rng = np.random.default_rng(0)
    codebook, codes, offsets = random_encoding(rng, (4, 3, 3), depth=5, r=2, lead_rows=0, trail_rows=0)
    x = rng.standard_normal((2, 5, 6, 6)).astype(np.float32)
    return dict(x=x, codebook=codebook, codes=codes, offsets=offsets, depth=5, bias=np.zeros(4, np.float32))


def with_code(codes, segment, value):
    codes = codes.astype(np.uint16)
    codes[1, 2, 0, segment] = value
    return codes


def segment_size(inputs, segment):
    offsets, rows = inputs["offsets"], len(inputs["codebook"])
    end = offsets[segment + 1] if segment + 1 < len(offsets) else rows
    return int(end - offsets[segment])


BAD_CONV_INPUTS = {
    "code at segment size": (lambda a: {"codes": with_code(a["codes"], 0, segment_size(a, 0))}, "exceeds segment 0"),
    "code past codebook": (lambda a: {"codes": with_code(a["codes"], 2, 60000)}, "exceeds segment 2"),
    "offsets decreasing": (lambda a: {"offsets": a["offsets"][[0, 2, 1]]}, "strictly increasing"),
    "offsets repeated": (lambda a: {"offsets": a["offsets"][[0, 0, 1]]}, "strictly increasing"),
    "offset negative": (lambda a: {"offsets": a["offsets"] - a["offsets"][1]}, "outside the codebook"),
    "offset past codebook": (lambda a: {"offsets": a["offsets"] + len(a["codebook"])}, "outside the codebook"),
    "depth too large": (lambda a: {"depth": 7, "x": np.zeros((2, 7, 6, 6), np.float32)}, "does not match"),
    "depth too small": (lambda a: {"depth": 4, "x": np.zeros((2, 4, 6, 6), np.float32)}, "does not match"),
    "wrong channel count": (lambda a: {"x": a["x"][:, :4]}, "channels but depth"),
    "p not divisible by group": (lambda a: {"group": 3, "x": np.zeros((2, 15, 6, 6), np.float32)}, "divisible"),
    "kernel larger than input": (lambda a: {"x": a["x"][:, :, :2]}, "larger than the padded input"),
    "negative pad": (lambda a: {"pads": (0, -1, 0, 0)}, "pad"),
    "zero stride": (lambda a: {"strides": (0, 1)}, "stride"),
    "zero dilation": (lambda a: {"dilations": (1, 0)}, "dilation"),
    "offsets length": (lambda a: {"offsets": a["offsets"][:2]}, "offsets must have shape"),
    "bias length": (lambda a: {"bias": np.zeros(3, np.float32)}, "bias must have shape"),
    "codes dtype": (lambda a: {"codes": a["codes"].astype(np.int64)}, "uint8 or uint16"),
    "codebook dtype": (lambda a: {"codebook": a["codebook"].astype(np.float64)}, "float32 or float16"),
    "codes rank": (lambda a: {"codes": a["codes"][0]}, "codes must be 4-D"),
    "x rank": (lambda a: {"x": a["x"][0]}, "x must be 4-D"),
}


@pytest.mark.parametrize("case", BAD_CONV_INPUTS)
def test_econv_rejects_bad_inputs(case):
    change, message = BAD_CONV_INPUTS[case]
    inputs = conv_inputs()
    inputs.update(change(inputs))
    with pytest.raises(KernelInputError, match=message) as raised:
        econv(**inputs)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, NeuralMergeError)
    assert "\n" not in str(raised.value)


def test_egemm_rejects_bad_inputs():
    rng = np.random.default_rng(1)
    codebook, codes, offsets = random_encoding(rng, (3,), 6, 4, lead_rows=0, trail_rows=0)
    x, bias = np.ones((2, 6), np.float32), np.zeros(3, np.float32)
    with pytest.raises(KernelInputError, match="features but depth"):
        egemm(np.ones((2, 5), np.float32), codebook, codes, offsets, 6, bias)
    past_codebook = codes.copy()
    past_codebook[2, 1] = 255
    with pytest.raises(KernelInputError, match="exceeds segment 1"):
        egemm(x, codebook, past_codebook, offsets, 6, bias)
    with pytest.raises(KernelInputError, match="does not match"):
        egemm(np.ones((2, 9), np.float32), codebook, codes, offsets, 9, bias)


def test_native_module_checks_arrays_itself():
    inputs = conv_inputs()
    args = (inputs["x"], inputs["codebook"], inputs["codes"], inputs["offsets"], 5, inputs["bias"],
            (1, 1), (0, 0, 0, 0), (1, 1), 1)
    with pytest.raises(ValueError, match="out must have shape"):
        kernels._lut.econv(*args, np.empty((2, 4, 3, 3), np.float32))
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        kernels._lut.econv(*args, np.empty((2, 4, 4, 8), np.float32)[..., ::2])
    with pytest.raises(ValueError, match="x must have dtype float32"):
        kernels._lut.econv(inputs["x"].astype(np.float64), *args[1:], np.empty((2, 4, 4, 4), np.float32))
