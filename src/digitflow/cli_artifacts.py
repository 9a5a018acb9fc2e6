"""CLI commands for experiments, runs and artifacts (filled in by the artifacts issue)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the artifact commands to `app`."""
