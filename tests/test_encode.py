"""Segment split/decode and joint k-means encoding (faiss)."""
from __future__ import annotations

import numpy as np
import pytest

from neuralmerge.encode.kmeans import encode_group
from neuralmerge.encode.segments import decode_member, join_segments, split_segments
from neuralmerge.errors import ConfigError
from neuralmerge.graph.layers import Layer


def layer(model: int, weight: np.ndarray) -> Layer:
    kind = "conv" if weight.ndim == 4 else "fc"
    return Layer(model=model, node=f"n{model}", op_type="Conv" if kind == "conv" else "Gemm", kind=kind,
                 weight=weight.astype(np.float32), bias=None, weight_name="w", bias_name=None)


def random(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_split_follows_design_convention_and_round_trips():
    w = random((3, 5, 2, 2), 0)  # p=3, d=5, r=2 -> rho=3, last segment padded
    seg = split_segments(w, "conv", 2)
    assert seg.shape == (3, 2, 2, 3, 2)
    t, i0, j0, v = 1, 0, 1, 1
    np.testing.assert_array_equal(seg[t, i0, j0, v], w[t, v * 2:(v + 1) * 2, i0, j0])
    np.testing.assert_array_equal(seg[t, i0, j0, 2], [w[t, 4, i0, j0], 0.0])
    np.testing.assert_array_equal(join_segments(seg, "conv", 5), w)


def test_exact_when_distinct_vectors_fit_with_ragged_segment_codewords():
    rng = np.random.default_rng(1)
    # segment 0 draws from 3 distinct vectors, segment 1 from 7, segment 2 from 16 (d=12, r=4)
    pools = [random((n, 4), 10 + n) for n in (3, 7, 16)]
    def make(p):
        w = np.empty((p, 12, 3, 3), np.float32)
        for v, pool in enumerate(pools):
            w[:, v * 4:(v + 1) * 4] = pool[rng.integers(0, len(pool), (p, 3, 3))].transpose(0, 3, 1, 2)
        return w
    members = [layer(0, make(8)), layer(1, make(6))]
    enc = encode_group(members, 4, 16)
    assert enc.segment_codewords == [3, 7, 16]
    assert enc.offsets.tolist() == [0, 3, 10] and enc.offsets.dtype == np.int64
    assert enc.codebook.shape == (26, 4) and enc.codebook.dtype == np.float32
    for k, m in enumerate(members):
        assert enc.codes[k].shape == (m.shape[0], 3, 3, 3)
        np.testing.assert_array_equal(decode_member(enc, k, m.depth), m.weight)   # bit for bit
    assert enc.mse == 0.0 and enc.relative_error == 0.0


def test_footnote1_members_with_different_depths():
    a, b = layer(0, random((16, 8, 3, 3), 2)), layer(1, random((16, 20, 3, 3), 3))  # r=8: rho 1 and 3
    enc = encode_group([a, b], 8, 32)
    assert enc.r == 8 and len(enc.segment_codewords) == 3
    assert enc.codes[0].shape == (16, 3, 3, 1) and enc.codes[1].shape == (16, 3, 3, 3)
    # segment 0 pools both members (2·144 vectors > 32), segments 1-2 only model 1's 144 vectors
    assert enc.segment_codewords == [32, 32, 32]
    da, db = decode_member(enc, 0, 8), decode_member(enc, 1, 20)
    assert da.shape == a.shape and db.shape == b.shape
    # the reported error is over real entries only (b's last segment has 4 real of 8)
    err = np.concatenate([(da - a.weight).ravel(), (db - b.weight).ravel()]).astype(np.float64)
    ref = np.concatenate([a.weight.ravel(), b.weight.ravel()]).astype(np.float64)
    assert enc.mse == pytest.approx(np.mean(err ** 2), rel=1e-6)
    assert enc.relative_error == pytest.approx(np.linalg.norm(err) / np.linalg.norm(ref), rel=1e-6)
    # a tiny segment owned by one member is coded exactly (its 144 vectors ≤ 256 codewords)
    small = encode_group([a, b], 8, 256)
    assert small.segment_codewords == [256, 144, 144]
    np.testing.assert_array_equal(decode_member(small, 1, 20)[:, 8:], b.weight[:, 8:])


def test_r_is_clipped_to_the_smallest_depth():
    a, b = layer(0, random((8, 3, 3, 3), 4)), layer(1, random((8, 16, 3, 3), 5))
    enc = encode_group([a, b], 32, 8)
    assert enc.r == 3 and enc.codebook.shape[1] == 3
    assert enc.codes[0].shape[-1] == 1 and enc.codes[1].shape[-1] == 6   # ceil(16 / 3)
    assert decode_member(enc, 1, 16).shape == b.shape


def test_deterministic_for_a_fixed_seed():
    members = [layer(0, random((64, 128), 6)), layer(1, random((64, 128), 7))]
    first, again = encode_group(members, 4, 16, seed=3), encode_group(members, 4, 16, seed=3)
    np.testing.assert_array_equal(first.codebook, again.codebook)
    for x, y in zip(first.codes, again.codes):
        np.testing.assert_array_equal(x, y)
    other = encode_group(members, 4, 16, seed=4)
    assert not np.array_equal(other.codebook, first.codebook)


def test_error_decreases_as_codewords_grow():
    members = [layer(0, random((32, 16, 3, 3), 8)), layer(1, random((32, 16, 3, 3), 9))]
    errors = [encode_group(members, 4, c).mse for c in (4, 16, 64, 256)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.5 * errors[0]
    assert 0.0 < errors[-1]


def test_codes_dtype_uint8_vs_uint16():
    members = [layer(0, random((200, 16), 10)), layer(1, random((200, 16), 11))]  # 400 vectors per segment
    small = encode_group(members, 8, 256, niter=2, nredo=1)
    big = encode_group(members, 8, 300, niter=2, nredo=1)
    assert all(c.dtype == np.uint8 for c in small.codes)
    assert all(c.dtype == np.uint16 for c in big.codes) and big.segment_codewords == [300, 300]
    assert int(big.codes[0].max()) >= 256
    # C > 256 requested but every segment has ≤ 256 distinct vectors: still uint8
    tiny = encode_group([layer(0, random((100, 16), 12))], 8, 300)
    assert tiny.segment_codewords == [100, 100] and tiny.codes[0].dtype == np.uint8


def test_fc_layout():
    a, b = layer(0, random((10, 24), 13)), layer(1, random((6, 13), 14))
    enc = encode_group([a, b], 8, 4)
    assert enc.kind == "fc" and enc.r == 8
    assert enc.codes[0].shape == (10, 3) and enc.codes[1].shape == (6, 2)
    wa = decode_member(enc, 0, 24)
    rows = enc.codes[0].astype(np.int64) + enc.offsets[:3]
    np.testing.assert_array_equal(wa[2, 8:16], enc.codebook[rows[2, 1]])   # W'[t, v·r+k] = B[v][pi[t,v]][k]
    assert decode_member(enc, 1, 13).shape == (6, 13)


@pytest.mark.parametrize("r, codewords, message", [
    (0, 16, "segment length r must be an integer >= 1, got 0"),
    (4, 0, r"codewords must be an integer in \[1, 65536\], got 0"),
    (4, 70000, r"codewords must be an integer in \[1, 65536\], got 70000"),
])
def test_invalid_settings_raise_config_error(r, codewords, message):
    with pytest.raises(ConfigError, match=message):
        encode_group([layer(0, random((4, 8), 15))], r, codewords)


def test_faiss_global_settings_are_restored():
    import faiss
    threads, threshold = faiss.omp_get_max_threads(), faiss.cvar.distance_compute_blas_threshold
    faiss.omp_set_num_threads(1)
    try:
        encode_group([layer(0, random((64, 32), 16))], 4, 8)
        assert faiss.omp_get_max_threads() == 1
        assert faiss.cvar.distance_compute_blas_threshold == threshold
    finally:
        faiss.omp_set_num_threads(threads)


def test_result_does_not_depend_on_the_thread_count():
    import faiss
    members = [layer(0, random((128, 64), 17)), layer(1, random((128, 64), 18))]
    threads = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        one = encode_group(members, 4, 32)
        faiss.omp_set_num_threads(2)
        two = encode_group(members, 4, 32)
    finally:
        faiss.omp_set_num_threads(threads)
    np.testing.assert_array_equal(one.codebook, two.codebook)
    for x, y in zip(one.codes, two.codes):
        np.testing.assert_array_equal(x, y)
