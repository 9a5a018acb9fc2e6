"""MkDocs hook: the configuration page's tables, rendered from the settings classes themselves.

`docs/configuration.md` holds the marker below; this hook replaces it with one table per settings
class (variable, type, default, description), so the page cannot drift from the code. A field
without a `description` fails the build; a field marked `json_schema_extra={"internal": True}`
(a value the server's processes pass to each other) is left out.
"""

from __future__ import annotations

import importlib
import sys
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

MARKER = "<!-- settings-tables -->"
REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIR = REPO_ROOT / "src"


@dataclass(frozen=True)
class SettingsTable:
    """One class to document: where it lives, its heading (and anchor), and what reads it."""

    module: str
    class_name: str
    heading: str
    anchor: str
    intro: str


TABLES = (
    SettingsTable(
        module="digitflow_fastapi.config",
        class_name="Settings",
        heading="Server",
        anchor="server-settings",
        intro=(
            "Read once by every server process (the gunicorn master and its workers, plain "
            "uvicorn, each Ray Serve replica). The model fields are shared with the CLI through "
            "`digitflow.settings.ModelSettings`."
        ),
    ),
    SettingsTable(
        module="digitflow.settings",
        class_name="CoreSettings",
        heading="CLI and pipeline",
        anchor="core-settings",
        intro=(
            "Read once by each `digitflow` command (training, the artifact commands, `serve`, "
            "`predict`), and by the server for the artifact store (to resolve `PRED_MODEL_URI`) "
            "and the ONNX export cache."
        ),
    ),
)


class UndocumentedSettingsError(ValueError):
    """Raised when a settings field has no description: the page would have a hole."""


def is_internal(field: FieldInfo) -> bool:
    """True for a field marked `json_schema_extra={"internal": True}`."""
    extra = field.json_schema_extra
    return isinstance(extra, dict) and extra.get("internal") is True


def documented_fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """The fields the page lists (all but the internal ones), in declaration order."""
    return {name: field for name, field in model.model_fields.items() if not is_internal(field)}


def _constraints(metadata: Iterable[Any]) -> list[str]:
    words: list[str] = []
    for item in metadata:
        if isinstance(item, annotated_types.Gt):
            words.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Ge):
            words.append(f"≥ {item.ge}")
        elif isinstance(item, annotated_types.Lt):
            words.append(f"< {item.lt}")
        elif isinstance(item, annotated_types.Le):
            words.append(f"≤ {item.le}")
        elif getattr(item, "pattern", None):
            words.append(f"matching `{item.pattern}`")
    return words


def type_label(annotation: Any, metadata: Iterable[Any] = ()) -> str:
    """A reader's name for a field's type: `int > 0`, `path, optional`, `one of onnx, torch`."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        return type_label(base, [*extra, *metadata])
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        present = [type_label(arg, metadata) for arg in args if arg is not type(None)]
        optional = ", optional" if type(None) in args else ""
        return " or ".join(present) + optional
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{value}`" for value in typing.get_args(annotation))
    names = {bool: "bool", int: "int", float: "float", str: "str", Path: "path"}
    if annotation is SecretStr:
        label = "str (secret)"
    else:
        label = names.get(annotation, getattr(annotation, "__name__", str(annotation)))
    return " ".join([label, ", ".join(_constraints(metadata))]).strip()


def _binary_size(value: int, unit: str) -> str:
    for factor, prefix in ((1024 * 1024, "Mi"), (1024, "Ki")):
        if value >= factor and value % factor == 0:
            return f" ({value // factor:,} {prefix}{unit})"
    return ""


def default_label(name: str, field: FieldInfo) -> str:
    """The default as it would be written in the environment, paths shown from the checkout."""
    value = field.default
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int):
        if "BYTES" in name:
            return f"`{value}`" + _binary_size(value, "B")
        if "PIXELS" in name:
            return f"`{value}`" + _binary_size(value, "")
        return f"`{value}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, Path):
        for root, shown in ((SOURCE_DIR, "src"), (REPO_ROOT, "<checkout>")):
            if value.is_relative_to(root):
                return f"`{shown}/{value.relative_to(root).as_posix()}`"
        return f"`{value.as_posix()}`"
    if value == "":
        return "empty"
    return f"`{value}`"


def _cell(text: str) -> str:
    """One table cell: on one line, a `|` outside code spans escaped (inside them it is safe)."""
    parts = " ".join(text.split()).split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def render_table(model: type[BaseModel]) -> str:
    """A Markdown table of the model's documented fields; every one must have a description."""
    fields = documented_fields(model)
    missing = [name for name, field in fields.items() if not (field.description or "").strip()]
    if missing:
        raise UndocumentedSettingsError(
            f"{model.__module__}.{model.__qualname__}: no description for "
            + ", ".join(missing)
            + ' (add Field(description="...") to each)'
        )
    rows = ["| variable | type | default | description |", "|---|---|---|---|"]
    for name, field in fields.items():
        label = type_label(field.annotation, field.metadata)
        description = field.description or ""
        rows.append(
            f"| `{name}` | {_cell(label)} | {_cell(default_label(name, field))} "
            f"| {_cell(description)} |"
        )
    return "\n".join(rows)


def load_class(table: SettingsTable) -> type[BaseModel]:
    """The settings class, imported from this checkout's `src/` (not an installed copy)."""
    if str(SOURCE_DIR) not in sys.path:
        sys.path.insert(0, str(SOURCE_DIR))
    model = getattr(importlib.import_module(table.module), table.class_name)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"{table.module}.{table.class_name} is not a pydantic model")
    return model


def render_settings_tables(tables: Iterable[SettingsTable] | None = None) -> str:
    """Every table (default: `TABLES`), each under its own heading with a stable anchor."""
    sections = []
    for table in TABLES if tables is None else tables:
        model = load_class(table)
        sections.append(
            f"## {table.heading}: `{table.module}.{table.class_name}` {{#{table.anchor}}}\n\n"
            f"{table.intro}\n\n{render_table(model)}\n"
        )
    return "\n".join(sections)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """MkDocs event: fill the marker on the page that holds it; leave other pages alone."""
    if MARKER not in markdown:
        return markdown
    from mkdocs.exceptions import PluginError

    try:
        return markdown.replace(MARKER, render_settings_tables())
    except UndocumentedSettingsError as exc:
        raise PluginError(str(exc)) from None
