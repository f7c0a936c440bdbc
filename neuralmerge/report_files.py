"""Human-readable companions of ``report.json``: ``report.md`` and PNG plots (matplotlib), written atomically.

For ``--report out/report.json``: ``out/report.md``, ``out/report_groups.png`` (r/C and quantization
error per group), ``out/report_fidelity.png`` (held-out fidelity per model before/after calibration)
and ``out/report_loss.png`` (training loss per epoch and model).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402

from .io.onnx_files import write_bytes_atomic  # noqa: E402


def companion_paths(report: str | os.PathLike) -> dict[str, Path]:
    base = Path(report)
    return {"md": base.with_suffix(".md"), "groups": base.with_name(f"{base.stem}_groups.png"),
            "fidelity": base.with_name(f"{base.stem}_fidelity.png"), "loss": base.with_name(f"{base.stem}_loss.png")}


def write_report_files(rep: dict, report: str | os.PathLike, *, force: bool = False) -> list[Path]:
    """Write the Markdown report and the plots next to ``report``; return their paths."""
    paths = companion_paths(report)
    write_bytes_atomic(format_markdown(rep).encode(), paths["md"], force=force)
    for key, draw in (("groups", _plot_groups), ("fidelity", _plot_fidelity), ("loss", _plot_loss)):
        figure = draw(rep)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        write_bytes_atomic(buffer.getvalue(), paths[key], force=force)
    return list(paths.values())


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def format_markdown(rep: dict) -> str:
    lines = [f"# neuralmerge report: {rep['output'] or '(in memory)'}", "",
             f"{rep['input_bytes']:,} → {rep['output_bytes']:,} bytes: **{rep['compression_ratio']:.2f}×** "
             f"({rep['codebook_dtype']} codebooks, preset {rep['preset']}, seed {rep['seed']})", "",
             "## Groups", "", "| group | kind | r | C | segments | rel. quantization error | layers |",
             "|---|---|---:|---:|---:|---:|---|"]
    for g in rep["groups"]:
        lines.append(f"| {g['name']} | {g['kind']} | {g['r']} | {g['codewords']} | {g['segments']} | "
                     f"{g['relative_error']:.4f} | {', '.join(g['layers'])} |")
    cal = rep.get("calibration")
    if cal:
        lines += ["", "## Calibration", "",
                  f"{cal['epochs_run']} epoch(s) in {cal['seconds']} s, best epoch {cal['best_epoch']}"
                  + (" (stopped early)" if cal["stopped_early"] else "") + ".", "",
                  "| model | data | held out | labels | agreement before | after | accuracy before | after |",
                  "|---|---|---:|---|---:|---:|---:|---:|"]
        for m in cal["models"]:
            b, a = m["before"], m["after"]
            lines.append(f"| m{m['index']} | {m['data']} | {m['holdout']} | {'yes' if m['labels'] else 'no'} | "
                         f"{_percent(b['top1_agreement'])} | {_percent(a['top1_agreement'])} | "
                         f"{_percent(b['accuracy'])} | {_percent(a['accuracy'])} |")
    search = rep.get("search")
    if search:
        lines += ["", "## Budget search", "",
                  f"Budget {search['budget']} points, shared among groups in proportion to their weights; "
                  f"{search['seconds']} s.",
                  "", "| group | chosen r/C | share (points) | drop (points) | fits | candidates tried |",
                  "|---|---|---:|---:|---|---:|"]
        for g in search["groups"]:
            lines.append(f"| {g['name']} | {g['r']}/{g['codewords']} | {g['share']:.3f} | {g['drop']:.3f} | "
                         f"{'yes' if g['fits'] else 'no'} | {len(g['candidates'])} |")
    lines += ["", "## Fidelity in ONNX Runtime", "", "| model | samples | top-1 agreement | max abs error |",
              "|---|---:|---:|---:|"]
    for f in rep["fidelity"]:
        lines.append(f"| m{f['model']} | {f['samples']} | {_percent(f['top1_agreement'])} | {f['max_abs_error']:.3g} |")
    return "\n".join(lines) + "\n"


def _plot_groups(rep: dict):
    groups = rep["groups"]
    names = [g["name"] for g in groups]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.bar(names, [g["relative_error"] for g in groups], color="tab:blue")
    left.set_title("relative quantization error")
    for k, g in enumerate(groups):
        left.annotate(f"r={g['r']}\nC={g['codewords']}", (k, g["relative_error"]), ha="center", va="bottom",
                      fontsize=8)
    left.margins(y=0.3)
    right.bar(names, [g["codebook_bytes"] + g["code_bytes"] for g in groups], color="tab:orange")
    right.set_title("bytes (codebook + codes)")
    fig.tight_layout()
    return fig


def _plot_fidelity(rep: dict):
    models = rep["calibration"]["models"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    labels = [f"m{m['index']}" for m in models]
    pick = [("accuracy" if m["labels"] else "top1_agreement") for m in models]
    before = [100 * (m["before"][k] or 0.0) for m, k in zip(models, pick)]
    after = [100 * (m["after"][k] or 0.0) for m, k in zip(models, pick)]
    xs = range(len(models))
    ax.bar([x - 0.2 for x in xs], before, width=0.4, label="before")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, label="after")
    ax.set_xticks(list(xs), labels)
    ax.set_ylim(min(before + after + [100]) - 5, 100.5)
    ax.set_ylabel("held-out agreement / accuracy (%)")
    ax.legend()
    fig.tight_layout()
    return fig


def _plot_loss(rep: dict):
    history = rep["calibration"]["history"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if history:
        for i in range(len(history[0]["loss"])):
            ax.plot([h["epoch"] for h in history], [h["loss"][i] for h in history], marker="o", label=f"m{i}")
        ax.legend()
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    return fig
