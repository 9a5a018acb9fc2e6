"""What a pull leaves in a models folder, seen the way a user lists it."""

from __future__ import annotations

from pathlib import Path


def leftovers(folder: Path) -> list[str]:
    """Entries other than pull lock files (kept on purpose: removing a lock file races)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def visible(folder: Path) -> list[str]:
    """Entries a plain `ls` shows (run folders), hidden versions and locks left out."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
