"""The NeuralMerger paper's LeNet experiment (§4.1, Tables 1–3 and 7), reproduced offline.

Trains the paper's LeNet on two offline tasks (scikit-learn digits upsampled to 32×32 as the
image task, the procedural 20-class "sound" task), exports both to ONNX, merges them at ACCU
and LIGHT, calibrates **without labels** (the training images only), and measures test accuracy
in stock ONNX Runtime. Also: each model compressed alone with the same settings (Table 3), a
third model (LeNet on shapes) merged with the pair (Table 7: the pair re-merged with a third
model, compared with the pair), and the ``--budget`` search on the pair.

    python benchmarks/lenet_pair.py [--epochs 3] [--calib-samples N] [--budget 1.0] [--json out.json]
                                    [--workdir DIR] [--skip single three budget]

Markdown tables go to stdout. Trained models and calibration arrays are kept in ``--workdir`` and
reused when present. Calibration uses each task's training images, or a seeded subset of N per
task (``--calib-samples``: faster, noisier); torch runs on 2 threads. ``--skip`` leaves out parts
after the pair's table: ``single`` (Table 3, each model alone), ``three`` (Table 7; the shapes
LeNet is then not trained) and ``budget`` (the ``--budget`` search).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuralmerge.fidelity import ort_session, run_merged_model  # noqa: E402
from neuralmerge.pipeline import merge  # noqa: E402
from neuralmerge.zoo.architectures import LeNet  # noqa: E402
from neuralmerge.zoo.datasets import digits32, shapes, sound20  # noqa: E402
from neuralmerge.zoo.train import export_onnx, onnx_accuracy, train_classifier  # noqa: E402

from _cli import check_outputs, number, positive_int, write_text  # noqa: E402  (benchmarks/_cli.py)

TASKS = {  # name -> (dataset factory, training epochs, input name, output name)
    "image": (lambda: digits32(seed=0), 4, "image", "digit_logits"),
    "sound": (lambda: sound20(seed=0), 8, "spectrogram", "sound_logits"),
    "shapes": (lambda: shapes(seed=0), 15, "shape_image", "shape_logits"),
}


def prepare(workdir: Path, names: list[str], calib_samples: int | None = None) -> dict:
    """Train (or reuse) the LeNets of the tasks ``names``; write their ONNX files and unlabeled
    calibration arrays."""
    tasks = {}
    for name in names:
        make, epochs, in_name, out_name = TASKS[name]
        ds = make()
        path, calib = workdir / f"{name}.onnx", workdir / f"{name}_calib{calib_samples or ''}.npy"
        if not path.is_file():
            torch.manual_seed(0)
            model = train_classifier(LeNet(ds.num_classes), ds.x_train, ds.y_train, epochs=epochs, seed=0, quiet=True)
            export_onnx(model, path, ds.input_shape, input_name=in_name, output_name=out_name)
        if not calib.is_file():
            subset = np.random.default_rng(0).permutation(len(ds.x_train))[:calib_samples]
            np.save(calib, ds.x_train[np.sort(subset)])   # training images, without their labels
        tasks[name] = {"ds": ds, "path": path, "calib": calib, "input": in_name, "output": out_name,
                       "accuracy": onnx_accuracy(path, ds.x_test, ds.y_test)}
    return tasks


def merged_accuracy(model, tasks: list[dict]) -> list[float]:
    """Test accuracy of every task run in the merged model (stock ONNX Runtime)."""
    session = ort_session(model, threads=2)
    props = {p.key: p.value for p in model.metadata_props}
    maps = [{e["original"]: e["name"] for e in m["inputs"] + m["outputs"]} for m in json.loads(props["neuralmerge.models"])]
    result = []
    for names, t in zip(maps, tasks):
        x, y = t["ds"].x_test, t["ds"].y_test
        logits = np.concatenate([run_merged_model(session, names, {t["input"]: x[k:k + 512]})[t["output"]]
                                 for k in range(0, len(x), 512)])
        result.append(float((logits.argmax(1) == y).mean()))
    return result


def run(tasks: list[dict], workdir: Path, tag: str, epochs: int, **options) -> dict:
    """Merge + unlabeled calibration; accuracy before (uncalibrated) and after."""
    start = time.perf_counter()
    out = workdir / f"{tag}.onnx"
    result = merge([t["path"] for t in tasks], out, calib=[str(t["calib"]) for t in tasks],
                   calibration={"epochs": epochs}, report=workdir / f"{tag}.json", force=True, quiet=True,
                   checkpoint_dir=workdir / f"{tag}.ckpt", **options)
    seconds = time.perf_counter() - start
    uncalibrated = merge([t["path"] for t in tasks], quiet=True, fidelity_samples=4,
                         **{k: v for k, v in options.items() if k != "budget"},
                         **({"config": {"layers": {g["name"]: {"r": g["r"], "codewords": g["codewords"]}
                                                   for g in result.report["groups"]}}} if "budget" in options else {}))
    rep = result.report
    return {"tag": tag, "compression": rep["compression_ratio"], "bytes": rep["output_bytes"],
            "groups": [(g["name"], g["r"], g["codewords"]) for g in rep["groups"]],
            "original": [t["accuracy"] for t in tasks], "uncalibrated": merged_accuracy(uncalibrated.model, tasks),
            "calibrated": merged_accuracy(result.model, tasks), "seconds": round(seconds, 1),
            "epochs_run": rep["calibration"]["epochs_run"], "best_epoch": rep["calibration"]["best_epoch"],
            "search": rep.get("search")}


def fp16_compression(tasks: list[dict], preset: str) -> float:
    """Compression with fp16 codebooks (file size does not depend on calibration)."""
    return merge([t["path"] for t in tasks], quiet=True, preset=preset, codebook_dtype="float16",
                 fidelity_samples=4).report["compression_ratio"]


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--calib-samples", type=positive_int, default=None, help="calibration images per task (default: all)")
    parser.add_argument("--budget", type=number(float, 0, 100, exclusive=True), default=1.0)
    parser.add_argument("--workdir", type=Path, default=Path("runs/lenet_pair"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--skip", nargs="*", default=[], choices=["single", "three", "budget"],
                        help="parts to leave out: single (Table 3), three (Table 7, and training the shapes "
                             "LeNet), budget (the --budget search)")
    args = parser.parse_args()
    check_outputs([args.json], folders=[args.workdir])  # creates the workdir
    torch.set_num_threads(2)
    start = time.perf_counter()
    all_tasks = prepare(args.workdir, ["image", "sound"] + ([] if "three" in args.skip else ["shapes"]),
                        args.calib_samples)
    pair = [all_tasks["image"], all_tasks["sound"]]
    results: dict = {"train_seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads()}

    print("## Table 2 analogue: merged pair, calibrated without labels\n")
    print("| setting | r/C (conv1, conv2, fc1) | compression fp32 | fp16 | image acc (orig → uncal. → cal.) | drop "
          "| sound acc (orig → uncal. → cal.) | drop | calib. time |")
    print("|---|---|---:|---:|---|---:|---|---:|---:|")
    for preset in ("accu", "light"):
        r = run(pair, args.workdir, f"pair_{preset}", args.epochs, preset=preset)
        r["compression_fp16"] = fp16_compression(pair, preset)
        results[f"pair_{preset}"] = r
        rc = ", ".join(f"{g[1]}/{g[2]}" for g in r["groups"])
        cells = [f"{pct(o)} → {pct(u)} → {pct(c)} | {100 * (o - c):+.2f} pts"
                 for o, u, c in zip(r["original"], r["uncalibrated"], r["calibrated"])]
        print(f"| {preset.upper()} | {rc} | {r['compression']:.2f}× | {r['compression_fp16']:.2f}× | "
              f"{cells[0]} | {cells[1]} | {r['seconds']} s |", flush=True)

    if "single" not in args.skip:
        print("\n## Table 3 analogue: each model compressed alone (ACCU), calibrated without labels\n")
        print("| model | compression | acc. original → compressed | drop alone | drop in the merged pair |")
        print("|---|---:|---|---:|---:|")
        for k, name in enumerate(("image", "sound")):
            r = run([all_tasks[name]], args.workdir, f"{name}_alone", args.epochs, preset="accu")
            results[f"{name}_alone"] = r
            merged_drop = results["pair_accu"]["original"][k] - results["pair_accu"]["calibrated"][k]
            print(f"| {name} only | {r['compression']:.2f}× | {pct(r['original'][0])} → {pct(r['calibrated'][0])} | "
                  f"{100 * (r['original'][0] - r['calibrated'][0]):+.2f} pts | {100 * merged_drop:+.2f} pts |", flush=True)

    if "three" not in args.skip:
        print("\n## Table 7 analogue: a third model (shapes) merged with the pair (ACCU)\n")
        r = run(pair + [all_tasks["shapes"]], args.workdir, "three_accu", args.epochs, preset="accu")
        results["three_accu"] = r
        two = results["pair_accu"]
        print("| merged model | compression | image drop | sound drop | shapes drop |")
        print("|---|---:|---:|---:|---:|")
        print(f"| image + sound | {two['compression']:.2f}× | "
              + " | ".join(f"{100 * (o - c):+.2f} pts" for o, c in zip(two["original"], two["calibrated"])) + " | n/a |")
        print(f"| image + sound + shapes | {r['compression']:.2f}× | "
              + " | ".join(f"{100 * (o - c):+.2f} pts" for o, c in zip(r["original"], r["calibrated"])) + " |",
              flush=True)

    if "budget" not in args.skip:
        print(f"\n## Budget search on the pair (--budget {args.budget})\n")
        r = run(pair, args.workdir, "pair_budget", args.epochs, budget=args.budget)
        results["pair_budget"] = r
        light = results["pair_light"]
        print("| group | chosen r/C | share of the budget (pts) | proxy drop (pts) | candidates tried (r/C: drop) |")
        print("|---|---|---:|---:|---|")
        for g in r["search"]["groups"]:
            tried = ", ".join(f"{c['r']}/{c['codewords']}: {c['drop']:.2f}" for c in g["candidates"])
            print(f"| {g['name']} | {g['r']}/{g['codewords']} | {g['share']:.3f} | {g['drop']:.3f} | {tried} |")
        print(f"\nsearch {r['search']['seconds']} s, total with final calibration {r['seconds']} s; "
              f"compression {r['compression']:.2f}× (LIGHT {light['compression']:.2f}×); drops "
              + ", ".join(f"{100 * (o - c):+.2f} pts" for o, c in zip(r["original"], r["calibrated"])), flush=True)

    results["total_seconds"] = round(time.perf_counter() - start, 1)
    print(f"\ntotal {results['total_seconds']} s (torch threads {results['threads']})")
    if args.json:
        write_text(args.json, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
