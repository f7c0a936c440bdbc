"""Per-group encoding settings: presets, command-line flags and the YAML config, validated up front.

Precedence for each group: ``layers.<group>`` in the config > ``--r`` / ``--codewords`` >
``defaults`` in the config > the preset's rule (``accu`` unless another is chosen).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError

MAX_CODEWORDS = 65536  # codes are stored as uint16 at most
CODEBOOK_DTYPES = ("float32", "float16")


def _accu(kind: str, depth: int) -> tuple[int, int]:
    if kind == "fc":
        return (8, 128) if depth <= 4096 else (4, 128)
    if depth <= 4:
        return 1, 64
    if depth <= 32:
        return 8, 128
    if depth <= 128:
        return 32, 256
    return (16, 256) if depth <= 256 else (8, 256)


def _light(kind: str, depth: int) -> tuple[int, int]:
    if kind == "fc":
        return (8, 64) if depth <= 4096 else (8, 128)
    if depth <= 4:
        return 1, 64
    return (32, 128) if depth <= 256 else (16, 128)


# Generic rules distilled from the paper's Table 1 (LeNet pair) and §4.2 (VGG-avg + ZF-Net):
# (kind, smallest kernel depth in the group) -> (r, C). See README "Presets".
PRESETS = {"accu": _accu, "light": _light}


@dataclass(frozen=True)
class GroupSetting:
    r: int
    codewords: int
    skip: bool = False


@dataclass
class MergeConfig:
    """Everything that decides how groups are encoded."""
    preset: str = "accu"
    r: int | None = None
    codewords: int | None = None
    defaults: dict = field(default_factory=dict)
    layers: dict = field(default_factory=dict)
    compress_heads: bool = False
    codebook_dtype: str = "float32"
    models: list = field(default_factory=list)
    calibration: "CalibrationSettings" = field(default_factory=lambda: CalibrationSettings())
    preprocess: list = field(default_factory=list)  # per model: a preprocessing dict or None
    source: str = "flags"

    def setting_for(self, name: str, kind: str, depth: int) -> GroupSetting:
        rule_r, rule_c = PRESETS[self.preset](kind, depth)
        r = self.defaults.get("r", rule_r)
        c = self.defaults.get("codewords", rule_c)
        r = self.r if self.r is not None else r
        c = self.codewords if self.codewords is not None else c
        layer = self.layers.get(name, {})
        if layer.get("skip", False):
            return GroupSetting(0, 0, skip=True)
        return GroupSetting(int(layer.get("r", r)), int(layer.get("codewords", c)))

    def check_groups(self, names: list[str]) -> None:
        unknown = sorted(set(self.layers) - set(names))
        if unknown:
            raise ConfigError(f"{self.source}: unknown group {unknown[0]!r} under 'layers' "
                              f"(groups are: {', '.join(names) or 'none'})")


@dataclass
class CalibrationSettings:
    """How calibration trains (docs/calibration.md); every field can come from the YAML ``calibration:`` section or a flag."""
    data: list = field(default_factory=list)   # one --calib path per model, in model order
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-2             # Adam step relative to each tensor's RMS (trainer.py)
    gamma: float = 10.0          # weight of the task loss (the original code's value)
    temperature: float = 2.0     # distillation temperature when there are no labels
    holdout: float = 0.1         # fraction of each model's calibration data kept aside to measure fidelity
    patience: int = 2            # epochs without a better held-out fidelity before stopping early
    int8_aware: bool = False     # train and measure on the int8 runtime's table arithmetic (encode/int8_table.py)

    def with_overrides(self, **flags) -> "CalibrationSettings":
        """A copy with every non-None flag applied and checked."""
        merged = CalibrationSettings(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        unknown = sorted(set(flags) - set(self.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown calibration setting(s) {', '.join(map(repr, unknown))}; "
                              f"known: {', '.join(k for k in self.__dataclass_fields__ if k != 'data')}")
        for key, value in flags.items():
            if value is not None:
                setattr(merged, key, _check_calibration_value(key, value, f"--{key.replace('_', '-')}"))
        return merged


_CALIBRATION_RULES = {  # key -> (type, lower bound, lower bound inclusive, upper bound inclusive or None)
    "epochs": (int, 1, True, None),
    "batch_size": (int, 1, True, None),
    "lr": (float, 0.0, False, None),
    "gamma": (float, 0.0, True, None),
    "temperature": (float, 0.0, False, None),
    "holdout": (float, 0.0, False, 0.5),
    "patience": (int, 1, True, None),
}


def _check_calibration_value(key: str, value, where: str):
    if key == "data":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: must be a list of paths, one per model")
        return list(value)
    if key == "int8_aware":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    kind, low, inclusive, high = _CALIBRATION_RULES[key]
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value):  # NaN passes every comparison below
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    too_low = value < low if inclusive else value <= low
    if too_low or (high is not None and value > high):
        bound = f"in ({low}, {high}]" if high is not None else f"{'>=' if inclusive else '>'} {low}"
        raise ConfigError(f"{where} must be {bound}, got {value!r}")
    return kind(value)


_PREPROCESS_KEYS = {"resize", "mean", "std", "channels", "scale"}


def check_preprocess(spec, where: str) -> dict | None:
    """Validate one preprocessing mapping for image folders: resize [H, W], mean, std (a number or one per
    channel), channels (1 or 3), scale (pixel values are divided by it first; default 255)."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) - _PREPROCESS_KEYS:
        raise ConfigError(f"{where} takes only {', '.join(sorted(_PREPROCESS_KEYS))}")
    out = dict(spec)
    if "resize" in out:
        size = out["resize"]
        if (not isinstance(size, list) or len(size) != 2
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size)):
            raise ConfigError(f"{where}.resize must be [height, width] in pixels, got {size!r}")
    if "channels" in out and out["channels"] not in (1, 3):
        raise ConfigError(f"{where}.channels must be 1 or 3, got {out['channels']!r}")
    for key in ("mean", "std"):
        if key in out:
            values = out[key] if isinstance(out[key], list) else [out[key]]
            if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ConfigError(f"{where}.{key} must be a number or a list of numbers, got {out[key]!r}")
            if key == "std" and min(values) <= 0:
                raise ConfigError(f"{where}.std must be positive, got {out[key]!r}")
    if "scale" in out and (isinstance(out["scale"], bool) or not isinstance(out["scale"], (int, float))
                           or out["scale"] <= 0):
        raise ConfigError(f"{where}.scale must be a positive number, got {out['scale']!r}")
    return out


def check_r(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: r must be a positive integer, got {value!r}")
    return value


def check_codewords(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CODEWORDS:
        raise ConfigError(f"{where}: codewords must be an integer in [1, {MAX_CODEWORDS}], got {value!r}")
    return value


def make_config(*, config: str | Path | dict | None = None, preset: str | None = None, r: int | None = None,
                codewords: int | None = None, codebook_dtype: str | None = None,
                compress_heads: bool | None = None) -> MergeConfig:
    """Combine a YAML config (path or dict) with flags; every value is checked here, before any work."""
    cfg = MergeConfig()
    if config is not None:
        cfg = _parse_config(config)
    if preset is not None:
        cfg.preset = preset
    if cfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r} (choose from {', '.join(PRESETS)})")
    if r is not None:
        cfg.r = check_r(r, "--r")
    if codewords is not None:
        cfg.codewords = check_codewords(codewords, "--codewords")
    if codebook_dtype is not None:
        cfg.codebook_dtype = codebook_dtype
    if cfg.codebook_dtype not in CODEBOOK_DTYPES:
        raise ConfigError(f"codebook dtype must be one of {', '.join(CODEBOOK_DTYPES)}, got {cfg.codebook_dtype!r}")
    if compress_heads is not None:
        cfg.compress_heads = compress_heads
    return cfg


_TOP_KEYS = {"preset", "defaults", "layers", "compress_heads", "codebook_dtype", "models", "calibration", "preprocess"}
_LAYER_KEYS = {"r", "codewords", "skip"}


def load_config_mapping(config: str | Path | dict, allowed: set[str] | tuple[str, ...]) -> tuple[dict, str]:
    """(the mapping, its name for messages) of a YAML config path or a dict, with only ``allowed`` keys."""
    if isinstance(config, dict):
        data, source = config, "config"
    else:
        source = str(config)
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from exc
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a UTF-8 text file") from None
        data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        listed = allowed if isinstance(allowed, tuple) else sorted(allowed)
        raise ConfigError(f"{source}: unknown key {unknown[0]!r} (allowed: {', '.join(listed)})")
    return data, source


def _parse_config(config: str | Path | dict) -> MergeConfig:
    data, source = load_config_mapping(config, _TOP_KEYS)
    cfg = MergeConfig(source=source)
    if "preset" in data:
        cfg.preset = str(data["preset"])
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) - {"r", "codewords"}:
        raise ConfigError(f"{source}: 'defaults' takes only r and codewords")
    if "r" in defaults:
        check_r(defaults["r"], f"{source}: defaults.r")
    if "codewords" in defaults:
        check_codewords(defaults["codewords"], f"{source}: defaults.codewords")
    cfg.defaults = dict(defaults)
    layers = data.get("layers") or {}
    if not isinstance(layers, dict):
        raise ConfigError(f"{source}: 'layers' must map group names to settings")
    for name, spec in layers.items():
        if not isinstance(spec, dict) or set(spec) - _LAYER_KEYS:
            raise ConfigError(f"{source}: layers.{name} takes only {', '.join(sorted(_LAYER_KEYS))}")
        if "r" in spec:
            check_r(spec["r"], f"{source}: layers.{name}.r")
        if "codewords" in spec:
            check_codewords(spec["codewords"], f"{source}: layers.{name}.codewords")
        if "skip" in spec and not isinstance(spec["skip"], bool):
            raise ConfigError(f"{source}: layers.{name}.skip must be true or false")
    cfg.layers = {str(k): dict(v) for k, v in layers.items()}
    if "compress_heads" in data:
        if not isinstance(data["compress_heads"], bool):
            raise ConfigError(f"{source}: compress_heads must be true or false")
        cfg.compress_heads = data["compress_heads"]
    if "codebook_dtype" in data:
        cfg.codebook_dtype = str(data["codebook_dtype"])
    models = data.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ConfigError(f"{source}: 'models' must be a list of ONNX paths")
    base = Path(source).parent if not isinstance(config, dict) else Path(".")
    cfg.models = [str(base / m) for m in models]
    cfg.calibration = _parse_calibration(data.get("calibration"), source, base)
    cfg.preprocess = parse_preprocess(data.get("preprocess"), source)
    return cfg


def _parse_calibration(section, source: str, base: Path) -> CalibrationSettings:
    settings = CalibrationSettings()
    if section is None:
        return settings
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: 'calibration' must be a mapping")
    allowed = set(CalibrationSettings.__dataclass_fields__)
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(f"{source}: unknown key calibration.{unknown[0]} (allowed: {', '.join(sorted(allowed))})")
    for key, value in section.items():
        setattr(settings, key, _check_calibration_value(key, value, f"{source}: calibration.{key}"))
    settings.data = [str(base / d) for d in settings.data]
    return settings


def parse_preprocess(section, source: str, per: str = "model") -> list:
    """``preprocess:`` is one mapping for every model (or teacher: ``per``) or a list with one mapping (or
    null) per model."""
    if section is None:
        return []
    if isinstance(section, dict):
        return [check_preprocess(section, f"{source}: preprocess")]
    if not isinstance(section, list):
        raise ConfigError(f"{source}: 'preprocess' must be a mapping or a list of mappings (one per {per})")
    return [check_preprocess(spec, f"{source}: preprocess[{i}]") for i, spec in enumerate(section)]
