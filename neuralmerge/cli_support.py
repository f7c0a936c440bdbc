"""What every ``neuralmerge`` command shares: one-line errors and ``-v``.

A ``NeuralMergeError`` becomes ``error: <message>`` on stderr and exit status 1; any other
exception is reported the same way as an internal error (status 3); ``-v`` shows tracebacks.
Kept apart from ``cli.py`` so that command modules can use it without importing every command.
"""
from __future__ import annotations

import functools
import inspect
import logging
import math
import sys

import click

from .errors import NeuralMergeError


# Exit statuses: 1 for bad input (NeuralMergeError), 2 for a malformed command line (click's), 3 for
# a failure of neuralmerge itself, so that scripts can tell a bug from their own mistake.
INTERNAL_ERROR = 3


def user_errors(fn):
    """Decorate a click command: add ``-v/--verbose`` and map failures to one line and a non-zero exit.

    ``verbose`` is passed on to the command when it has a parameter of that name.
    """
    wants_verbose = "verbose" in inspect.signature(fn).parameters

    @functools.wraps(fn)
    def wrapper(*args, verbose: bool = False, **kwargs):
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
        if wants_verbose:
            kwargs["verbose"] = verbose
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except NeuralMergeError as exc:
            if verbose:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except Exception as exc:  # noqa: BLE001 - the user gets one line; -v shows the traceback
            if verbose:
                raise
            first = (str(exc).strip().splitlines() or [""])[0]
            click.echo(f"error: internal error: {type(exc).__name__}: {first} (run with -v for details)", err=True)
            sys.exit(INTERNAL_ERROR)

    if wants_verbose:  # click must not see 'verbose' twice: the wrapper's option supplies it
        wrapper.__signature__ = inspect.signature(fn)
    return click.option("-v", "--verbose", is_flag=True, help="Show details and tracebacks.")(wrapper)


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses NaN and infinities (NaN passes every range comparison)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


POSITIVE = FiniteFloat(min=0.0, min_open=True)
SEED = click.IntRange(min=0)
