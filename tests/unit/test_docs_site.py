"""The docs site: it builds strictly, its configuration page lists every setting, its paths exist.

The site is built once per module with `mkdocs build --strict` in a child process, the way
`make docs` builds it, into a temporary folder.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from digitflow.settings import CoreSettings
from digitflow_fastapi.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS_DIR = REPO_ROOT / "docs"
HOOK_PATH = DOCS_DIR / "hooks" / "settings_page.py"
# Dotted names in the docs that are not modules: a logger's name and an MLflow tag.
# Run tags named like modules.
NOT_MODULES = {
    "digitflow_fastapi.access",
    "digitflow.config_digest",
    "digitflow.onnx_sha256",
    "digitflow.int8",
}


class UndocumentedSettings(BaseSettings):
    """A settings class with a field the page could not describe."""

    DOCUMENTED: int = Field(default=1, description="Has one.")
    UNDOCUMENTED: int = 2


class SettingsWithInternalField(BaseSettings):
    """Internal fields need no description and are left off the page."""

    PUBLIC: bool = Field(default=False, description="Shown.")
    HANDED_BETWEEN_PROCESSES: str = Field(default="", json_schema_extra={"internal": True})


def load_hook() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("settings_page_hook", HOOK_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def is_internal(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and extra.get("internal") is True


def listed_fields(model: type[BaseModel]) -> set[str]:
    return {name for name, field in model.model_fields.items() if not is_internal(field)}


def nav_pages(nav: list[object]) -> list[str]:
    pages: list[str] = []
    for item in nav:
        if isinstance(item, str):
            pages.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                pages.extend(nav_pages(value) if isinstance(value, list) else [value])
    return pages


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO_ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return site


def test_the_site_builds_strictly_with_every_nav_page(built_site: Path) -> None:
    config = yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text())
    pages = nav_pages(config["nav"])
    assert len(pages) >= 12
    for page in pages:
        assert (DOCS_DIR / page).is_file(), page
        built = "index.html" if page == "index.md" else f"{page.removesuffix('.md')}/index.html"
        assert (built_site / built).is_file(), built
    on_disk = {path.name for path in DOCS_DIR.glob("*.md")}
    assert on_disk == set(pages), "every page under docs/ is in the nav, and only those"


def test_the_configuration_page_lists_every_setting_in_its_class_table(built_site: Path) -> None:
    html = (built_site / "configuration" / "index.html").read_text()
    server_part = html.split('id="server-settings"', 1)[1].split('id="core-settings"', 1)[0]
    core_part = html.split('id="core-settings"', 1)[1]
    row_name = re.compile(r"<tr>\s*<td><code>(\w+)</code></td>")
    assert set(row_name.findall(server_part)) == listed_fields(Settings)
    assert set(row_name.findall(core_part)) == listed_fields(CoreSettings)
    assert "MAX_UPLOAD_BYTES" in listed_fields(Settings)
    assert "MLFLOW_TRACKING_URI" in listed_fields(CoreSettings)


def test_the_benchmarks_page_includes_the_benchmarks_readme(built_site: Path) -> None:
    html = (built_site / "benchmarks" / "index.html").read_text()
    assert "In-process, 1 thread" in html
    assert "benchmarks/wrk_mnist.lua" in html


def test_a_setting_without_a_description_is_refused() -> None:
    hook = load_hook()
    with pytest.raises(hook.UndocumentedSettingsError, match="UNDOCUMENTED"):
        hook.render_table(UndocumentedSettings)


def test_the_hook_fails_the_build_on_an_undocumented_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mkdocs.exceptions import PluginError

    hook = load_hook()
    table = hook.SettingsTable(__name__, "UndocumentedSettings", "Test", "test", "A test.")
    monkeypatch.setattr(hook, "TABLES", (table,))
    assert hook.on_page_markdown("no marker here") == "no marker here"
    with pytest.raises(PluginError, match="UNDOCUMENTED"):
        hook.on_page_markdown(f"# Configuration\n\n{hook.MARKER}\n")


def test_internal_settings_are_left_off_the_page() -> None:
    table = load_hook().render_table(SettingsWithInternalField)
    assert "`PUBLIC`" in table
    assert "HANDED_BETWEEN_PROCESSES" not in table


def test_types_and_defaults_read_as_written_in_the_environment() -> None:
    hook = load_hook()
    fields = Settings.model_fields
    upload = fields["MAX_UPLOAD_BYTES"]
    assert hook.type_label(upload.annotation, upload.metadata) == "int > 0"
    assert hook.default_label("MAX_UPLOAD_BYTES", upload) == "`10485760` (10 MiB)"
    assert hook.default_label("REUSE_PORT", fields["REUSE_PORT"]) == "`true`"
    assert hook.default_label("RAY_ADDRESS", fields["RAY_ADDRESS"]) == "unset"
    backends = hook.type_label(fields["INFERENCE_BACKEND"].annotation)
    assert backends == "one of `onnx`, `onnx-int8`, `torch`"


def cited_paths(text: str) -> set[str]:
    roots = "src|tests|benchmarks|deploy|conf|docs"
    pattern = re.compile(rf"(?<![\w/.<-])(?:{roots})/[\w./-]*")
    return {match.rstrip(".") for match in pattern.findall(text)}


def cited_modules(text: str) -> set[str]:
    pattern = re.compile(r"(?<![\w/.-])digitflow(?:_fastapi)?(?:\.\w+)+")
    return set(pattern.findall(text)) - NOT_MODULES


def top_level_names(module_file: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(module_file.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):
            names |= {alias.asname or alias.name for alias in node.names}
    return names


def module_file(dotted: str) -> tuple[Path | None, list[str]]:
    """The longest prefix of `dotted` that is a module under src/, and the names after it."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        base = REPO_ROOT / "src" / Path(*parts[:end])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate, parts[end:]
    return None, parts


def docs_texts() -> dict[str, str]:
    texts = {path.name: path.read_text() for path in DOCS_DIR.glob("*.md")}
    texts["README.md"] = (REPO_ROOT / "README.md").read_text()
    return texts


def test_every_path_the_docs_cite_exists() -> None:
    missing = [
        f"{name}: {path}"
        for name, text in docs_texts().items()
        for path in sorted(cited_paths(text))
        if not (REPO_ROOT / path).exists()
    ]
    assert not missing


def test_every_module_the_docs_name_exists() -> None:
    problems = []
    for name, text in docs_texts().items():
        for dotted in sorted(cited_modules(text)):
            path, rest = module_file(dotted)
            if path is None or (rest and rest[0] not in top_level_names(path)):
                problems.append(f"{name}: {dotted}")
    assert not problems
