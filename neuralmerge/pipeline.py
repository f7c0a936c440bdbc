"""The merge pipeline: load → normalise → find layers → align → encode → export → calibrate → measure.

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
from onnx import helper
from tqdm.auto import tqdm

from . import __version__
from .align import Group, align
from .calibrate import distributed
from .calibrate.checkpoint import Checkpoint, fingerprint
from .calibrate.data import CalibrationSet, load_calibration
from .calibrate.search import search
from .calibrate.trainer import CalibrationInterrupted, CalibrationOutcome, Calibrator
from .encode.kmeans import encode_group
from .errors import ConfigError, ModelLoadError, NeuralMergeError
from .export.merged_onnx import EncodedMember, GroupArtifact, build_merged_model, io_names
from .fidelity import measure_fidelity
from .graph.importer import check_supported
from .graph.layers import Layer, find_layers
from .graph.normalize import default_opset, graph_inputs, input_specs, normalize, output_specs
from .io.onnx_files import check_output_paths, load_model, save_model_atomic, write_bytes_atomic
from .report_files import companion_paths, write_report_files
from .settings import CalibrationSettings, GroupSetting, MergeConfig, make_config

MIN_OPSET = 10  # the E-layers' function bodies use Slice-10


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
    for source, m in zip(sources, originals):
        _require_float32(m, source)
    names = io_names(originals)
    shapes = _shapes_per_model(input_shapes or {}, originals, names)
    opset = max(MIN_OPSET, *(default_opset(m) for m in originals))
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
    if not encoded_groups:  # the output would be the sources side by side, no smaller
        raise ConfigError(f"{cfg.source}: every layer group is set to skip ({', '.join(g.name for g in groups)}), "
                          "so nothing would be merged")
    return Plan(sources, sizes, originals, normalised, names, layers, encoded_groups, settings, dense, cfg, opset)


def _require_float32(model: onnx.ModelProto, source: str) -> None:
    """Merged models compute in float32 (their codebooks and E-layer bodies are float32)."""
    floats = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
              onnx.TensorProto.DOUBLE: "float64"}
    for vi in [*graph_inputs(model), *model.graph.output]:
        kind = floats.get(vi.type.tensor_type.elem_type)
        if kind:
            raise ModelLoadError(f"{source}: '{vi.name}' is {kind}; neuralmerge merges float32 models "
                                 "(export the model in float32)")


def merge(models: list, output: str | os.PathLike | None = None, *, config=None, preset: str | None = None,
          r: int | None = None, codewords: int | None = None, codebook_dtype: str | None = None,
          compress_heads: bool | None = None, input_shapes: dict | None = None, seed: int = 0,
          report: str | os.PathLike | None = None, force: bool = False, quiet: bool = False,
          fidelity_samples: int = 16, fidelity_inputs: list[dict[str, np.ndarray]] | None = None,
          calib: list | None = None, calibration: dict | None = None, budget: float | None = None,
          resume: bool = False, checkpoint_dir: str | os.PathLike | None = None) -> MergeResult:
    """Merge (or, for one model, compress) ONNX models into one ONNX file.

    With calibration data (``calib``: one ``.npy``/``.npz``/image folder per model, or the config's
    ``calibration.data``) the merged model is calibrated against the originals (docs/calibration.md);
    ``calibration`` overrides its settings (epochs, batch_size, lr, gamma, temperature, holdout,
    patience, int8_aware); ``budget`` (percentage points of fidelity drop) searches r/C per group first.
    Returns the merged ``onnx.ModelProto`` and the report dict; writes ``output`` and ``report``
    (JSON, plus ``.md`` and plots when calibrated) when given, each atomically. Nothing is written
    if any step fails; an interrupted calibration leaves only its checkpoint. Under ``torchrun``
    every process trains its share and only rank 0 writes (other ranks get ``report = None``).
    """
    group = distributed.current()
    # The API's arguments are checked as the command line's are, before any work.
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not 0 < budget <= 100):  # NaN fails the comparison too
        raise ConfigError(f"--budget must be a percentage in (0, 100], got {budget!r}")
    if calibration is not None and not isinstance(calibration, dict):
        raise ConfigError(f"calibration must be a dict of settings, got {type(calibration).__name__}")
    sources = [path for path in [*models, *(calib or [])] if isinstance(path, (str, os.PathLike))]
    check_output_paths([output, report], sources, force=force)
    start = time.perf_counter()
    p = plan(models, config=config, preset=preset, r=r, codewords=codewords, codebook_dtype=codebook_dtype,
             compress_heads=compress_heads, input_shapes=input_shapes)
    cal = p.config.calibration.with_overrides(**(calibration or {}), data=list(map(str, calib)) if calib else None)
    data = load_calibration(cal.data, p.models, p.config.preprocess) if cal.data else None
    if data is None and (budget is not None or resume):
        raise ConfigError(f"{'--budget' if budget is not None else '--resume'} needs calibration data "
                          "(--calib, once per model)")
    if data is not None and report is not None:  # a calibrated merge also writes the report's .md and plots
        check_output_paths([output, report, *companion_paths(report).values()], sources, force=force)
    checkpoint = None
    if data is not None:
        checkpoint = _checkpoint(p, data, cal, budget, seed, input_shapes, output, checkpoint_dir, group)
        if resume:
            checkpoint.load()
    heads = [layer for layer in p.dense if layer.is_head]
    try:
        merged, encoded, search_report, outcome, calibrator = _search_encode_calibrate(
            p, data, cal, heads, budget, checkpoint, seed, quiet, group)
    except KeyboardInterrupt:  # outside the epoch loop (the trainer reports interruptions within it)
        where = (f"; resume with --resume (checkpoint: {checkpoint.path})"
                 if checkpoint is not None and checkpoint.path.is_file() else "")
        raise CalibrationInterrupted(f"interrupted{where}") from None
    if not group.is_main:
        group.barrier()
        return MergeResult(merged, None, None if output is None else str(output))
    try:
        try:
            onnx.checker.check_model(merged, full_check=True)
        except Exception as exc:  # a bug of ours, not the user's: the CLI reports it as an internal error
            raise RuntimeError(f"the merged model fails the ONNX checker: "
                               f"{str(exc).strip().splitlines()[0]}") from exc
        if fidelity_inputs is None and data is not None:
            fidelity_inputs = [{d.input_name: d.x[m.holdout[:FIDELITY_MAX]]} for d, m in zip(data, calibrator.models)]
        fidelity = measure_fidelity(p.originals, merged, p.names, samples=fidelity_samples, seed=seed,
                                    inputs=fidelity_inputs, pinned=[input_specs(m) for m in p.models], labels=p.sources)
        out_bytes = merged.ByteSize()
        if output is not None:
            out_bytes = save_model_atomic(merged, output, force=force)
        rep = build_report(p, json.loads(encoded["groups"]), out_bytes, fidelity, output=output, seed=seed,
                           encode_seconds=encoded["seconds"], total_seconds=time.perf_counter() - start)
        if outcome is not None:
            rep["calibration"] = calibration_report(p, data, cal, outcome, calibrator)
        if search_report is not None:
            rep["search"] = search_report
        if report is not None:
            write_bytes_atomic(json.dumps(rep, indent=2).encode(), report, force=force)
            if outcome is not None:
                write_report_files(rep, report, force=force)
        if checkpoint is not None:
            checkpoint.remove()
    finally:
        group.barrier()
    return MergeResult(merged, rep, None if output is None else str(output))


def _search_encode_calibrate(p: Plan, data, cal: CalibrationSettings, heads: list[Layer], budget, checkpoint,
                             seed: int, quiet: bool, group: distributed.Group):
    """The budget search, the encoding and the calibration, each taken from the checkpoint when it has it."""
    outcome = calibrator = search_report = None
    if budget is not None:
        search_report = checkpoint.get("search")
        if search_report is None:
            search_report = search(
                p.groups, p.models, data, heads, cal, budget, lambda g, s: _build_one_group(p, g, s, seed, group),
                seed=seed, quiet=quiet, codebook_itemsize=2 if p.config.codebook_dtype == "float16" else 4,
                done=checkpoint.get("search_progress"), on_group=lambda done: checkpoint.save("search_progress", done),
                group=group)
            checkpoint.save("search", search_report)
        for chosen in search_report["groups"]:
            p.settings[chosen["name"]] = GroupSetting(chosen["r"], chosen["codewords"])

    encoded = checkpoint.get("encoded") if checkpoint is not None else None
    if encoded is None:
        encoded = group.from_main(_encode(p, seed, quiet) if group.is_main else None)
        if checkpoint is not None:
            checkpoint.save("encoded", encoded)
    merged = onnx.load_from_string(encoded["model"])
    if data is not None:
        calibrator = Calibrator(p.models, merged, data, heads, cal, seed=seed, quiet=quiet, group=group)
        outcome = calibrator.fit(checkpoint)
        outcome.int8_scales = calibrator.recorded_int8_scales()
        merged = outcome.model
        helper.set_model_props(merged, {**{q.key: q.value for q in merged.metadata_props},
                                        "neuralmerge.int8_scales": json.dumps(outcome.int8_scales)})
    return merged, encoded, search_report, outcome, calibrator


FIDELITY_MAX = 1024   # held-out samples per model for the ONNX Runtime fidelity check


def _checkpoint(p: Plan, data: list[CalibrationSet], cal: CalibrationSettings, budget, seed: int, input_shapes,
                output, checkpoint_dir, group: distributed.Group) -> Checkpoint:
    """The job's checkpoint (default folder: ``<output>.ckpt``); its key covers everything but the epoch count."""
    if checkpoint_dir is None:
        checkpoint_dir = Path(f"{output}.ckpt") if output is not None else Path(".neuralmerge.ckpt")
    cfg = p.config
    key = fingerprint([m.SerializeToString(deterministic=True) for m in p.originals]
                      + [d.digest() for d in data]
                      + [{"preset": cfg.preset, "r": cfg.r, "codewords": cfg.codewords, "defaults": cfg.defaults,
                          "layers": cfg.layers, "compress_heads": cfg.compress_heads,
                          "codebook_dtype": cfg.codebook_dtype, "input_shapes": input_shapes or {},
                          "calibration": {k: v for k, v in vars(cal).items() if k not in ("epochs", "data")},
                          "budget": budget, "seed": seed, "world": group.world}])
    return Checkpoint(checkpoint_dir, key, enabled=group.is_main)


def _encode_artifacts(p: Plan, groups: list[Group], settings: dict[str, GroupSetting], seed: int,
                      quiet: bool = True) -> list[GroupArtifact]:
    artifacts = []
    for g in tqdm(groups, desc="encoding", unit="group", disable=quiet):
        s = settings[g.name]
        enc = encode_group(g.members, s.r, s.codewords, seed=seed, name=g.name, codebook_dtype=p.config.codebook_dtype)
        members = [EncodedMember(layer, codes, enc.offsets[:codes.shape[-1]].astype(np.int64))
                   for layer, codes in zip(g.members, enc.codes)]
        artifacts.append(GroupArtifact(
            name=g.name, kind=g.kind, r=enc.r, codebook=enc.codebook, segment_codewords=list(enc.segment_codewords),
            members=members, info={"codewords": s.codewords, "quantization_mse": float(enc.mse),
                                   "relative_error": float(enc.relative_error)}))
    return artifacts


def _encode(p: Plan, seed: int, quiet: bool) -> dict:
    """Encode every planned group and build the merged model: {model bytes, groups report (JSON), seconds}."""
    t_encode = time.perf_counter()
    artifacts = _encode_artifacts(p, p.groups, p.settings, seed, quiet)
    encode_seconds = time.perf_counter() - t_encode
    merged = build_merged_model(p.models, p.sources, artifacts, opset=p.opset, codebook_dtype=p.config.codebook_dtype)
    return {"model": merged.SerializeToString(), "groups": json.dumps(group_reports(p, artifacts)),
            "seconds": encode_seconds}


def _build_one_group(p: Plan, g: Group, setting: GroupSetting, seed: int, group: distributed.Group) -> onnx.ModelProto:
    """A merged model with only ``g`` encoded at ``setting`` (the budget search's candidates)."""
    data = None
    if group.is_main:
        artifacts = _encode_artifacts(p, [g], {g.name: setting}, seed)
        data = build_merged_model(p.models, p.sources, artifacts, opset=p.opset,
                                  codebook_dtype=p.config.codebook_dtype).SerializeToString()
    return onnx.load_from_string(group.from_main(data))


def group_reports(p: Plan, artifacts: list[GroupArtifact]) -> list[dict]:
    """The report's per-group entries."""
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
    return groups


def build_report(p: Plan, groups: list[dict], out_bytes: int, fidelity: list[dict], *, output, seed: int,
                 encode_seconds: float, total_seconds: float) -> dict:
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


def calibration_report(p: Plan, data: list[CalibrationSet], cal: CalibrationSettings, outcome: CalibrationOutcome,
                       calibrator: Calibrator) -> dict:
    """The report's ``calibration`` section: settings, losses per epoch, held-out fidelity before/after."""
    return {
        "settings": {k: v for k, v in vars(cal).items() if k != "data"},
        "epochs_run": len(outcome.history),
        "best_epoch": outcome.best_epoch,
        "stopped_early": outcome.stopped_early,
        "seconds": round(outcome.seconds, 1),
        "models": [{"index": i, "data": d.source, "samples": len(d), "train": len(m.train), "holdout": len(m.holdout),
                    "labels": d.y is not None, "before": outcome.before[i], "after": outcome.after[i]}
                   for i, (d, m) in enumerate(zip(data, calibrator.models))],
        "history": outcome.history,
        "int8_scales": outcome.int8_scales,
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
                    per_model[i][original] = _pinned_shape(key, shape)
                    hit = True
        if not hit:
            known = sorted({names[i][n] for i, model_inputs in enumerate(inputs) for n in model_inputs})
            raise ConfigError(f"--input-shape: no model input is named {key!r} (inputs: {', '.join(known)})")
    return per_model


def _pinned_shape(name: str, shape) -> tuple[int | None, ...]:
    """An ``--input-shape`` entry as ints; None (``N``) only first: the batch kept as the model has it."""
    dims = tuple(shape)
    if not dims or any(d is None for d in dims[1:]) or any(d is not None and int(d) < 1 for d in dims):
        raise ConfigError(f"--input-shape {name}: expected positive dimensions (None/N only for the batch), got {dims}")
    return tuple(None if d is None else int(d) for d in dims)
