"""Per-group encoding settings: presets, command-line flags and the YAML config, validated up front.

Precedence for each group: ``layers.<group>`` in the config > ``--r`` / ``--codewords`` >
``defaults`` in the config > the preset's rule (``accu`` unless another is chosen).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError

MAX_CODEWORDS = 65536
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


_TOP_KEYS = {"preset", "defaults", "layers", "compress_heads", "codebook_dtype", "models"}
_LAYER_KEYS = {"r", "codewords", "skip"}


def _parse_config(config: str | Path | dict) -> MergeConfig:
    if isinstance(config, dict):
        data, source = config, "config"
    else:
        source = str(config)
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from exc
        data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_TOP_KEYS))})")
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
    return cfg
