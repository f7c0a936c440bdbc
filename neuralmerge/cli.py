"""The ``neuralmerge`` command line (click).

Every command turns a ``NeuralMergeError`` into one line on stderr and exit status 1; any other
exception is reported the same way (``internal error``, exit status 3) unless ``-v`` asks for the
traceback. A malformed command line exits with click's status 2.
"""
from __future__ import annotations

import json
import sys

import click

from . import __version__
from .cli_support import SEED, user_errors
from .errors import ConfigError


def parse_input_shapes(values: tuple[str, ...]) -> dict[str, tuple[int | None, ...]]:
    """``NAME=1x3x224x224`` (repeatable) -> {name: shape}; a first entry ``N`` (None) keeps the
    model's batch dimension as it is, dynamic or fixed."""
    shapes = {}
    for value in values:
        name, sep, dims = value.rpartition("=")
        entries = dims.lower().split("x")
        try:
            shape = tuple(None if k == 0 and d in ("n", "?") else int(d) for k, d in enumerate(entries))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or min((d for d in shape if d is not None), default=1) < 1:
            raise ConfigError(f"--input-shape {value!r}: expected NAME=DxDx... with positive integers (N for a "
                              "batch kept as the model has it), e.g. input=1x3x224x224 or input=Nx3x224x224")
        shapes[name] = shape
    return shapes


_encoding_options = [
    click.option("--preset", type=click.Choice(["accu", "light"]), default=None,
                  help="Per-layer r/C rules after the paper's ACCU / LIGHT settings (default: accu)."),
    click.option("--r", "r", type=int, default=None, help="Segment length r for every group (overrides the preset)."),
    click.option("--codewords", type=int, default=None, help="Codewords C per segment for every group (1..65536)."),
    click.option("--config", type=click.Path(dir_okay=False), default=None,
                 help="YAML config: defaults {r, codewords}, layers {group: {r, codewords, skip}}, compress_heads."),
    click.option("--compress-heads/--keep-heads", default=None,
                 help="Also encode each model's final classification layer(s) (default: keep them dense)."),
    click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=1x3xHxW",
                 help="Pin a dynamic input shape (repeatable; use the merged name, e.g. m1.x, where names collide; "
                      "a first entry N keeps the batch as the model has it, e.g. x=Nx3x64x64)."),
]


def _add_options(options):
    def decorator(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn
    return decorator


class OneLineErrors(click.Group):
    """Usage errors (a bad option value, a missing argument) as one line too, ``error: ...``,
    with click's exit status 2; click would print the usage and a hint over four lines."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            status = super().main(args, prog_name, complete_var, False, **extra)
        except click.ClickException as exc:
            where = f"{exc.ctx.command_path}: " if getattr(exc, "ctx", None) is not None else ""
            hint = f" (see {exc.ctx.command_path} --help)" if isinstance(exc, click.UsageError) and exc.ctx else ""
            click.echo(f"error: {where}{exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(status if isinstance(status, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="neuralmerge")
def main():
    """Merge several trained CNNs (ONNX) into one compact model for CPU devices."""


@main.command()
@click.argument("models", nargs=-1, type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Merged ONNX file to write.")
@_add_options(_encoding_options)
@click.option("--codebook-dtype", type=click.Choice(["float32", "float16"]), default=None,
              help="Storage type of the codebooks (default float32).")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Write a JSON report here.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for k-means and fidelity inputs.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--quiet", is_flag=True, help="No progress bars or summary.")
@click.option("--calib", "calib", multiple=True, type=click.Path(),
              help="Calibration data, once per model in model order: .npy (N x input shape), .npz (x, optional "
                   "labels y) or a folder of images (see 'preprocess' in the config). Enables calibration.")
@click.option("--epochs", type=int, default=None, help="Calibration epochs (default 5).")
@click.option("--batch-size", type=int, default=None, help="Calibration batch size, over all processes (default 64).")
@click.option("--lr", type=float, default=None, help="Calibration learning rate: Adam step relative to each tensor's RMS (default 1e-2).")
@click.option("--gamma", type=float, default=None, help="Weight of the task loss (default 10).")
@click.option("--temperature", type=float, default=None, help="Distillation temperature without labels (default 2).")
@click.option("--holdout", type=float, default=None,
              help="Fraction of each model's calibration data held out to measure fidelity (default 0.1).")
@click.option("--int8-aware/--no-int8-aware", default=None,
              help="Calibrate on the int8 runtime's arithmetic (inputs, codebooks and tables rounded as "
                   "'--lut int8' rounds them), for files meant to run on int8 tables (default off).")
@click.option("--budget", type=float, default=None,
              help="Search r/C per group so the fidelity drop stays within this many percentage points.")
@click.option("--resume", is_flag=True, help="Continue an interrupted calibration from its checkpoint.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Where calibration checkpoints go (default: OUTPUT.ckpt).")
@user_errors
def merge(models, output, preset, r, codewords, config, compress_heads, input_shapes, codebook_dtype, report,
          seed, force, quiet, calib, epochs, batch_size, lr, gamma, temperature, holdout, int8_aware, budget, resume,
          checkpoint_dir):
    """Merge MODELS (ONNX files; one model = compression) into one ONNX file."""
    from .pipeline import merge as run_merge

    result = run_merge(list(models), output, config=config, preset=preset, r=r, codewords=codewords,
                       codebook_dtype=codebook_dtype, compress_heads=compress_heads,
                       input_shapes=parse_input_shapes(input_shapes), seed=seed, report=report, force=force,
                       quiet=quiet, calib=list(calib) or None, budget=budget, resume=resume,
                       checkpoint_dir=checkpoint_dir,
                       calibration={"epochs": epochs, "batch_size": batch_size, "lr": lr, "gamma": gamma,
                                    "temperature": temperature, "holdout": holdout, "int8_aware": int8_aware})
    if not quiet and result.report is not None:  # under torchrun only rank 0 reports
        click.echo(format_summary(result.report))


@main.command()
@click.argument("models", nargs=-1, type=click.Path(dir_okay=False))
@_add_options(_encoding_options)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@user_errors
def inspect(models, preset, r, codewords, config, compress_heads, input_shapes, as_json):
    """Print the mergeable layers of MODELS and the alignment plan."""
    from .pipeline import plan as make_plan

    p = make_plan(list(models), config=config, preset=preset, r=r, codewords=codewords,
                  compress_heads=compress_heads, input_shapes=parse_input_shapes(input_shapes))
    data = plan_to_dict(p)
    click.echo(json.dumps(data, indent=2) if as_json else format_plan(data))


@main.command()
@click.option("--out", "out_dir", default="neuralmerge-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the trained models, the merged model and the reports.")
@click.option("--preset", type=click.Choice(["accu", "light"]), default="accu", show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@user_errors
def demo(out_dir, preset, seed, quiet):
    """Train two small models offline (digits, synthetic sounds), merge them and report."""
    from .demo import format_demo, run_demo

    click.echo(format_demo(run_demo(out_dir, preset=preset, seed=seed, quiet=quiet)))
    click.echo(f"files in {out_dir}/: digits.onnx, sound20.onnx (and their *_calib.npy), merged.onnx, "
               "report.json (.md, *.png), demo.json, demo.md")


def plan_to_dict(p) -> dict:
    return {
        "models": [{"index": i, "path": p.sources[i], "layers": [
            {"node": l.node, "op": l.op_type, "kind": l.kind, "shape": list(l.shape), "params": l.params,
             "head": l.is_head} for l in p.layers[i]]} for i in range(len(p.models))],
        "groups": [{"name": g.name, "kind": g.kind, "members": [f"m{m.model}.{m.node}" for m in g.members],
                    "r": p.settings[g.name].r, "codewords": p.settings[g.name].codewords,
                    "segments": p.group_segments(g)} for g in p.groups],
        "dense": [f"m{l.model}.{l.node}" for l in p.dense],
    }


def format_plan(data: dict) -> str:
    lines = []
    for m in data["models"]:
        lines.append(f"model m{m['index']}: {m['path']}  ({len(m['layers'])} mergeable layers)")
        for l in m["layers"]:
            shape = "x".join(map(str, l["shape"]))
            lines.append(f"  {l['kind']:<4} {l['op']:<6} {l['node']:<32} {shape:<18} {l['params']:>10,} params"
                         + ("  [head]" if l["head"] else ""))
    lines.append("")
    lines.append(f"plan ({len(data['groups'])} groups):")
    lines.append(f"  {'group':<8} {'r':>3} {'C':>6} {'segs':>5}  members")
    for g in data["groups"]:
        lines.append(f"  {g['name']:<8} {g['r']:>3} {g['codewords']:>6} {g['segments']:>5}  {', '.join(g['members'])}")
    if data["dense"]:
        lines.append(f"  dense (not encoded): {', '.join(data['dense'])}")
    return "\n".join(lines)


def format_summary(rep: dict) -> str:
    lines = [f"wrote {rep['output']}: {rep['output_bytes']:,} bytes, "
             f"compression {rep['compression_ratio']:.2f}x over {rep['input_bytes']:,} input bytes "
             f"(encoded in {rep['encode_seconds']:.1f} s)"]
    for g in rep["groups"]:
        lines.append(f"  {g['name']:<8} r={g['r']:<3} C={max(g['segment_codewords']):<5} "
                     f"rel.err={g['relative_error']:.4f}  {', '.join(g['layers'])}")
    for f in rep["fidelity"]:
        agree = "n/a" if f["top1_agreement"] is None else f"{100 * f['top1_agreement']:.1f}%"
        lines.append(f"  model m{f['model']}: top-1 agreement {agree}, max abs error {f['max_abs_error']:.3g} "
                     f"on {f['samples']} samples")
    cal = rep.get("calibration")
    if cal:
        lines.append(f"  calibrated {cal['epochs_run']} epoch(s) in {cal['seconds']} s, kept epoch {cal['best_epoch']}")
        for m in cal["models"]:
            key = "accuracy" if m["labels"] else "top1_agreement"
            if m["before"][key] is not None:
                lines.append(f"    m{m['index']} held-out {key.replace('_', ' ')}: {100 * m['before'][key]:.2f}% -> "
                             f"{100 * m['after'][key]:.2f}% ({m['holdout']} samples)")
    return "\n".join(lines)


def _add_commands_of_other_packages() -> None:
    """Commands that live beside their package (runtime, composition); each imports its heavy parts lazily."""
    from .compose.cli_compose import compose_cmd
    from .compose.cli_detection import aggregate_detections
    from .runtime.cli_runtime import bench_cmd, pack_cmd, run_cmd

    for command in (compose_cmd, aggregate_detections, run_cmd, bench_cmd, pack_cmd):
        main.add_command(command)


_add_commands_of_other_packages()
