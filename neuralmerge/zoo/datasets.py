"""Offline image-classification datasets: real 8×8 digits upsampled, synthetic sounds, drawn shapes.

Nothing here downloads anything. Every dataset is a :class:`Dataset` of float32 NCHW arrays
(1 channel, 32×32 by default) and int64 labels, standardised with the training split's mean and
standard deviation, and exactly reproducible for a given seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.signal
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from neuralmerge.errors import ConfigError


@dataclass(frozen=True, eq=False)  # eq would compare arrays elementwise
class Dataset:
    """A train/test split of single-channel images with integer labels."""

    x_train: np.ndarray  # float32 (N, 1, H, W)
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, (C, H, W)."""
        return tuple(self.x_train.shape[1:])


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")


def _standardised(name: str, classes: list[str], x_train: np.ndarray, y_train: np.ndarray,
                  x_test: np.ndarray, y_test: np.ndarray) -> Dataset:
    """Scale both splits with the training split's global mean/std (no test-set leakage)."""
    mean = float(x_train.mean())
    std = float(x_train.std()) or 1.0
    return Dataset(
        x_train=((x_train - mean) / std).astype(np.float32),
        y_train=y_train.astype(np.int64),
        x_test=((x_test - mean) / std).astype(np.float32),
        y_test=y_test.astype(np.int64),
        classes=classes,
        name=name,
    )


def _split(name: str, classes: list[str], x: np.ndarray, y: np.ndarray, test_fraction: float,
           seed: int) -> Dataset:
    _check_fraction(test_fraction)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return _standardised(name, classes, x_train, y_train, x_test, y_test)


# ---------------------------------------------------------------------------------------------
# digits32


def _random_affine(images: np.ndarray, rng: np.random.Generator, max_shift: float,
                   max_degrees: float) -> np.ndarray:
    """Shift and rotate every image by its own random amount (bilinear, zero fill)."""
    n, _, height, _ = images.shape
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees, n))
    # affine_grid works in normalised [-1, 1] coordinates, so a pixel shift is 2·px/size.
    shift = rng.uniform(-max_shift, max_shift, (n, 2)) * 2.0 / height
    theta = np.zeros((n, 2, 3), np.float32)
    theta[:, 0, 0] = np.cos(angle)
    theta[:, 0, 1] = -np.sin(angle)
    theta[:, 1, 0] = np.sin(angle)
    theta[:, 1, 1] = np.cos(angle)
    theta[:, :, 2] = shift
    source = torch.from_numpy(images)
    grid = F.affine_grid(torch.from_numpy(theta), list(source.shape), align_corners=False)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False).numpy()


def digits32(seed: int = 0, test_fraction: float = 0.25, augment: int = 3) -> Dataset:
    """scikit-learn's bundled 8×8 handwritten digits (1797 images), upsampled to 32×32.

    The split is stratified and depends on ``seed``. ``augment`` extra randomly shifted (±2 px)
    and rotated (±10°) copies of each training image are appended to the training split; the
    test split is never augmented.
    """
    if augment < 0:
        raise ConfigError(f"augment must be >= 0, got {augment}")
    bunch = load_digits()
    small = bunch.images.astype(np.float32)[:, None] / 16.0
    images = F.interpolate(torch.from_numpy(small), size=(32, 32), mode="bilinear",
                           align_corners=False).numpy()
    _check_fraction(test_fraction)
    x_train, x_test, y_train, y_test = train_test_split(
        images, bunch.target, test_size=test_fraction, random_state=seed, stratify=bunch.target)
    rng = np.random.default_rng(seed)
    copies = [_random_affine(x_train, rng, max_shift=2.0, max_degrees=10.0) for _ in range(augment)]
    x_train = np.concatenate([x_train, *copies])
    y_train = np.tile(y_train, augment + 1)
    classes = [str(digit) for digit in range(10)]
    return _standardised("digits32", classes, x_train, y_train, x_test, y_test)


# ---------------------------------------------------------------------------------------------
# sound20: log-magnitude spectrograms of synthetic signals

_RATE = 8000          # Hz
_NPERSEG = 256        # STFT window (32 ms)
_HOP = 128
_FRAMES = 32
_SAMPLES = _NPERSEG + (_FRAMES - 1) * _HOP   # exactly 32 frames without boundary padding
_BINS_PER_BAND = 4    # 128 FFT bins below Nyquist pooled into 32 bands of 125 Hz
_NOISE_LEVEL = (0.05, 0.8)  # standard deviation of the white background noise, per sample
_DISTRACTOR_LEVEL = (0.2, 0.6)  # amplitude of a stray tone, relative to a signal peak of 0.3–1


class _Signal:
    """Building blocks for ``n`` random waveforms of ``_SAMPLES`` samples each (one row per sample).

    Every random parameter is drawn per sample; ``sound20`` rescales the finished waveforms.
    """

    def __init__(self, rng: np.random.Generator, n: int):
        self.rng = rng
        self.n = n
        self.t = np.arange(_SAMPLES) / _RATE  # seconds
        self.duration = _SAMPLES / _RATE

    def uniform(self, low: float, high: float) -> np.ndarray:
        """One value per sample, as a column for broadcasting against time."""
        return self.rng.uniform(low, high, (self.n, 1))

    def jitter(self, value: float, spread: float = 0.08) -> np.ndarray:
        """``value`` times a random factor in [1 - spread, 1 + spread]."""
        return value * self.uniform(1 - spread, 1 + spread)

    def tone(self, freq: np.ndarray | float) -> np.ndarray:
        """Sine at ``freq`` Hz with a random phase."""
        phase = self.uniform(0, 2 * np.pi)
        return np.sin(2 * np.pi * freq * self.t + phase)

    def chord(self, root: np.ndarray, ratio: float) -> np.ndarray:
        """Two tones ``root`` and ``ratio·root`` Hz played together."""
        return self.tone(root) + self.tone(ratio * root)

    def sweep(self, start: np.ndarray, end: np.ndarray, exponential: bool = False) -> np.ndarray:
        """Sine whose frequency moves from ``start`` to ``end`` Hz over the clip."""
        if exponential:
            ratio = end / start
            phase = start * self.duration / np.log(ratio) * (ratio ** (self.t / self.duration) - 1)
        else:
            phase = start * self.t + (end - start) * self.t ** 2 / (2 * self.duration)
        return np.sin(2 * np.pi * phase + self.uniform(0, 2 * np.pi))

    def fm(self, carrier: np.ndarray, depth: np.ndarray, rate: np.ndarray) -> np.ndarray:
        """Sine with frequency ``carrier + depth·sin(2π·rate·t)``."""
        lfo_phase = self.uniform(0, 2 * np.pi)
        phase = carrier * self.t - depth / (2 * np.pi * rate) * np.cos(2 * np.pi * rate * self.t + lfo_phase)
        return np.sin(2 * np.pi * phase)

    def harmonics(self, fundamental: np.ndarray, count: int, rolloff: float) -> np.ndarray:
        """``count`` harmonics of ``fundamental``, the k-th at amplitude ``rolloff**(k-1)``.

        Harmonics at or above Nyquist are left out (they would alias to wrong pitches).
        """
        return sum(rolloff ** (k - 1) * (k * fundamental < _RATE / 2) * self.tone(k * fundamental)
                   for k in range(1, count + 1))

    def band_noise(self, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        """White noise filtered to [low, high] Hz per sample (FFT masking)."""
        spectrum = np.fft.rfft(self.rng.standard_normal((self.n, _SAMPLES)), axis=1)
        freqs = np.fft.rfftfreq(_SAMPLES, 1 / _RATE)
        spectrum *= (freqs >= low) & (freqs <= high)
        noise = np.fft.irfft(spectrum, n=_SAMPLES, axis=1)
        return noise / (noise.std(axis=1, keepdims=True) + 1e-9)

    def gate(self, min_length: float, max_length: float) -> np.ndarray:
        """A smooth on/off envelope of random length and onset (seconds)."""
        length = self.uniform(min_length, max_length)
        onset = self.rng.uniform(0, 1, (self.n, 1)) * (self.duration - length)
        ramp = 0.01
        rise = np.clip((self.t - onset) / ramp, 0, 1)
        fall = np.clip((onset + length - self.t) / ramp, 0, 1)
        return rise * fall

    def decay(self, rate: np.ndarray) -> np.ndarray:
        """Exponential decay starting at a random onset in the first half of the clip."""
        onset = self.uniform(0, self.duration / 2)
        after = np.clip(self.t - onset, 0, None)
        return (self.t >= onset) * np.exp(-rate * after)

    def pulse_train(self, rate: np.ndarray, pulse: np.ndarray) -> np.ndarray:
        """Short carrier bursts repeated ``rate`` times per second (``pulse`` = burst waveform)."""
        period = 1.0 / rate
        position = (self.t + self.uniform(0, 1) * period) % period
        return pulse * np.exp(-position / 0.004)

    def on_off(self, rate: np.ndarray, duty: float = 0.5) -> np.ndarray:
        """Square on/off gate at ``rate`` Hz (beeps)."""
        position = (self.t * rate + self.uniform(0, 1)) % 1.0
        return (position < duty).astype(float)


# Each class: (name, generator). Some classes are close on purpose (the two up-sweeps, the three
# FM tones, the two click trains, tones vs. chord), and sound20 adds per-sample background noise
# and stray tones, so the task is learnable but not trivially separable.
_SOUND_CLASSES: list[tuple[str, Callable[[_Signal], np.ndarray]]] = [
    ("tone_low", lambda s: s.tone(s.jitter(450)) * s.gate(0.25, 0.5)),
    ("tone_mid", lambda s: s.tone(s.jitter(1000)) * s.gate(0.25, 0.5)),
    ("tone_high", lambda s: s.tone(s.jitter(2200)) * s.gate(0.25, 0.5)),
    ("harmonic_low", lambda s: s.harmonics(s.jitter(220), 8, 0.7) * s.gate(0.25, 0.5)),
    ("harmonic_high", lambda s: s.harmonics(s.jitter(520), 6, 0.7) * s.gate(0.25, 0.5)),
    ("two_tone_chord", lambda s: s.chord(s.jitter(800), 1.5) * s.gate(0.25, 0.5)),
    ("chirp_up", lambda s: s.sweep(s.jitter(400), s.jitter(3000))),
    ("chirp_up_exponential", lambda s: s.sweep(s.jitter(400), s.jitter(3000), exponential=True)),
    ("chirp_down", lambda s: s.sweep(s.jitter(3000), s.jitter(400))),
    ("am_tone", lambda s: s.tone(s.jitter(1300)) * (1 + 0.9 * s.tone(s.jitter(10, 0.2))) / 2),
    ("vibrato", lambda s: s.fm(s.jitter(1500), s.jitter(150, 0.2), s.jitter(7, 0.2))),
    ("siren", lambda s: s.fm(s.jitter(1800), s.jitter(700, 0.2), s.jitter(2.5, 0.2))),
    ("trill", lambda s: s.fm(s.jitter(1600), s.jitter(250, 0.2), s.jitter(14, 0.2))),
    ("beeps", lambda s: s.tone(s.jitter(1800)) * s.on_off(s.jitter(6, 0.2))),
    ("noise_low", lambda s: s.band_noise(s.jitter(100), s.jitter(700)) * s.gate(0.3, 0.5)),
    ("noise_mid", lambda s: s.band_noise(s.jitter(1200), s.jitter(2000)) * s.gate(0.3, 0.5)),
    ("noise_high", lambda s: s.band_noise(s.jitter(2600), s.jitter(3800)) * s.gate(0.3, 0.5)),
    ("clicks_slow", lambda s: s.pulse_train(s.jitter(8, 0.2), s.band_noise(50, 3950))),
    ("clicks_fast", lambda s: s.pulse_train(s.jitter(22, 0.2), s.band_noise(50, 3950))),
    ("pluck", lambda s: s.harmonics(s.jitter(330), 8, 0.6) * s.decay(s.jitter(12, 0.3))),
]


def _log_spectrogram(waves: np.ndarray) -> np.ndarray:
    """(N, samples) waveforms → (N, 1, 32, 32) log band power, low frequencies in the bottom row."""
    _, _, stft = scipy.signal.stft(waves, fs=_RATE, nperseg=_NPERSEG, noverlap=_NPERSEG - _HOP,
                                   boundary=None, padded=False, axis=-1)
    power = np.abs(stft[:, :-1, :]) ** 2                      # drop the Nyquist bin: 128 bins
    bands = power.reshape(len(waves), -1, _BINS_PER_BAND, _FRAMES).mean(axis=2)
    return np.log(bands + 1e-6)[:, None, ::-1, :].astype(np.float32)


def sound20(n_per_class: int = 200, seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """A 20-class synthetic "sound" task like the NeuralMerger paper's Sound20.

    Each sample is the 32×32 log-power spectrogram (32 bands of 125 Hz × 32 frames of 16 ms) of a
    generated 0.53 s waveform: tones, harmonic stacks, chirps, AM/FM tones, band-limited noise,
    click trains, … with per-sample pitch jitter, timing, amplitude and background-noise level.
    """
    if n_per_class < 2:
        raise ConfigError(f"n_per_class must be >= 2, got {n_per_class}")
    rng = np.random.default_rng(seed)
    waves = []
    for _, make in _SOUND_CLASSES:
        signal = _Signal(rng, n_per_class)
        wave = make(signal)
        peak = np.abs(wave).max(axis=1, keepdims=True) + 1e-9
        waves.append(wave / peak * signal.uniform(0.3, 1.0))
    clean = np.concatenate(waves)
    background = _Signal(rng, len(clean))
    # A short stray tone in half of the clips: it can make a tone look like a chord, etc.
    distractor = (background.tone(background.uniform(200, 3800)) * background.gate(0.05, 0.25)
                  * background.uniform(*_DISTRACTOR_LEVEL) * (background.uniform(0, 1) < 0.5))
    noise = background.uniform(*_NOISE_LEVEL) * rng.standard_normal(clean.shape)
    noisy = clean + distractor + noise
    labels = np.repeat(np.arange(len(_SOUND_CLASSES)), n_per_class)
    classes = [name for name, _ in _SOUND_CLASSES]
    return _split("sound20", classes, _log_spectrogram(noisy), labels, test_fraction, seed)


# ---------------------------------------------------------------------------------------------
# shapes: procedurally drawn geometric figures


def _regular_polygon(u: np.ndarray, v: np.ndarray, sides: int) -> np.ndarray:
    """Inside of the regular polygon with circumradius 1 and a vertex pointing up."""
    apothem = np.cos(np.pi / sides)
    inside = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        normal = 2 * np.pi * (k + 0.5) / sides + np.pi / 2
        inside &= u * np.cos(normal) + v * np.sin(normal) <= apothem
    return inside


# Each shape is a membership test in its own frame, where the figure fits the unit disc.
_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u**2 + v**2 <= 0.85,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.72,
    "triangle": lambda u, v: _regular_polygon(u, v, 3),
    "cross": lambda u, v: (np.minimum(np.abs(u), np.abs(v)) <= 0.28) & (np.maximum(np.abs(u), np.abs(v)) <= 0.95),
    "ring": lambda u, v: (u**2 + v**2 <= 0.95) & (u**2 + v**2 >= 0.35),
    "hexagon": lambda u, v: _regular_polygon(u, v, 6),
    "star": lambda u, v: np.hypot(u, v) <= 0.62 + 0.35 * np.cos(5 * np.arctan2(v, u)),
    "crescent": lambda u, v: (u**2 + v**2 <= 0.9) & ((u - 0.45) ** 2 + v**2 >= 0.55),
    "bar": lambda u, v: (np.abs(u) <= 0.95) & (np.abs(v) <= 0.25),
    "corner": lambda u, v: (np.maximum(np.abs(u), np.abs(v)) <= 0.8) & ((u <= -0.25) | (v <= -0.25)),
    "semicircle": lambda u, v: (u**2 + (v + 0.35) ** 2 <= 0.95) & (v >= -0.35),
}


def _draw(shape: Callable[[np.ndarray, np.ndarray], np.ndarray], n: int, size: int,
          rng: np.random.Generator) -> np.ndarray:
    """``n`` images (n, 1, size, size) of one shape at random position/scale/rotation, with noise."""
    supersample = 2  # anti-aliased edges: draw at twice the resolution, then average 2×2 blocks
    fine = size * supersample
    axis = (np.arange(fine) + 0.5) / fine * 2 - 1          # pixel centres in [-1, 1]
    y, x = np.meshgrid(-axis, axis, indexing="ij")          # y grows upwards
    column = lambda values: values[:, None, None]  # noqa: E731
    scale = column(rng.uniform(0.35, 0.6, n))
    centre_x = column(rng.uniform(-1, 1, n)) * (0.9 - scale)
    centre_y = column(rng.uniform(-1, 1, n)) * (0.9 - scale)
    angle = column(rng.uniform(0, 2 * np.pi, n))
    stretch = column(rng.uniform(0.85, 1.15, n))
    dx, dy = (x - centre_x) / scale, (y - centre_y) / scale
    u = (np.cos(angle) * dx + np.sin(angle) * dy) * stretch
    v = (-np.sin(angle) * dx + np.cos(angle) * dy) / stretch
    coverage = shape(u, v).astype(np.float32)
    coverage = coverage.reshape(n, size, supersample, size, supersample).mean(axis=(2, 4))
    background = column(rng.uniform(0.0, 0.3, n))
    foreground = column(rng.uniform(0.6, 1.0, n))
    noise = column(rng.uniform(0.03, 0.15, n)) * rng.standard_normal((n, size, size))
    return (background + (foreground - background) * coverage + noise)[:, None].astype(np.float32)


def shapes(n_per_class: int = 300, seed: int = 0, num_classes: int = 10, size: int = 32,
           test_fraction: float = 0.25) -> Dataset:
    """Filled geometric shapes (circle, square, triangle, cross, ring, …), one class per shape.

    Each image has a random position, scale, rotation, slight stretch, contrast and pixel noise.
    ``num_classes`` takes the first shapes of the list (at most 11).
    """
    if not 2 <= num_classes <= len(_SHAPES):
        raise ConfigError(f"shapes has 2 to {len(_SHAPES)} classes, got num_classes={num_classes}")
    if n_per_class < 2:
        raise ConfigError(f"n_per_class must be >= 2, got {n_per_class}")
    if size < 8:
        raise ConfigError(f"size must be >= 8 pixels, got {size}")
    rng = np.random.default_rng(seed)
    names = list(_SHAPES)[:num_classes]
    images = np.concatenate([_draw(_SHAPES[name], n_per_class, size, rng) for name in names])
    labels = np.repeat(np.arange(num_classes), n_per_class)
    return _split("shapes", names, images, labels, test_fraction, seed)


# ---------------------------------------------------------------------------------------------
# class subsets for composition experiments


def class_subset(ds: Dataset, classes: list[int], n: int | None = None, seed: int = 0) -> Dataset:
    """The samples of ``ds`` whose label is in ``classes``, relabelled 0..len(classes)-1.

    Label ``classes[i]`` becomes ``i`` (and ``classes`` of the result lists the matching names),
    so a model trained on the subset has exactly ``len(classes)`` outputs. With ``n``, at most
    ``n`` training samples per class are kept (a seeded random choice); the test split is kept
    whole.
    """
    if not classes:
        raise ConfigError("class_subset needs at least one class")
    if len(set(classes)) != len(classes):
        raise ConfigError(f"class_subset got repeated classes: {classes}")
    out_of_range = [c for c in classes if not 0 <= c < ds.num_classes]
    if out_of_range:
        raise ConfigError(f"{ds.name} has classes 0..{ds.num_classes - 1}, got {out_of_range}")
    if n is not None and n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    relabel = np.full(ds.num_classes, -1, dtype=np.int64)
    relabel[classes] = np.arange(len(classes))

    train_rows = []
    for c in classes:
        rows = np.flatnonzero(ds.y_train == c)
        if n is not None and n < len(rows):
            rows = np.sort(rng.choice(rows, size=n, replace=False))
        train_rows.append(rows)
    train_rows = np.sort(np.concatenate(train_rows))
    test_rows = np.flatnonzero(np.isin(ds.y_test, classes))
    return Dataset(
        x_train=ds.x_train[train_rows],
        y_train=relabel[ds.y_train[train_rows]],
        x_test=ds.x_test[test_rows],
        y_test=relabel[ds.y_test[test_rows]],
        classes=[ds.classes[c] for c in classes],
        name=f"{ds.name}[{','.join(map(str, classes))}]",
    )
