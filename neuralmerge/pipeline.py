"""The merge pipeline: load → normalise → find layers → align → encode → export → measure.

``plan`` stops after alignment (what ``neuralmerge inspect`` prints); ``merge`` runs it all.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from tqdm.auto import tqdm

from . import __version__
from .align import Group, align
from .encode.kmeans import encode_group
from .errors import ConfigError, NeuralMergeError
from .export.merged_onnx import EncodedMember, GroupArtifact, build_merged_model, io_names
from .fidelity import measure_fidelity
from .graph.importer import check_supported
from .graph.layers import Layer, find_layers
from .graph.normalize import default_opset, graph_inputs, input_specs, normalize, output_specs
from .io.onnx_files import check_output_path, load_model, save_model_atomic, write_bytes_atomic
from .settings import GroupSetting, MergeConfig, make_config

ModelLike = "str | os.PathLike | onnx.ModelProto"


@dataclass
class Plan:
    """What a merge will do, before any encoding."""
    sources: list[str]
    source_bytes: list[int]
    originals: list[onnx.ModelProto]
    models: list[onnx.ModelProto]           # normalised
    names: list[dict[str, str]]             # per model: original I/O name -> merged name
    layers: list[list[Layer]]               # every mergeable layer per model
    groups: list[Group]                     # groups to encode
    settings: dict[str, GroupSetting]       # per group, r already clipped to the group's depth
    dense: list[Layer] = field(default_factory=list)  # heads and skipped groups: left dense
    config: MergeConfig = field(default_factory=MergeConfig)
    opset: int = 17

    def group_segments(self, group: Group) -> int:
        return math.ceil(max(m.depth for m in group.members) / self.settings[group.name].r)


@dataclass
class MergeResult:
    model: onnx.ModelProto
    report: dict
    output: str | None


def plan(models: list, *, config=None, preset: str | None = None, r: int | None = None,
         codewords: int | None = None, codebook_dtype: str | None = None, compress_heads: bool | None = None,
         input_shapes: dict[str, tuple[int, ...]] | None = None) -> Plan:
    """Load, normalise, discover and align ``models`` (paths or ``onnx.ModelProto``)."""
    cfg = make_config(config=config, preset=preset, r=r, codewords=codewords,
                      codebook_dtype=codebook_dtype, compress_heads=compress_heads)
    models = list(models)
    if cfg.models:
        if models and len(models) != len(cfg.models):
            raise ConfigError(f"{cfg.source} lists {len(cfg.models)} models but {len(models)} "
                              f"{'was' if len(models) == 1 else 'were'} given")
        models = models or cfg.models
    if not models:
        raise ConfigError("no models given")
    sources, originals, sizes = [], [], []
    for m in models:
        if isinstance(m, onnx.ModelProto):
            sources.append(m.graph.name or "<in-memory model>")
            originals.append(m)
            sizes.append(m.ByteSize())
        else:
            sources.append(str(m))
            originals.append(load_model(m))
            sizes.append(Path(m).stat().st_size)
    names = io_names(originals)
    shapes = _shapes_per_model(input_shapes or {}, originals, names)
    opset = max(default_opset(m) for m in originals)
    normalised = [normalize(m, opset=opset, input_shapes=shapes[i], label=sources[i]) for i, m in enumerate(originals)]
    for m in normalised:
        check_supported(m)  # calibration imports every model into torch: refuse what it cannot run, now
    layers = [find_layers(m, i) for i, m in enumerate(normalised)]
    to_encode, dense = [], []
    for i, model_layers in enumerate(layers):
        if not model_layers:
            raise NeuralMergeError(f"{sources[i]} has no mergeable layers (Conv, or Gemm/MatMul with a constant weight)")
        keep = [l for l in model_layers if cfg.compress_heads or not l.is_head]
        if not keep:
            raise NeuralMergeError(f"{sources[i]} has no mergeable layers besides its classification head "
                                   "(set compress_heads: true in the config to encode it)")
        to_encode.append(keep)
        dense += [l for l in model_layers if l not in keep]
    groups = align(to_encode)
    cfg.check_groups([g.name for g in groups])
    settings, encoded_groups = {}, []
    for g in groups:
        s = cfg.setting_for(g.name, g.kind, min(m.depth for m in g.members))
        if s.skip:
            dense += g.members
            continue
        settings[g.name] = GroupSetting(min(s.r, min(m.depth for m in g.members)), s.codewords)
        encoded_groups.append(g)
    return Plan(sources, sizes, originals, normalised, names, layers, encoded_groups, settings, dense, cfg, opset)


def merge(models: list, output: str | os.PathLike | None = None, *, config=None, preset: str | None = None,
          r: int | None = None, codewords: int | None = None, codebook_dtype: str | None = None,
          compress_heads: bool | None = None, input_shapes: dict | None = None, seed: int = 0,
          report: str | os.PathLike | None = None, force: bool = False, quiet: bool = False,
          fidelity_samples: int = 16, fidelity_inputs: list[dict[str, np.ndarray]] | None = None) -> MergeResult:
    """Merge (or, for one model, compress) ONNX models into one ONNX file.

    Returns the merged ``onnx.ModelProto`` and the report dict; writes ``output`` and ``report``
    (JSON) when given, each atomically. Nothing is written if any step fails.
    """
    for path in (output, report):
        if path is not None:
            check_output_path(path, force=force)
    start = time.perf_counter()
    p = plan(models, config=config, preset=preset, r=r, codewords=codewords, codebook_dtype=codebook_dtype,
             compress_heads=compress_heads, input_shapes=input_shapes)
    artifacts = []
    t_encode = time.perf_counter()
    for g in tqdm(p.groups, desc="encoding", unit="group", disable=quiet):
        s = p.settings[g.name]
        enc = encode_group(g.members, s.r, s.codewords, seed=seed, name=g.name)
        members = [EncodedMember(layer, codes, enc.offsets[:codes.shape[-1]].astype(np.int64))
                   for layer, codes in zip(g.members, enc.codes)]
        artifacts.append(GroupArtifact(
            name=g.name, kind=g.kind, r=enc.r, codebook=enc.codebook, segment_codewords=list(enc.segment_codewords),
            members=members, info={"codewords": s.codewords, "quantization_mse": float(enc.mse),
                                   "relative_error": float(enc.relative_error)}))
    encode_seconds = time.perf_counter() - t_encode
    merged = build_merged_model(p.models, p.sources, artifacts, opset=p.opset,
                                codebook_dtype=p.config.codebook_dtype)
    try:
        onnx.checker.check_model(merged, full_check=True)
    except Exception as exc:  # a bug of ours, not the user's: say so plainly
        raise NeuralMergeError(f"internal error: the merged model fails the ONNX checker: "
                               f"{str(exc).strip().splitlines()[0]}") from exc
    fidelity = measure_fidelity(p.originals, merged, p.names, samples=fidelity_samples, seed=seed,
                                inputs=fidelity_inputs)
    out_bytes = merged.ByteSize()
    if output is not None:
        out_bytes = save_model_atomic(merged, output, force=force)
    rep = build_report(p, artifacts, merged, out_bytes, fidelity, output=output, seed=seed,
                       encode_seconds=encode_seconds, total_seconds=time.perf_counter() - start)
    if report is not None:
        write_bytes_atomic(json.dumps(rep, indent=2).encode(), report, force=force)
    return MergeResult(merged, rep, None if output is None else str(output))


def build_report(p: Plan, artifacts: list[GroupArtifact], merged: onnx.ModelProto, out_bytes: int,
                 fidelity: list[dict], *, output, seed: int, encode_seconds: float, total_seconds: float) -> dict:
    models = []
    for i, m in enumerate(p.models):
        params = sum(int(np.prod(t.dims)) for t in p.originals[i].graph.initializer)
        models.append({
            "index": i, "path": p.sources[i], "bytes": p.source_bytes[i], "params": params,
            "inputs": [{"name": s.name, "merged_name": p.names[i][s.name], "shape": list(s.shape),
                        "dtype": str(s.dtype)} for s in input_specs(m)],
            "outputs": [{"name": s.name, "merged_name": p.names[i][s.name], "shape": list(s.shape),
                         "dtype": str(s.dtype)} for s in output_specs(m)],
            "layers": len(p.layers[i]),
        })
    groups = []
    for a in artifacts:
        groups.append({
            "name": a.name, "kind": a.kind, "layers": [f"m{m.layer.model}.{m.layer.node}" for m in a.members],
            "r": a.r, "codewords": a.info["codewords"], "segment_codewords": a.segment_codewords,
            "segments": len(a.segment_codewords), "quantization_mse": a.info["quantization_mse"],
            "relative_error": a.info["relative_error"],
            "params": sum(m.layer.weight.size for m in a.members),
            "codebook_bytes": int(a.codebook.size * (2 if p.config.codebook_dtype == "float16" else 4)),
            "code_bytes": int(sum(m.codes.nbytes for m in a.members)),
        })
    total_in = sum(p.source_bytes)
    return {
        "neuralmerge_version": __version__,
        "output": None if output is None else str(output),
        "input_bytes": total_in,
        "output_bytes": out_bytes,
        "compression_ratio": total_in / out_bytes,
        "codebook_dtype": p.config.codebook_dtype,
        "preset": p.config.preset,
        "seed": seed,
        "opset": p.opset,
        "encode_seconds": round(encode_seconds, 3),
        "total_seconds": round(total_seconds, 3),
        "models": models,
        "groups": groups,
        "dense_layers": [f"m{l.model}.{l.node}" for l in p.dense],
        "fidelity": fidelity,
    }


def _shapes_per_model(shapes: dict[str, tuple[int, ...]], originals: list[onnx.ModelProto],
                      names: list[dict[str, str]]) -> list[dict]:
    """Route ``--input-shape`` entries to models: by merged name, or by original name (all models that have it)."""
    per_model: list[dict] = [{} for _ in names]
    inputs = [[vi.name for vi in graph_inputs(m)] for m in originals]
    for key, shape in shapes.items():
        hit = False
        for i, mapping in enumerate(names):
            for original in inputs[i]:
                if key in (original, mapping[original]):
                    per_model[i][original] = tuple(int(d) for d in shape)
                    hit = True
        if not hit:
            known = sorted({names[i][n] for i, model_inputs in enumerate(inputs) for n in model_inputs})
            raise ConfigError(f"--input-shape: no model input is named {key!r} (inputs: {', '.join(known)})")
    return per_model
