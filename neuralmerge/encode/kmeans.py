"""Joint k-means encoding of an aligned group (faiss).

For each segment ``v < rho_max`` the segment vectors of every member that has segment ``v``
(NeuralMerger footnote 1) are clustered together into ``C_v`` codewords. When a segment holds at
most ``codewords`` distinct vectors the encoding is exact: the codebook is those vectors.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
from tqdm import tqdm

from neuralmerge.encode.segments import EncodedGroup, split_segments
from neuralmerge.errors import ConfigError
from neuralmerge.settings import MAX_CODEWORDS
from neuralmerge.graph.layers import Layer



def validate_settings(r: int, codewords: int) -> None:
    """Raise ``ConfigError`` unless ``r >= 1`` and ``1 <= codewords <= 65536``."""
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
        raise ConfigError(f"segment length r must be an integer >= 1, got {r!r}")
    if isinstance(codewords, bool) or not isinstance(codewords, (int, np.integer)) \
            or not 1 <= codewords <= MAX_CODEWORDS:
        raise ConfigError(f"codewords must be an integer in [1, {MAX_CODEWORDS}], got {codewords!r}")


@contextlib.contextmanager
def _blas_distances() -> Iterator[None]:
    """Let faiss compute k-means distances with BLAS even for small batches (a global setting).

    faiss 1.15 only switches to BLAS above 128 000 queries; for our 10^3–10^4 vectors of
    dimension r <= 32 its BLAS path measured ~6x faster per k-means on this CPU.
    """
    previous = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 20
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = previous


def _single_threaded_faiss() -> None:
    """Worker-thread initializer: OpenMP thread counts are per thread, so this leaves the caller's alone."""
    faiss.omp_set_num_threads(1)


def _distinct(vectors: np.ndarray, codewords: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(unique rows, inverse)`` if there are at most ``codewords`` distinct rows, else None.

    Rows are compared as bytes, so the exact codebook reproduces every weight bit for bit.
    """
    if len(vectors) > codewords:
        # cheap lower bound first: more distinct values in one coordinate than codewords
        if len(np.unique(vectors[:, 0])) > codewords:
            return None
    rows = np.ascontiguousarray(vectors).view(np.dtype((np.void, vectors.itemsize * vectors.shape[1])))[:, 0]
    unique, inverse = np.unique(rows, return_inverse=True)
    if len(unique) > codewords:
        return None
    return unique.view(np.float32).reshape(len(unique), vectors.shape[1]), inverse.reshape(-1)


def _cluster_segment(vectors: np.ndarray, codewords: int, *, seed: int, nredo: int, niter: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Codebook ``[C_v, r]`` and per-vector codes for one segment's vectors ``[n, r]`` (float32)."""
    exact = _distinct(vectors, codewords)
    if exact is not None:
        return exact
    kmeans = faiss.Kmeans(vectors.shape[1], codewords, niter=niter, nredo=nredo, seed=seed,
                          min_points_per_centroid=1, verbose=False)  # min=1: no "too few points" warning
    kmeans.train(vectors)
    _, labels = kmeans.index.search(vectors, 1)
    return kmeans.centroids, labels[:, 0]


FLOAT16_MAX = 65504.0


def stored_as(codebook: np.ndarray, codebook_dtype: str, name: str) -> np.ndarray:
    """``codebook`` rounded to its storage type (as float32), or a ConfigError if float16 cannot hold it."""
    if codebook_dtype != "float16":
        return codebook
    largest = float(np.abs(codebook).max(initial=0.0))
    if not largest <= FLOAT16_MAX:
        raise ConfigError(f"group {name}: codewords reach {largest:.3g}, beyond float16's range "
                          f"({FLOAT16_MAX:g}); use --codebook-dtype float32")
    return codebook.astype(np.float16).astype(np.float32)


def encode_group(members: list[Layer], r: int, codewords: int, *, seed: int = 0, nredo: int = 3,
                 niter: int = 25, name: str = "", progress: bool = False,
                 codebook_dtype: str = "float32") -> EncodedGroup:
    """Jointly encode the weights of ``members`` (one aligned group) into a shared codebook.

    ``r`` is clipped to the smallest member depth (the result records the ``r`` used). With a
    float16 ``codebook_dtype`` the codewords are rounded as they will be stored, so the errors
    count the rounding. Segments
    are clustered in parallel on ``faiss.omp_get_max_threads()`` threads, each k-means on one
    thread: these k-means are too small for OpenMP inside one to pay (LeNet fc1: 7 s on one
    thread, 53 s on two when the cores were shared). So results depend only on ``seed``.
    """
    validate_settings(r, codewords)
    if not members or len({m.kind for m in members}) != 1:
        raise ValueError("encode_group needs at least one member, all of one kind")
    kind = members[0].kind
    r = int(min(r, min(m.depth for m in members)))
    segments = [split_segments(m.weight, kind, r) for m in members]    # [..., rho_m, r]
    rhos = [s.shape[-2] for s in segments]
    code_dtype = np.uint8 if codewords <= 256 else np.uint16
    codes = [np.empty(s.shape[:-1], dtype=code_dtype) for s in segments]

    def encode_segment(v: int) -> tuple[np.ndarray, float, int]:
        """Cluster segment v, write its codes; return (codebook, squared error, real entries)."""
        owners = [k for k, rho in enumerate(rhos) if v < rho]
        parts = [segments[k][..., v, :].reshape(-1, r) for k in owners]
        vectors = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
        book, labels = _cluster_segment(vectors, codewords, seed=(seed + v) % 2**31, nredo=nredo, niter=niter)
        book = stored_as(book, codebook_dtype, name)
        error = book[labels] - vectors
        squared_error, real_entries, start = 0.0, 0, 0
        for k, part in zip(owners, parts):
            stop = start + len(part)
            codes[k][..., v] = labels[start:stop].reshape(codes[k].shape[:-1])
            real = min(r, members[k].depth - v * r)  # padded tail of the last segment is not a weight
            squared_error += float(np.square(error[start:stop, :real], dtype=np.float64).sum())
            real_entries += len(part) * real
            start = stop
        return np.asarray(book, dtype=np.float32), squared_error, real_entries

    with _blas_distances(), ThreadPoolExecutor(faiss.omp_get_max_threads(), initializer=_single_threaded_faiss) as pool:
        results = list(tqdm(pool.map(encode_segment, range(max(rhos))), total=max(rhos),
                            desc=f"encode {name}".strip(), disable=not progress, leave=False))

    books = [book for book, _, _ in results]
    squared_error = sum(err for _, err, _ in results)
    real_entries = sum(n for _, _, n in results)
    segment_codewords = [len(book) for book in books]
    if max(segment_codewords) <= 256:
        codes = [c.astype(np.uint8) for c in codes]
    norm = sum(float(np.square(m.weight, dtype=np.float64).sum()) for m in members)
    return EncodedGroup(
        name=name, kind=kind, r=r,
        codebook=np.concatenate(books),
        segment_codewords=segment_codewords,
        offsets=np.concatenate([[0], np.cumsum(segment_codewords)[:-1]]).astype(np.int64),
        codes=codes,
        mse=squared_error / real_entries,
        relative_error=float(np.sqrt(squared_error / norm)) if norm > 0 else 0.0,
    )

