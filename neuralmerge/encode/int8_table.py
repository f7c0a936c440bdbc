"""The native runtime's int8 E-layer arithmetic, simulated in torch for int8-aware calibration.

With ``lut="int8"`` on a CPU with AVX-512 VNNI (csrc/kernels/econv_layer.cpp, egemm_layer.cpp)
an E-layer call rounds three times: the input to 8-bit levels (its own range, or the calibrated
step recorded in ``neuralmerge.int8_scales``), each segment's codewords to int8 (one step per
segment), and every table entry to int8 under one scale per image (a Cauchy-Schwarz bound, so no
entry saturates). The sum of table entries is then exact. These functions reproduce each rounding
with the runtime's rules, so that a forward pass gives the int8 runtime's output (up to float
summation order) and calibration can train against it: gradients pass every rounding straight
through (the straight-through estimator) and stop where a value is clamped.

Written here because no library models a lookup-table layer's quantisation: torch's fake-quant
observers round weights and activations of dense layers, not table entries.

Where this CPU runs those very kernels, the forward value comes from them (``use_native``): the
same numbers (tests/test_int8_table.py checks the two paths against each other) 15-20x faster
than the gathers below. Elsewhere the torch path computes it.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

INT8_LIMIT = 127.0


@lru_cache(maxsize=None)
def _native_kernels():
    """The runtime's kernels module if this CPU has the AVX-512 VNNI kernels simulated here, else None
    (also when the compiled module is missing: calibration then computes the forward in torch)."""
    try:
        from neuralmerge.runtime import kernels  # numpy and the compiled module only
    except ImportError:
        return None
    try:
        kernels.EGemm(np.ones((1, 1), np.float32), np.zeros((1, 1), np.uint8), np.zeros(1, np.int64), 1,
                      np.zeros(1, np.float32), lut="int8", isa="avx512")
    except kernels.KernelInputError:
        return None
    return kernels


def _as_arrays(codebook: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor) -> tuple:
    """An E-layer's tensors as the runtime's kernels take them."""
    as_codes = np.uint8 if int(codes.max()) < 256 else np.uint16
    return (codebook.detach().float().numpy(), codes.numpy().astype(as_codes), offsets.numpy().astype(np.int64),
            bias.detach().float().numpy())


def _ste_round(x: torch.Tensor, lowest=-float("inf"), highest=float("inf")) -> torch.Tensor:
    """round(clamp(x, lowest, highest)) forward (half to even, like the runtime); backward, the
    identity where x rounds to a level in range and zero where it was clamped. (The largest entry
    of a range sits at its end, and a float ratio of 127.00001 must not lose its gradient.)"""
    kept = ((x >= lowest - 0.5) & (x <= highest + 0.5)).to(x.dtype)
    through = x * kept
    return through + (torch.round(torch.clamp(x, lowest, highest)) - through).detach()


def activation_step(low: torch.Tensor, high: torch.Tensor, peak: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(step, lowest level, highest level) of inputs spanning [low, high] (detail::activation_quantisation).

    Inputs with a negative value get levels -127..127 (zero point 128); inputs >= 0 all 256.
    ``peak`` is the calibrated largest |input| (its step is peak / 127, spread over 255 levels
    for inputs >= 0); 0 uses each input's own range.
    """
    signed = low < 0
    if peak > 0:
        input_scale = torch.tensor(peak / INT8_LIMIT, dtype=torch.float32)  # what runtime/pack.py passes
        step = torch.where(signed, input_scale, input_scale * (127.0 / 255.0))
    else:
        spread = torch.where(signed, torch.maximum(-low, high) / INT8_LIMIT, high / 255.0)
        step = torch.where((spread > 0) & torch.isfinite(spread), spread, torch.ones_like(spread))
    lowest = torch.where(signed, torch.full_like(step, -INT8_LIMIT), torch.zeros_like(step))
    highest = torch.where(signed, torch.full_like(step, INT8_LIMIT), torch.full_like(step, 255.0))
    return step.detach(), lowest, highest


def _with_value(dense: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """``exact`` forward, the gradient of ``dense`` backward."""
    return dense + (exact - dense).detach()


def _table_scale(bound: torch.Tensor) -> torch.Tensor:
    """The table's scale from a bound on its entries' magnitude (1 when the bound is 0 or not finite)."""
    return torch.where((bound > 0) & torch.isfinite(bound), bound / INT8_LIMIT, torch.ones_like(bound))


def _levels(x: torch.Tensor, step: torch.Tensor, lowest: torch.Tensor, highest: torch.Tensor) -> torch.Tensor:
    """x in steps, clamped and rounded: the uint8 level minus the zero point (gradient straight through)."""
    return _ste_round(x * (1.0 / step), lowest, highest)


class _Segments:
    """A layer's codebook cut into its segments, padded to one shape: ``words`` ``[rho, C, r]``
    (row c of segment v is codebook row offsets[v] + c), ``valid`` ``[rho, C, r]`` marks the rows a
    code uses (the runtime keeps rows up to the largest code) and the channels within ``depth``."""

    def __init__(self, codebook: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor, depth: int):
        rho, r = codes.shape[-1], codebook.shape[1]
        rows = codes.reshape(-1, rho).long().amax(0) + 1
        self.width = int(rows.max())
        index = offsets.long()[:, None] + torch.arange(self.width)
        kept_rows = torch.arange(self.width)[None, :] < rows[:, None]
        picked = index.clamp(max=codebook.shape[0] - 1)  # index_select: a reproducible backward (modules.py)
        self.words = codebook.float().index_select(0, picked.reshape(-1)).reshape(*picked.shape, r) * kept_rows[..., None]
        used = (torch.arange(rho)[:, None] * r + torch.arange(r)) < depth  # [rho, r]
        self.kept_rows = kept_rows
        self.used = used
        self.valid = kept_rows[..., None] & used[:, None, :]
        self.picks = codes.long() + torch.arange(rho) * self.width  # rows of the flattened [rho * C] table
        self.depth = depth

    def steps(self, over_used_channels: bool) -> torch.Tensor:
        """Each segment's int8 codebook step: largest |entry| / 127 in float32 (1 for an all-zero segment).

        E-Conv takes the largest over the channels within depth, E-FC over all r."""
        with torch.no_grad():
            mask = self.valid if over_used_channels else self.kept_rows[..., None]
            largest = (self.words.abs() * mask).flatten(1).amax(1)
            return torch.where(largest > 0, largest / INT8_LIMIT, torch.ones_like(largest))

    def decoded(self, words: torch.Tensor) -> torch.Tensor:
        """Weights ``[*codes.shape[:-1], depth]`` decoded from segment words ``[rho, C, r]``."""
        vectors = words.reshape(-1, words.shape[-1])[self.picks]  # [..., rho, r]
        return vectors.reshape(*vectors.shape[:-2], -1)[..., :self.depth]


def _read_pixels(height: int, width: int, kernel, strides, pads, dilations) -> torch.Tensor:
    """[H, W] mask of the input pixels a strided, dilated convolution reads (its phase planes)."""
    masks = []
    for size, k, stride, pad, dilation in zip((height, width), kernel, strides, pads[:2], dilations):
        phases = {(i * dilation) % stride for i in range(k)}
        masks.append(torch.tensor([(j + pad) % stride in phases for j in range(size)], dtype=torch.float32))
    return masks[0][:, None] * masks[1][None, :]


def _table_sum(table: torch.Tensor, picks: torch.Tensor, out_size, strides, dilations, group: int) -> torch.Tensor:
    """out[n, o, y, x] = sum over taps (i, j) and segments v of table[n, g(o) rows + picks[o, i, j, v], y*s + i*d, x*s + j*d].

    The runtime's sum of table entries, one tap at a time: a channel gather of the tap's shifted
    window (the entries are multiples of one scale per image, so float sums are exact enough).
    """
    n, channels, _, _ = table.shape
    p, kh, kw, rho = picks.shape
    (oh, ow), (sh, sw), (dh, dw) = out_size, strides, dilations
    first_row = (torch.arange(p) // (p // group)) * (channels // group)  # of output o's group in the table
    out = table.new_zeros(n, p, oh, ow)
    for i in range(kh):
        for j in range(kw):
            rows = table.index_select(1, (first_row[:, None] + picks[:, i, j]).reshape(-1))
            window = rows[:, :, i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw]
            out += window.reshape(n, p, rho, oh, ow).sum(2)
    return out


def econv_int8(codebook: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor, depth: int, bias: torch.Tensor,
               x: torch.Tensor, *, strides, pads, dilations, group: int, peak: float = 0.0,
               use_native: bool = True) -> torch.Tensor:
    """E-Conv on the int8 table: ``x`` ``[N, group*depth, H, W]`` -> ``[N, p, OH, OW]``.

    Per image and group: one activation step, one table scale (largest float codeword norm x
    largest input segment norm, / 127); per segment: one codebook step (largest |entry| / 127).
    Ranges and norms cover the pixels some tap reads, as the runtime's stride phases do.
    """
    n, _, height, width = x.shape
    p, kh, kw, rho = codes.shape
    seg = _Segments(codebook, codes, offsets, depth)
    r = seg.words.shape[-1]
    xg = F.pad(x.reshape(n, group, depth, height, width), (0, 0, 0, 0, 0, rho * r - depth))
    with torch.no_grad():
        read = _read_pixels(height, width, (kh, kw), strides, pads, dilations)
        measured = xg * read  # zeros leave every range and norm below as it is
        flat = measured.reshape(n, group, -1)
        step, lowest, highest = activation_step(flat.amin(-1).clamp(max=0), flat.amax(-1).clamp(min=0), peak)
    at_image = (slice(None), slice(None), None, None, None)
    levels = _levels(xg, step[at_image], lowest[at_image], highest[at_image])  # [N, G, rho*r, H, W]
    cb_step = seg.steps(over_used_channels=True)
    words = _ste_round(seg.words / cb_step[:, None, None], -INT8_LIMIT, INT8_LIMIT) * seg.valid

    # The gradient's path: the dense convolution of the rounded input with the rounded codewords
    # (what the table's entries add up to before they are narrowed).
    weight = seg.decoded(words * cb_step[:, None, None]).permute(0, 3, 1, 2)
    top, left, bottom, right = pads
    rounded = (levels * step[at_image])[:, :, :depth].reshape(n, group * depth, height, width)
    dense = F.conv2d(F.pad(rounded, (left, right, top, bottom)), weight, bias, tuple(strides), 0, tuple(dilations),
                     group)
    kernels = _native_kernels() if use_native else None
    if kernels is not None:
        with torch.no_grad():
            cb, cd, off, b = _as_arrays(codebook, codes, offsets, bias)
            layer = kernels.EConv(cb, cd, off, depth, b, strides, pads, dilations, group, lut="int8",
                                  threads=torch.get_num_threads(), input_scale=peak / INT8_LIMIT, isa="avx512")
            exact = torch.from_numpy(layer(x.detach().float().numpy()))
        return _with_value(dense, exact)
    with torch.no_grad():
        codeword_norm = (seg.words * seg.valid).norm(dim=2).amax(1)  # [rho], float codewords
        segment_norm2 = measured.reshape(n, group, rho, r, -1).pow(2).sum(3).amax(-1)  # [N, G, rho]
        bound = (codeword_norm * segment_norm2.sqrt()).amax(-1)
        scale = _table_scale(bound)
        factor = (step[..., None] * cb_step) / scale[..., None]  # the runtime's requantisation multiplier
        sums = torch.einsum("ngvkhw,vck->ngvchw", levels.reshape(n, group, rho, r, height, width), words)
        entries = torch.clamp(torch.round(sums * factor[..., None, None, None]), -INT8_LIMIT, INT8_LIMIT)
        table = (entries * scale[..., None, None, None, None]).reshape(n, group * rho * seg.width, height, width)
        exact = _table_sum(F.pad(table, (left, right, top, bottom)), seg.picks, dense.shape[2:], strides, dilations,
                           group) + bias[:, None, None]
    return _with_value(dense, exact)


def elinear_int8(codebook: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor, depth: int, bias: torch.Tensor,
                 x: torch.Tensor, *, peak: float = 0.0, use_native: bool = True) -> torch.Tensor:
    """E-FC on the int8 table: ``x`` ``[N, depth]`` -> ``[N, n_out]``.

    Per row: one activation step and one table scale, bounded before the build by
    (|x_v| + half a step per channel) x largest int8 codeword norm; per segment one codebook step.
    """
    n = x.shape[0]
    rho = codes.shape[-1]
    seg = _Segments(codebook, codes, offsets, depth)
    r = seg.words.shape[-1]
    with torch.no_grad():
        step, lowest, highest = activation_step(x.amin(1), x.amax(1), peak)
    levels = _levels(x, step[:, None], lowest[:, None], highest[:, None])
    cb_step = seg.steps(over_used_channels=False)
    words = _ste_round(seg.words / cb_step[:, None, None]) * seg.valid

    dense = (levels * step[:, None]) @ seg.decoded(words * cb_step[:, None, None]).t() + bias
    kernels = _native_kernels() if use_native else None
    if kernels is not None:
        with torch.no_grad():
            cb, cd, off, b = _as_arrays(codebook, codes, offsets, bias)
            layer = kernels.EGemm(cb, cd, off, depth, b, lut="int8", threads=torch.get_num_threads(),
                                  input_scale=peak / INT8_LIMIT, isa="avx512")
            exact = torch.from_numpy(layer(x.detach().float().numpy()))
        return _with_value(dense, exact)
    with torch.no_grad():
        codeword_norm = cb_step * words.pow(2).sum(2).amax(1).sqrt()  # [rho], int8 codewords
        rows = F.pad(x, (0, rho * r - depth)).reshape(n, rho, r)
        used = seg.used.sum(1).float()
        x_norm = rows.pow(2).sum(2).sqrt() + 0.5 * step[:, None] * used.sqrt()
        bound = (x_norm * codeword_norm).amax(1)
        scale = _table_scale(bound)
        factor = (step[:, None] * cb_step) / scale[:, None]
        sums = torch.einsum("nvk,vck->nvc", F.pad(levels, (0, rho * r - depth)).reshape(n, rho, r), words)
        entries = torch.clamp(torch.round(sums * factor[..., None]), -INT8_LIMIT, INT8_LIMIT) * scale[:, None, None]
        # out[n, o] = sum over v of entries[n, picks[o, v]]: a bag sum per output.
        exact = F.embedding_bag(seg.picks, entries.reshape(n, -1).t().contiguous(), mode="sum").t() + bias
    return _with_value(dense, exact)
