"""One home per decision: each default, name, helper and choice is made in one place in `src/`.

The source tree is read as syntax (docstrings and comments do not count), so a second copy of a
decision added later fails here, naming the file.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from digitflow.artifacts import run_layout
from digitflow.inference import limits, preprocess
from digitflow.inference.microbatch import MicroBatcher
from digitflow.settings import CoreSettings, EnvSettings, ModelSettings
from digitflow_fastapi.config import Settings
from digitflow_fastapi.edge.asgi import LeanFastAPI
from digitflow_fastapi.lifecycle.connection_guard import ConnectionLimits
from digitflow_fastapi.lifecycle.handoff import Handoff
from digitflow_fastapi.protocols.decoding import DecodeLimits

SRC = Path(__file__).resolve().parents[2] / "src"
RUN_LAYOUT = Path("digitflow/artifacts/run_layout.py")


def _modules() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(SRC.rglob("*.py")):
        yield path.relative_to(SRC), ast.parse(path.read_text(encoding="utf-8"))


MODULES = dict(_modules())


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the string constants that are docstrings."""
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                found.add(id(value))
    return found


def _code_strings(tree: ast.Module) -> Iterator[tuple[str, int, ast.AST | None]]:
    """Every string literal that is not a docstring: its text, line and parent node."""
    docstrings = _docstrings(tree)
    parents: dict[int, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[id(child)] = node
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or id(node) in docstrings:
            continue
        if isinstance(node.value, str):
            yield node.value, node.lineno, parents.get(id(node))


def _is_command_name(parent: ast.AST | None) -> bool:
    """A Typer command's name (`app.command("artifacts")`), not a folder."""
    return (
        isinstance(parent, ast.Call)
        and isinstance(parent.func, ast.Attribute)
        and parent.func.attr == "command"
    )


# --- defaults ---------------------------------------------------------------------------------


def _default(function: Any, parameter: str) -> Any:
    return inspect.signature(function).parameters[parameter].default


def test_the_image_limits_default_to_the_library_s_own_defaults() -> None:
    settings = Settings()
    assert settings.MAX_IMAGE_PIXELS == limits.DEFAULT_MAX_IMAGE_PIXELS == 20_000_000
    assert settings.MAX_DECODE_PIXELS == limits.DEFAULT_MAX_WORK_PIXELS
    for function in (preprocess.decode_image, preprocess.bytes_to_input):
        assert _default(function, "max_pixels") == settings.MAX_IMAGE_PIXELS
        assert _default(function, "max_work_pixels") == settings.MAX_DECODE_PIXELS
        assert _default(function, "max_segments") == settings.MAX_IMAGE_SEGMENTS
    assert _default(preprocess.bytes_to_input, "max_components") == settings.MAX_DIGIT_COMPONENTS


def test_the_decoder_s_defaults_are_the_settings_defaults() -> None:
    settings = Settings()
    assert _default(DecodeLimits, "inline_bytes") == settings.INLINE_DECODE_MAX_BYTES
    assert _default(DecodeLimits, "max_segments") == settings.MAX_IMAGE_SEGMENTS
    assert _default(DecodeLimits, "max_components") == settings.MAX_DIGIT_COMPONENTS


@pytest.mark.parametrize(
    ("component", "parameters"),
    [
        (
            ConnectionLimits,
            [
                "header_timeout",
                "body_timeout",
                "max_header_bytes",
                "max_header_count",
                "max_connections",
            ],
        ),
        (MicroBatcher, ["max_batch_size"]),
        (LeanFastAPI, ["max_body_bytes", "max_in_flight"]),
    ],
)
def test_components_bounded_by_a_setting_have_no_default_of_their_own(
    component: Any, parameters: list[str]
) -> None:
    for parameter in parameters:
        assert _default(component, parameter) is inspect.Parameter.empty, parameter


# --- settings ---------------------------------------------------------------------------------


def _declared_fields() -> Iterator[tuple[Path, str]]:
    for path, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for statement in node.body:
                    if isinstance(statement, ast.AnnAssign) and isinstance(
                        statement.target, ast.Name
                    ):
                        name = statement.target.id
                        if name.isupper() and not name.startswith("_"):
                            yield path, f"{node.name}.{name}"


def test_web_concurrency_is_declared_in_one_class() -> None:
    declared = [
        f"{path}:{field}" for path, field in _declared_fields() if "WEB_CONCURRENCY" in field
    ]
    assert declared == ["digitflow/settings.py:ModelSettings.WEB_CONCURRENCY"]


def test_no_environment_variable_is_declared_by_two_settings_classes() -> None:
    owners: dict[str, list[str]] = {}
    for cls in (ModelSettings, CoreSettings, Settings, Handoff):
        for name in cls.__annotations__:
            if name.isupper():
                owners.setdefault(name, []).append(cls.__name__)
    assert {name: found for name, found in owners.items() if len(found) > 1} == {}


def test_the_values_the_server_hands_itself_are_not_user_settings() -> None:
    internal = {"DIGITFLOW_SERVED_MODEL", "DIGITFLOW_MODEL_STATE_DIR", "DIGITFLOW_METRICS_DIR"}
    assert set(Handoff.model_fields) == internal
    assert not internal & set(Settings.model_fields)
    assert not internal & set(CoreSettings.model_fields)


@pytest.mark.parametrize("cls", [ModelSettings, CoreSettings, Settings, Handoff])
def test_an_empty_value_is_unset_for_every_field_that_may_be_unset(
    cls: type[EnvSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in cls.model_fields:
        monkeypatch.delenv(name, raising=False)
    nullable = [
        name
        for name, field in cls.model_fields.items()
        if field.default is None  # every field that may be unset defaults to unset
    ]
    assert nullable
    for name in nullable:
        monkeypatch.setenv(name, "")
    settings = cls()
    assert {name: getattr(settings, name) for name in nullable} == dict.fromkeys(nullable)


def test_an_empty_value_of_a_field_that_cannot_be_unset_is_still_an_error() -> None:
    with pytest.raises(ValueError, match="PORT"):
        CoreSettings(PORT="")  # type: ignore[arg-type]


def test_the_empty_is_unset_rule_is_written_once() -> None:
    rules = [
        f"{path}:{node.name}"
        for path, tree in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and "unset" in node.name
    ]
    assert rules == ["digitflow/settings.py:_empty_is_unset"]


# --- helpers ----------------------------------------------------------------------------------


def _functions_named(name: str) -> list[str]:
    return [
        str(path)
        for path, tree in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name == name
    ]


def test_file_sha256_is_defined_once_and_files_are_hashed_nowhere_else() -> None:
    assert _functions_named("file_sha256") == ["digitflow/digests.py"]
    hashing_files = []
    for path, tree in MODULES.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            called = ast.unparse(node.func)
            reads = any(isinstance(a, ast.Call) and "read" in ast.unparse(a) for a in node.args)
            if called == "hashlib.file_digest" or (called.startswith("hashlib.") and reads):
                hashing_files.append(str(path))
    assert hashing_files == ["digitflow/digests.py", "digitflow/digests.py"]


def test_the_run_folder_above_a_path_is_searched_for_in_one_function() -> None:
    searches = [
        f"{path}:{ast.unparse(node)[:60]}"
        for path, tree in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.comprehension)
        and ast.unparse(node.iter).endswith(".parents")
        and path != RUN_LAYOUT
    ]
    assert searches == []
    assert inspect.getsource(run_layout.enclosing_run_dir).count("is_run_id") == 1


# --- artifact names ---------------------------------------------------------------------------

ARTIFACT_NAMES = ("model.pt", "golden.json", "train_model_config.json", "model.onnx", "MLmodel")


def test_artifact_names_are_spelled_only_in_the_run_layout() -> None:
    spelled = []
    for path, tree in MODULES.items():
        if path == RUN_LAYOUT:
            continue
        for text, line, parent in _code_strings(tree):
            named = any(name in text for name in ARTIFACT_NAMES)
            if named or (text == "artifacts" and not _is_command_name(parent)):
                spelled.append(f"{path}:{line}: {text!r}")
    assert spelled == []


def test_the_run_layout_composes_the_seed_s_paths() -> None:
    run = Path("models") / ("a" * 32)
    assert run_layout.model_path(run) == run / "artifacts" / "model" / "model.pt"
    config = run_layout.artifact_path(run, run_layout.CONFIG_ARTIFACT)
    assert config == run / "artifacts" / "train_model_config.json"
    assert run_layout.golden_path(run_layout.model_path(run)).name == "golden.json"


# --- body cap, imports, the served model -----------------------------------------------------


def test_the_body_cap_is_checked_in_one_module() -> None:
    refusing = {
        str(path)
        for path, tree in MODULES.items()
        for text, _, _ in _code_strings(tree)
        if "exceeds" in text
    }
    comparing = {
        str(path)
        for path, tree in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        and {"max_bytes", "max_body_bytes"}
        & {ast.unparse(n) for n in [node.left, *node.comparators]}
    }
    assert refusing == comparing == {"digitflow_fastapi/edge/body_cap.py"}


def _imports(path: Path, tree: ast.Module) -> set[str]:
    """Modules of `src` this one imports anywhere (functions and TYPE_CHECKING blocks too)."""
    names = {str(p.with_suffix("")).replace("/", ".").removesuffix(".__init__") for p in MODULES}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in names else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found & names


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = {
        str(path.with_suffix("")).replace("/", ".").removesuffix(".__init__"): _imports(path, tree)
        for path, tree in MODULES.items()
    }
    circles = []
    for start in graph:
        seen: set[str] = set()
        stack = [m for m in graph[start] if m != start]
        while stack:
            module = stack.pop()
            if module == start:
                circles.append(start)
                break
            if module not in seen:
                seen.add(module)
                stack.extend(graph.get(module, ()))
    assert circles == []


def test_which_model_to_serve_is_decided_by_one_function() -> None:
    deciders = _functions_named("pin_served_model")
    assert deciders == ["digitflow/artifacts/refs.py"]
    callers = sorted(
        str(path)
        for path, tree in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "pin_served_model"
    )
    # digitflow serve (before it becomes the master or driver), the master / uvicorn / Ray
    # driver (through handoff.decided_pin), and a `serve deploy` config naming its own model.
    assert callers == [
        "digitflow/cli/serving.py",
        "digitflow_fastapi/lifecycle/handoff.py",
        "digitflow_fastapi/scale/ray_serve.py",
    ]


def test_no_server_process_rewrites_the_model_settings_in_the_environment() -> None:
    rewriting = sorted(
        f"{path}:{node.lineno}"
        for path, tree in MODULES.items()
        for node in ast.walk(tree)
        if (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) == "os.environ.update"
            and any(k.arg and k.arg.startswith("PRED_MODEL") for k in node.keywords)
        )
        or (
            isinstance(node, ast.Subscript)
            and ast.unparse(node.value) == "os.environ"
            and "PRED_MODEL" in ast.unparse(node.slice)
        )
    )
    # only `digitflow serve` configuring the default model when none is set
    assert [entry.split(":")[0] for entry in rewriting] == ["digitflow/cli/serving.py"]
