"""Parsing and checking the edge's settings (API keys, CORS origins, rate limit).

Pure functions shared by `config.Settings` (to refuse a bad value at start-up with one line)
and the edge that uses the parsed values. Messages never repeat a key.
"""

from __future__ import annotations

import re
from pathlib import Path

KEY_PATTERN = re.compile(r"[\x21-\x2b\x2d-\x7e]{16,256}")  # visible ASCII without a comma
ORIGIN_PATTERN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")
RATE_LIMIT_PATTERN = r"^[1-9][0-9]{0,8}/(second|minute|hour)$"
PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}


def split_api_keys(text: str) -> list[str]:
    """`API_KEYS`: comma-separated, surrounding spaces ignored."""
    return [key.strip() for key in text.split(",") if key.strip()]


def read_api_keys_file(path: Path) -> list[str]:
    """`API_KEYS_FILE`: one key a line; blank lines and `#` comments ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"cannot read {path}: {reason}") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def check_api_keys(keys: list[str], source: str) -> None:
    """At least one key, each 16–256 visible ASCII characters (no comma); names no key."""
    if not keys:
        raise ValueError(f"{source} holds no key")
    for number, key in enumerate(keys, start=1):
        if not KEY_PATTERN.fullmatch(key):
            raise ValueError(
                f"key #{number} in {source} ({len(key)} characters) is not 16-256 visible "
                "ASCII characters without a comma"
            )


def parse_origins(text: str) -> tuple[str, ...]:
    """`CORS_ORIGINS`: comma-separated `scheme://host[:port]` origins, or `*`; empty: none."""
    origins: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item != "*" and not ORIGIN_PATTERN.fullmatch(item):
            raise ValueError(
                f"{item[:80]!r} is not an origin (scheme://host[:port], no path, or '*')"
            )
        origins.append(item.lower())
    return tuple(dict.fromkeys(origins))


def parse_rate_limit(text: str) -> tuple[int, float]:
    """`100/second` → (100, 1.0): how many requests per how many seconds."""
    count, _, period = text.partition("/")
    return int(count), PERIODS[period]
