"""``neuralmerge run``, ``bench`` and ``pack``: the runtime's commands (registered in neuralmerge/cli.py).

Same conventions as the other commands: a user error prints ``error: ...`` and exits 1, a
traceback only with ``-v``; files are written to a temporary name and renamed into place.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import click
import numpy as np

from neuralmerge.cli_support import user_errors
from neuralmerge.io.onnx_files import check_output_paths, write_bytes_atomic
from neuralmerge.errors import ConfigError
from neuralmerge.runtime.session import PRECISIONS

__all__ = ["run_cmd", "bench_cmd", "pack_cmd"]


def _read_feeds(values: tuple[str, ...]) -> dict[str, np.ndarray]:
    feeds = {}
    for value in values:
        name, sep, file = value.partition("=")
        if not sep or not name or not file:
            raise ConfigError(f"--input {value!r}: expected NAME=FILE.npy")
        if name in feeds:
            raise ConfigError(f"--input {name} is given twice")
        try:
            array = np.load(file, allow_pickle=False)
        except ValueError:  # numpy's message for a file that is not .npy speaks of pickles
            raise ConfigError(f"--input {name}: {file} is not a readable .npy file") from None
        except OSError as exc:
            raise ConfigError(f"--input {name}: cannot read {file}: {str(exc).splitlines()[0]}") from None
        if not isinstance(array, np.ndarray):
            array.close()
            raise ConfigError(f"--input {name}: {file} is an .npz archive; give one .npy file per input")
        feeds[name] = array
    return feeds


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The arrays as an .npz archive. Written member by member: np.savez(f, **arrays) takes an
    output named 'file' or 'allow_pickle' for its own arguments."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    return buffer.getvalue()


@click.command("run")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--input", "inputs", multiple=True, metavar="NAME=FILE.npy", help="A feed (repeatable).")
@click.option("--output", "outputs", multiple=True, metavar="NAME",
              help="Compute only these outputs (repeatable; default: every output the given inputs compute).")
@click.option("--lut", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Lookup-table precision of the encoded layers (fp32 is exact).")
@click.option("--threads", type=click.IntRange(1, 1024), default=1, show_default=True)
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Write the outputs to this .npz file.")
@click.option("--force", is_flag=True, help="Overwrite --out.")
@user_errors
def run_cmd(model, inputs, outputs, lut, threads, out_path, force):
    """Run MODEL (.onnx or .nmpack) on the native lookup-table runtime."""
    from neuralmerge.runtime import Session

    feeds_given = [value.partition("=")[2] for value in inputs]
    if out_path is not None:
        check_output_paths([out_path], [model, *feeds_given], force=force)
    session = Session(model, lut=lut, threads=threads)
    feeds = _read_feeds(inputs)
    results = session.run(feeds, outputs=list(outputs) or _computable_outputs(session, feeds))
    if out_path is not None:
        write_bytes_atomic(_npz_bytes(results), out_path, force=force)
    for name, array in results.items():
        line = f"{name}: shape {tuple(array.shape)}"
        if array.ndim == 2:
            line += f", top-1 {array.argmax(axis=1).tolist()}"
        click.echo(line)


def _computable_outputs(session, feeds: dict) -> list[str]:
    """The outputs whose inputs are all fed: a merged model's tasks run from their own inputs alone."""
    known = [spec.name for spec in session.inputs]
    unknown = [name for name in feeds if name not in known]
    if unknown:  # before "computes nothing", which would hide the misspelt name
        raise ConfigError(f"unknown input '{unknown[0]}'; the model's inputs are: {', '.join(known)}")
    outputs = [spec.name for spec in session.outputs]
    computable = [name for name in outputs if set(session.inputs_needed(name)) <= set(feeds)]
    if not computable:
        first = outputs[0]
        raise ConfigError(f"the given inputs compute no output: {first} needs "
                          f"{', '.join(session.inputs_needed(first))} (--input NAME=FILE.npy)")
    return computable


@click.command("pack")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .nmpack file to write.")
@click.option("--force", is_flag=True, help="Overwrite the output.")
@user_errors
def pack_cmd(model, output, force):
    """Pack a merged ONNX MODEL into the .nmpack file the C++ runtime loads (no protobuf needed)."""
    from neuralmerge.runtime import Session, pack_model

    check_output_paths([output], [model], force=force)
    source_bytes = Path(model).stat().st_size if Path(model).is_file() else 0
    data = pack_model(model)
    Session(data)  # the runtime validates the pack before anything is written
    write_bytes_atomic(data, output, force=force)
    click.echo(f"wrote {output}: {len(data):,} bytes (from {source_bytes:,} bytes of ONNX)")


@click.command("bench")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--baseline", "baselines", multiple=True, type=click.Path(dir_okay=False),
              help="An original model, run back to back with the others in ONNX Runtime (repeatable).")
@click.option("--threads", type=click.IntRange(1, 1024), default=1, show_default=True)
@click.option("--lut", "luts", multiple=True, type=click.Choice(PRECISIONS),
              help="Precisions to time (repeatable; default: all).")
@click.option("--repeat", type=click.IntRange(1), default=200, show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=20, show_default=True)
@click.option("--no-int8-baseline", is_flag=True, help="Skip the statically quantised int8 baseline.")
@click.option("--profile", is_flag=True,
              help="Also time every node (in separate runs) and show where the time goes.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results here.")
@click.option("--force", is_flag=True, help="Overwrite --json.")
@user_errors
def bench_cmd(model, baselines, threads, luts, repeat, warmup, no_int8_baseline, profile, json_path, force):
    """Time merged MODEL (.onnx or .nmpack) in the runtime against the original models in ONNX Runtime (batch 1)."""
    from neuralmerge.runtime.bench import benchmark, format_benchmark

    if json_path is not None:
        check_output_paths([json_path], [model, *baselines], force=force)
    result = benchmark(model, list(baselines), threads=threads, luts=tuple(luts) or PRECISIONS, repeat=repeat,
                       warmup=warmup, int8_baseline=not no_int8_baseline, profile=profile)
    if json_path:
        write_bytes_atomic(json.dumps(result, indent=2).encode(), json_path, force=force)
    click.echo(format_benchmark(result))
