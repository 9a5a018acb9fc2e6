"""The Dockerfile and its build inputs, checked without building (test_container.py builds)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = REPO_ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_base_image_defaults_to_python_311_slim() -> None:
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", DOCKERFILE.read_text(), re.M)


def test_every_pip_install_in_the_image_uses_only_the_wheelhouse() -> None:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    installs = re.findall(r"pip install[^\n]*", text)
    assert installs
    assert all("--no-index" in line and "/wheelhouse/" in line for line in installs)


def test_the_final_stage_runs_as_a_numeric_non_root_user() -> None:
    final_stage = DOCKERFILE.read_text().split("\nFROM ")[-1]
    users = re.findall(r"^USER (\d+)(?::(\d+))?$", final_stage, re.M)
    assert users and all(int(uid) != 0 for uid, _ in users)


def wheelhouses_the_makefile_builds_from() -> dict[str, str]:
    """`make -n image image-full`: the WHEELHOUSE each image's `docker build` is given."""
    dry_run = subprocess.run(
        ["make", "-n", "-C", str(REPO_ROOT), "image", "image-full", "IMAGE=s", "IMAGE_FULL=f"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    builds = re.findall(r"--build-arg WHEELHOUSE=(\S+) --tag (\S+)", dry_run)
    return {tag: folder for folder, tag in builds}


def test_make_image_builds_the_slim_wheelhouse_and_image_full_the_full_one() -> None:
    wheelhouses = wheelhouses_the_makefile_builds_from()
    assert wheelhouses == {"s": "build/wheelhouse/slim", "f": "build/wheelhouse/full"}
    default = re.findall(r"^ARG WHEELHOUSE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert default and set(default) == {wheelhouses["s"]}  # every stage's default: the slim one


def test_the_build_context_is_only_the_wheelhouse_and_the_container_files() -> None:
    rules = [
        line
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert rules[0] == "*"
    sources = re.findall(r"^COPY (?!--from)(\S+)", DOCKERFILE.read_text(), re.M)
    allowed = [rule.lstrip("!").split("*")[0] for rule in rules[1:]]
    for wheelhouse in wheelhouses_the_makefile_builds_from().values():
        for source in (s.replace("${WHEELHOUSE}", wheelhouse) for s in sources):
            assert any(a.startswith(source) or source.startswith(a) for a in allowed), source


def test_the_entrypoint_refuses_to_serve_without_a_model() -> None:
    entrypoint = REPO_ROOT / "deploy" / "docker" / "entrypoint.sh"
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        ["sh", str(entrypoint)], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 64
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "no model configured" in result.stderr


def _image_logging_config() -> Path:
    """The file LOGGER_CONFIG_PATH names in the image (copied in), or the packaged default."""
    final_stage = DOCKERFILE.read_text().replace("\\\n", " ").split("\nFROM ")[-1]
    setting = re.search(r"\bLOGGER_CONFIG_PATH=(\S+)", final_stage)
    if setting is None:
        from digitflow import paths

        shipped = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
        package_data = shipped["tool"]["setuptools"]["package-data"]["digitflow"]
        assert "conf/*.yaml" in package_data  # the wheel the image installs carries it
        return paths.DEFAULT_LOGGING_CONFIG
    copies = dict(
        (target, source)
        for source, target in re.findall(r"^COPY (?!--from)(\S+) (\S+)$", final_stage, re.M)
    )
    assert setting.group(1) in copies, "LOGGER_CONFIG_PATH names a file the image does not copy"
    return REPO_ROOT / copies[setting.group(1)]


def test_the_image_logs_with_the_request_id_filter_on_every_handler() -> None:
    config = yaml.safe_load(_image_logging_config().read_text())
    request_id_filters = {
        name
        for name, spec in config.get("filters", {}).items()
        if spec.get("()") == "digitflow.logging_setup.RequestIdFilter"
    }
    handlers = config["handlers"]
    assert handlers and request_id_filters
    for name, handler in handlers.items():
        assert request_id_filters & set(handler.get("filters", [])), name
