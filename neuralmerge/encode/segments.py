"""Split canonical weights into 1×1×r segment vectors and decode them back (pure numpy).

docs/format.md: ``w[t, i0, j0, v] = W[t, v*r:(v+1)*r, i0, j0]``; the last segment is zero-padded.
Conv weights ``[p, d, kh, kw]`` become ``[p, kh, kw, rho, r]``; fc weights ``[n_out, d]`` become
``[n_out, rho, r]``. Codes have the same shape without the trailing ``r``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class EncodedGroup:
    """One group's shared codebook and every member's codes (docs/format.md)."""
    name: str
    kind: str                       # "conv" | "fc"
    r: int                          # segment length actually used (clipped to the smallest depth)
    codebook: np.ndarray            # [K, r] float32, segment v owns rows offsets[v] .. offsets[v] + C_v
    segment_codewords: list[int]    # C_v for v < rho_max
    offsets: np.ndarray             # [rho_max] int64, cumsum of C_v starting at 0
    codes: list[np.ndarray]         # per member: conv [p, kh, kw, rho_m], fc [n_out, rho_m]; uint8 / uint16
    mse: float                      # mean squared error over all members' real (unpadded) weights
    relative_error: float           # ||W' - W||_F / ||W||_F over all members


def num_segments(depth: int, r: int) -> int:
    """rho = ceil(depth / r)."""
    return -(-depth // r)


def split_segments(weight: np.ndarray, kind: str, r: int) -> np.ndarray:
    """Canonical weight -> segment vectors ``[..., rho, r]`` (a view when no padding is needed)."""
    vectors = np.moveaxis(weight, 1, -1) if kind == "conv" else weight  # depth last: [..., d]
    depth = vectors.shape[-1]
    rho = num_segments(depth, r)
    if rho * r != depth:
        pad = [(0, 0)] * (vectors.ndim - 1) + [(0, rho * r - depth)]
        vectors = np.pad(vectors, pad)
    return vectors.reshape(*vectors.shape[:-1], rho, r)


def join_segments(vectors: np.ndarray, kind: str, depth: int) -> np.ndarray:
    """Segment vectors ``[..., rho, r]`` -> canonical weight, cut back to ``depth``."""
    flat = vectors.reshape(*vectors.shape[:-2], -1)[..., :depth]
    return np.ascontiguousarray(np.moveaxis(flat, -1, 1) if kind == "conv" else flat)


def decode_member(enc: EncodedGroup, index: int, depth: int) -> np.ndarray:
    """The canonical float32 weight of member ``index`` as the codebook encodes it."""
    codes = enc.codes[index]
    rows = codes.astype(np.int64) + enc.offsets[: codes.shape[-1]]
    return join_segments(enc.codebook[rows], enc.kind, depth)
