"""Shared by every CLI command: known errors become one stderr line and a distinct exit code."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer

from digitflow.errors import DigitflowError

DataDir = Annotated[
    Path, typer.Option("--data-dir", help="Folder of the prepared PNGs and CSV tables.")
]

P = ParamSpec("P")
R = TypeVar("R")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` on stderr and return the Exit to raise."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


# Exit code of a command that needs a library this install lacks (sysexits' EX_UNAVAILABLE).
MISSING_LIBRARY_EXIT = 69


def missing_library_message(exc: ModuleNotFoundError) -> str | None:
    """The one line for a third-party module this install lacks; None for digitflow's own
    modules (a broken install or a bug, which keeps its traceback).

    The slim image and a base `pip install digitflow` serve and pull only: training, exporting and
    the embedded SQLite store need torch and full MLflow (the `train` extra).
    """
    top_level = (exc.name or "").partition(".")[0]
    if not top_level or top_level in {"digitflow", "digitflow_fastapi"}:
        return None
    return (
        f"this command needs the Python module {top_level!r}, which this install lacks (a slim "
        "install serves and pulls only): pip install 'digitflow[train]', or use the full image "
        "(make image-full)"
    )


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn `DigitflowError`, a missing optional library (and Ctrl-C) into one clear line and a
    non-zero exit, no traceback."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except DigitflowError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except ModuleNotFoundError as exc:
            message = missing_library_message(exc)
            if message is None:
                raise
            raise fail(message, MISSING_LIBRARY_EXIT) from None
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            raise typer.Exit(130) from None

    return wrapper
