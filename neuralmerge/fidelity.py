"""How faithfully a merged model reproduces its source models, measured in stock ONNX Runtime."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from .errors import NeuralMergeError
from .graph.normalize import TensorSpec, input_specs
from .io.onnx_files import ort_session


def random_inputs(specs: list[TensorSpec], samples: int, rng: np.random.Generator,
                  pinned: list[TensorSpec] | None = None) -> dict[str, np.ndarray]:
    """Standard-normal float inputs (zeros for integer inputs) shaped as ``pinned`` says where given
    (the inputs with ``--input-shape`` applied, which the merged model takes); a dynamic batch
    becomes ``samples``."""
    pinned_shapes = {spec.name: spec.shape for spec in pinned or []}
    feeds = {}
    for spec in specs:
        shape = tuple(samples if (k == 0 and d is None) else d
                      for k, d in enumerate(pinned_shapes.get(spec.name, spec.shape)))
        if None in shape:
            raise NeuralMergeError(f"input '{spec.name}' has a dynamic dimension: pin it with --input-shape")
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, spec.dtype)
    return feeds


def compare_outputs(reference: np.ndarray, merged: np.ndarray) -> dict:
    """Top-1 agreement over the last axis (for class-score outputs), max abs and relative error."""
    ref = reference.astype(np.float64)
    out = merged.astype(np.float64)
    diff = out - ref
    result = {
        "max_abs_error": float(np.abs(diff).max()) if diff.size else 0.0,
        "relative_error": float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)),
    }
    if ref.ndim >= 2 and ref.shape[-1] > 1:
        result["top1_agreement"] = float((ref.argmax(-1) == out.argmax(-1)).mean())
    return result


def measure_fidelity(originals: list[onnx.ModelProto], merged: onnx.ModelProto, names: list[dict[str, str]], *,
                     samples: int = 16, seed: int = 0, inputs: list[dict[str, np.ndarray]] | None = None,
                     pinned: list[list[TensorSpec]] | None = None) -> list[dict]:
    """Run each original and the merged model on the same inputs; per model, aggregate over its outputs.

    ``names[i]`` maps model i's original input/output names to their names in the merged graph.
    ``inputs[i]`` (optional) gives model i's feeds by original input name; otherwise random inputs,
    sized by ``pinned[i]`` (the inputs with ``--input-shape`` applied) where the original's are dynamic.
    """
    rng = np.random.default_rng(seed)
    feeds = [inputs[i] if inputs else random_inputs(input_specs(m), samples, rng, pinned[i] if pinned else None)
             for i, m in enumerate(originals)]
    merged_feeds = {names[i][k]: v for i, f in enumerate(feeds) for k, v in f.items()}
    merged_sess = ort_session(merged)
    merged_out = dict(zip([o.name for o in merged_sess.get_outputs()], merged_sess.run(None, merged_feeds)))
    results = []
    for i, model in enumerate(originals):
        sess = ort_session(model)
        ref = sess.run(None, feeds[i])
        per_output = {}
        for out_meta, ref_val in zip(sess.get_outputs(), ref):
            per_output[out_meta.name] = compare_outputs(ref_val, merged_out[names[i][out_meta.name]])
        agreements = [v["top1_agreement"] for v in per_output.values() if "top1_agreement" in v]
        results.append({
            "model": i,
            "samples": int(next(iter(feeds[i].values())).shape[0]) if feeds[i] else 0,
            "top1_agreement": float(np.mean(agreements)) if agreements else None,
            "max_abs_error": max(v["max_abs_error"] for v in per_output.values()),
            "relative_error": max(v["relative_error"] for v in per_output.values()),
            "outputs": per_output,
        })
    return results


def run_merged_model(session: ort.InferenceSession, names: dict[str, str], feeds: dict[str, np.ndarray],
                     dummy_batch: int = 1) -> dict[str, np.ndarray]:
    """Run one source model's task in a merged session.

    ``names`` is that model's original -> merged name map; ``feeds`` its inputs by original name.
    Other models' inputs get a small zero batch (ONNX Runtime wants every graph input fed).
    Returns that model's outputs by original name.
    """
    merged_feeds = {names[k]: v for k, v in feeds.items()}
    for meta in session.get_inputs():
        if meta.name not in merged_feeds:
            shape = [dummy_batch if not isinstance(d, int) else d for d in meta.shape]
            merged_feeds[meta.name] = np.zeros(shape, np.float32)
    wanted = {v: k for k, v in names.items() if k not in feeds}
    out_names = [o.name for o in session.get_outputs() if o.name in wanted]
    return {wanted[n]: v for n, v in zip(out_names, session.run(out_names, merged_feeds))}
