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
    becomes ``samples``, and so does a batch every input fixes (measure_fidelity runs it in chunks)."""
    pinned_shapes = {spec.name: spec.shape for spec in pinned or []}
    shapes = [pinned_shapes.get(spec.name, spec.shape) for spec in specs]
    fixed_batch = _common_batch(shapes) is not None
    feeds = {}
    for spec, spec_shape in zip(specs, shapes):
        shape = tuple(samples if (k == 0 and (d is None or fixed_batch)) else d for k, d in enumerate(spec_shape))
        if None in shape:
            raise NeuralMergeError(f"input '{spec.name}' has a dynamic dimension: pin it with --input-shape")
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, spec.dtype)
    return feeds


def compare_outputs(reference: np.ndarray, merged: np.ndarray) -> dict:
    """Top-1 agreement for class-score outputs ([N, classes], as calibration counts them), max abs
    and relative error."""
    ref = reference.astype(np.float64)
    out = merged.astype(np.float64)
    diff = out - ref
    result = {
        "max_abs_error": float(np.abs(diff).max()) if diff.size else 0.0,
        "relative_error": float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)),
    }
    if ref.ndim == 2 and ref.shape[1] > 1:
        result["top1_agreement"] = float((ref.argmax(-1) == out.argmax(-1)).mean())
    return result


def measure_fidelity(originals: list[onnx.ModelProto], merged: onnx.ModelProto, names: list[dict[str, str]], *,
                     samples: int = 16, seed: int = 0, inputs: list[dict[str, np.ndarray]] | None = None,
                     pinned: list[list[TensorSpec]] | None = None, labels: list[str] | None = None) -> list[dict]:
    """Run each original and the merged model on the same inputs; per model, aggregate over its outputs.

    ``names[i]`` maps model i's original input/output names to their names in the merged graph.
    ``inputs[i]`` (optional) gives model i's feeds by original input name; otherwise random inputs,
    sized by ``pinned[i]`` (the inputs with ``--input-shape`` applied) where the original's are dynamic.
    A model exported with a fixed batch runs its samples that many at a time. ``labels`` name the
    models in errors (a source model onnxruntime cannot run is a NeuralMergeError).
    """
    rng = np.random.default_rng(seed)
    feeds = [inputs[i] if inputs else random_inputs(input_specs(m), samples, rng, pinned[i] if pinned else None)
             for i, m in enumerate(originals)]
    merged_sess = ort_session(merged)
    results = []
    for i, model in enumerate(originals):
        sess = ort_session(model)
        out_names = [o.name for o in sess.get_outputs()]
        ref_parts, merged_parts = [], []
        # The batch the original fixes or, for a dynamic one, what --input-shape pinned it to.
        batch = _common_batch(meta.shape for meta in sess.get_inputs())
        if batch is None and pinned:
            batch = _common_batch(spec.shape for spec in pinned[i])
        for chunk, count in _batches(feeds[i], batch):
            try:
                reference = sess.run(None, chunk)
            except Exception as exc:  # onnxruntime's errors are untyped
                label = labels[i] if labels else f"model {i}"
                raise NeuralMergeError(f"{label} fails in onnxruntime: {str(exc).strip().splitlines()[0]}") from None
            ref_parts.append([r[:count] for r in reference])
            got = run_merged_model(merged_sess, names[i], chunk)
            merged_parts.append([got[n][:count] for n in out_names])
        per_output = {}
        for k, name in enumerate(out_names):
            per_output[name] = compare_outputs(np.concatenate([p[k] for p in ref_parts]),
                                               np.concatenate([p[k] for p in merged_parts]))
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


def _common_batch(shapes) -> int | None:
    """The batch size all of these input shapes fix, if they agree on one (torch.onnx.export
    fixes 1 unless told not to)."""
    first = {shape[0] if shape and isinstance(shape[0], int) else None for shape in shapes}
    return first.pop() if len(first) == 1 else None


def _batches(feeds: dict[str, np.ndarray], batch: int | None):
    """``feeds`` whole, or ``batch`` samples at a time (the last chunk padded with its last sample);
    yields (chunk, how many of its samples are real)."""
    total = len(next(iter(feeds.values()))) if feeds else 0
    if batch is None or total == batch:
        yield feeds, total
        return
    for start in range(0, total, batch):
        chunk = {k: v[start:start + batch] for k, v in feeds.items()}
        count = len(next(iter(chunk.values())))
        yield {k: np.concatenate([v, np.repeat(v[-1:], batch - count, axis=0)]) for k, v in chunk.items()}, count


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
