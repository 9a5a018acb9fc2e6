"""The layering of the house, read from the source: which part may import which.

Imports are read with `ast` from every module under `src/`. Module-level imports (outside
`if TYPE_CHECKING:`) make the import graph whose cycles are checked; every import, local ones
inside functions included, counts for the part rules.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
HEAVY = ("torch", "mlflow", "boto3", "onnxruntime", "cv2", "pandas", "fastapi")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / package).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(path: Path, *, module_level_only: bool) -> Iterator[str]:
    """Every module `path` imports (`from a import b`: `a.b` if that is a module, else `a`)."""
    known = {**modules("digitflow"), **modules("digitflow_fastapi")}

    def visit(nodes: list[ast.stmt]) -> Iterator[str]:
        for node in nodes:
            if isinstance(node, ast.Import):
                yield from (alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    yield full if full in known else node.module
            elif isinstance(node, ast.If) and _is_type_checking(node):
                continue
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not module_level_only:
                    yield from visit(node.body)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, block, []):
                        inner = child.body if isinstance(child, ast.ExceptHandler) else [child]
                        yield from visit(inner)

    yield from visit(ast.parse(path.read_text(encoding="utf-8")).body)


def offenders(package: str, forbidden: str) -> list[str]:
    return [
        f"{name} imports {target}"
        for name, path in modules(package).items()
        for target in imported(path, module_level_only=False)
        if target == forbidden or target.startswith(forbidden + ".")
    ]


def test_the_pipeline_never_imports_the_server() -> None:
    assert offenders("digitflow", "digitflow_fastapi") == []


@pytest.mark.parametrize("part", ["protocols", "edge"])
def test_protocols_and_the_edge_never_import_lifecycle_internals(part: str) -> None:
    assert offenders(f"digitflow_fastapi/{part}", "digitflow_fastapi.lifecycle") == []


def test_no_module_imports_itself_back_through_a_circle() -> None:
    graph = {
        name: {t for t in imported(path, module_level_only=True) if t.startswith("digitflow")}
        for package in ("digitflow", "digitflow_fastapi")
        for name, path in modules(package).items()
    }
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                circles.append([*trail[trail.index(target) :], target])
            elif target in graph and target not in state:
                walk(target, [*trail, target])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            walk(start, [start])
    assert circles == []


def test_the_graph_reader_sees_imports_inside_functions_and_skips_type_checking(
    tmp_path: Path,
) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\nimport json\n"
        "if TYPE_CHECKING:\n    import torch\n"
        "def f():\n    import mlflow\n"
    )
    assert set(imported(module, module_level_only=True)) == {"typing", "json"}
    assert set(imported(module, module_level_only=False)) == {"typing", "json", "mlflow"}


HELP_PROBE = """
import json, sys
from digitflow.cli.main import app
import typer.main
command = typer.main.get_command(app)
try:
    command.main(args=sys.argv[1:], prog_name="digitflow", standalone_mode=False)
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)))
"""


def _commands() -> list[str]:
    from digitflow.cli.main import app

    return sorted(c.name for c in app.registered_commands if c.name)


@pytest.mark.parametrize("args", [["--help"], *[[c, "--help"] for c in _commands()]])
def test_help_imports_neither_torch_nor_mlflow_nor_boto3(args: list[str]) -> None:
    probe = HELP_PROBE.format(heavy=repr(HEAVY))
    done = subprocess.run(
        [sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


# What only the `train` extra installs: the slim image has none of it (see pyproject.toml).
TRAIN_ONLY = ("torch", "onnx", "mlxtend", "sqlalchemy", "alembic", "pandas", "sklearn", "scipy")
# Where the slim image's processes start: the server (master and workers), the CLI, the pull.
SLIM_ENTRY_POINTS = (
    "digitflow_fastapi.main",
    "digitflow_fastapi.lifecycle.gunicorn_conf",
    "digitflow.cli.main",
    "digitflow.artifacts.pull",
)


def module_level_closure(start: str) -> set[str]:
    """Every module importing `start` imports at module level, transitively (ours followed)."""
    known = {**modules("digitflow"), **modules("digitflow_fastapi")}
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in known:
            todo.extend(imported(known[name], module_level_only=True))
            parent = name.rpartition(".")[0]
            todo.extend([parent] if parent else [])  # a package's __init__ runs first
    return seen


@pytest.mark.parametrize("start", SLIM_ENTRY_POINTS)
def test_what_the_slim_image_starts_imports_nothing_of_the_train_extra(start: str) -> None:
    closure = module_level_closure(start)
    assert start in closure
    assert sorted(m for m in closure if m.partition(".")[0] in TRAIN_ONLY) == []


def test_the_closure_follows_our_modules_to_the_libraries_they_import() -> None:
    closure = module_level_closure("digitflow.training.default_model")
    assert {"digitflow.training.run", "torch", "mlflow"} <= closure


# What the gunicorn master imports: its config module (which reads the settings) and the modules
# its master-side hooks (`on_starting`, the model swap on SIGHUP) import.
MASTER_MODULES = (
    "digitflow_fastapi.lifecycle.gunicorn_conf",
    "digitflow_fastapi.config",
    "digitflow_fastapi.lifecycle.handoff",
    "digitflow_fastapi.lifecycle.model_keeper",
    "digitflow_fastapi.lifecycle.model_state",
    "digitflow.artifacts.refs",
)
# Libraries only a worker needs. The master's heap is copied into every worker it forks and
# counts in each one's RSS; measured with 2 workers, importing numpy, OpenCV, Pillow and FastAPI
# in the master made it 80 MiB instead of 42, and the three processes 10 MiB more in all.
WORKER_LIBRARIES = ("numpy", "cv2", "PIL", "onnxruntime", "fastapi", "starlette", "yaml", "mlflow")

MASTER_PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in {libraries} if m in sys.modules)))
"""


def test_the_gunicorn_master_imports_none_of_the_worker_s_libraries() -> None:
    probe = MASTER_PROBE.format(libraries=repr(WORKER_LIBRARIES))
    done = subprocess.run(
        [sys.executable, "-c", probe, *MASTER_MODULES], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
