"""`digitflow experiments | runs | artifacts | pull` against the real servers of the session.

Most commands run in-process through Typer's runner with an explicit environment; the shell
round-trip (`eval "$(digitflow pull ...)"`) and the crash-safety test run the real console script
as a child process, the latter killing it with SIGKILL mid-download.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner, Result

from digitflow.artifacts.pull import verify_pulled_run
from digitflow.cli.artifacts import Shell, export_lines
from digitflow.cli.main import app
from digitflow.digests import file_sha256
from digitflow.inference.preprocess import bytes_to_input
from digitflow.training.checkpoint import load_model
from tests.support.artifact_stores import (
    ADMIN,
    ADMIN_PASSWORD,
    BUCKET,
    TINY_TRAINING,
    MlflowStack,
    StackRuns,
)
from tests.support.folders import leftovers, visible
from tests.support.processes import free_port

pytestmark = pytest.mark.slow  # starts real servers or trains a model

DIGITFLOW = str(Path(sys.executable).with_name("digitflow"))
CLEARED = {k: None for k in os.environ if k.startswith(("MLFLOW_", "AWS_"))}


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run the CLI in-process with only `env` of MLflow's and AWS's variables set."""
    return CliRunner().invoke(app, list(args), env={**CLEARED, **(env or {})})


def s3_env(stack: MlflowStack) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": stack.plain.url, **stack.s3.env()}


def assert_one_line_error(result: Result, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_export_lines_quote_paths_for_bash_and_powershell() -> None:
    path = Path("/srv/it's models/x/model.pt")
    assert export_lines("ab", path, Shell.bash) == [
        "export PRED_MODEL_UUID=ab",
        """export PRED_MODEL_PATH='/srv/it'"'"'s models/x/model.pt'""",
    ]
    assert export_lines("ab", path, Shell.powershell) == [
        "$Env:PRED_MODEL_UUID = 'ab'",
        "$Env:PRED_MODEL_PATH = '/srv/it''s models/x/model.pt'",
    ]


def test_experiments_lists_each_experiment_with_its_artifact_location(
    mlflow_stack: MlflowStack, stack_runs: StackRuns
) -> None:
    result = invoke("experiments", env=s3_env(mlflow_stack))
    assert result.exit_code == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if " digitflow " in line)
    assert line.split()[-1].startswith(f"s3://{BUCKET}/plain/")


def test_runs_lists_uuid_name_start_status_and_metrics_newest_first(
    mlflow_stack: MlflowStack, stack_runs: StackRuns
) -> None:
    result = invoke("runs", "--experiment", "digitflow", "--tracking-uri", mlflow_stack.proxy.url)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("experiment digitflow") and "mlflow-artifacts:" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    ids = [line.split()[0] for line in lines[2:]]
    assert ids.index(stack_runs.big_run) < ids.index(stack_runs.proxy_run)
    trained = rows[stack_runs.proxy_run]
    assert trained[1] == "proxy-run" and trained[4] == "FINISHED"
    assert 0 < float(trained[5]) <= 1 and float(trained[6]) > 0


def test_artifacts_lists_every_file_recursively_with_its_size_and_full_uri(
    mlflow_stack: MlflowStack, stack_runs: StackRuns
) -> None:
    result = invoke("artifacts", stack_runs.plain_run, env=s3_env(mlflow_stack))
    assert result.exit_code == 0, result.stderr
    listed = {line.split()[-1]: int(line.split()[-2]) for line in result.stdout.splitlines()}
    prefix = next(iter(listed)).split(f"{stack_runs.plain_run}/artifacts/")[0]
    base = f"{prefix}{stack_runs.plain_run}/artifacts"
    assert base.startswith(f"s3://{BUCKET}/plain/")
    assert {f"{base}/model/model.pt", f"{base}/train_model_config.json"} <= set(listed)
    assert listed[f"{base}/model/model.pt"] > 1_000_000
    assert "files," in result.stderr


def test_pull_prints_bash_exports_then_a_second_pull_downloads_nothing(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    run_id = stack_runs.plain_run
    args = ("pull", run_id, "--dest", str(tmp_path), "--no-progress")
    first = invoke(*args, env=s3_env(mlflow_stack))
    model = (tmp_path / run_id / "artifacts" / "model" / "model.pt").absolute()
    assert first.exit_code == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"export PRED_MODEL_UUID={run_id}",
        f"export PRED_MODEL_PATH={model}",
    ]
    assert (tmp_path / run_id / "artifacts" / "train_model_config.json").is_file()
    assert "pulled" in first.stderr
    second = invoke(*args, env=s3_env(mlflow_stack))
    assert second.exit_code == 0 and "nothing downloaded" in second.stderr
    assert second.stdout == first.stdout


def test_pull_prints_powershell_exports_for_a_registry_alias(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    result = invoke(
        "pull",
        "models:/digits@champion",
        "--shell",
        "powershell",
        "--dest",
        str(tmp_path),
        "--no-progress",
        "--tracking-uri",
        mlflow_stack.proxy.url,
    )
    run_id = stack_runs.proxy_run
    model = (tmp_path / run_id / "artifacts" / "model" / "model.pt").absolute()
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"$Env:PRED_MODEL_UUID = '{run_id}'",
        f"$Env:PRED_MODEL_PATH = '{model}'",
    ]


def test_pull_with_basic_auth_credentials_from_the_environment(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    env = {
        "MLFLOW_TRACKING_URI": mlflow_stack.auth.url,
        "MLFLOW_TRACKING_USERNAME": ADMIN,
        "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD,
    }
    result = invoke("pull", f"runs:/{stack_runs.auth_run}/model", "--dest", str(tmp_path), env=env)
    assert result.exit_code == 0, result.stderr
    assert verify_pulled_run(tmp_path / stack_runs.auth_run)


def test_eval_of_the_pull_output_in_bash_points_at_the_pulled_model(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    dest = tmp_path / "my models"
    script = (
        f'eval "$("{DIGITFLOW}" pull {stack_runs.proxy_run} --dest "{dest}" --no-progress)" && '
        'test -s "$PRED_MODEL_PATH" && echo "$PRED_MODEL_UUID"'
    )
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env["MLFLOW_TRACKING_URI"] = mlflow_stack.proxy.url
    done = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == stack_runs.proxy_run


def test_train_then_pull_through_a_plain_s3_server_gives_a_loadable_model(
    mlflow_stack: MlflowStack, data_dir: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(s3_env(mlflow_stack))
    trained = subprocess.run(
        [DIGITFLOW, "train", *TINY_TRAINING, "mlflow_run_name=loop", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert trained.returncode == 0, trained.stderr
    run_id = next(
        line.split()[-1] for line in trained.stdout.splitlines() if line.startswith("run UUID:")
    )
    pulled = invoke(
        "pull", run_id, "--dest", str(tmp_path), "--no-progress", env=s3_env(mlflow_stack)
    )
    assert pulled.exit_code == 0, pulled.stderr
    artifacts = tmp_path / run_id / "artifacts"
    model = load_model(artifacts / "model" / "model.pt")
    golden = json.loads((artifacts / "model" / "golden.json").read_text())["images"]
    batch = np.stack([bytes_to_input(base64.b64decode(g["png_base64"])) for g in golden])
    with torch.inference_mode():
        predicted = model(torch.from_numpy(batch).view(-1, 1, 28, 28)).argmax(dim=1).tolist()
    assert [str(p) for p in predicted] == [g["prediction"] for g in golden]


# --- errors: one line on stderr and a distinct exit code --------------------------------------


def test_errors_are_one_line_with_distinct_exit_codes(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    proxy = {"MLFLOW_TRACKING_URI": mlflow_stack.proxy.url}
    assert_one_line_error(invoke("runs", "-e", "missing-exp", env=proxy), 6, "missing-exp")
    assert_one_line_error(invoke("pull", "0" * 32, "--dest", str(tmp_path), env=proxy), 7)
    assert_one_line_error(
        invoke("pull", stack_runs.no_model_run, "--dest", str(tmp_path), env=proxy),
        8,
        "model/model.pt",
    )
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(
        invoke("pull", stack_runs.proxy_run, "--dest", str(blocker / "models"), env=proxy),
        11,
        "cannot write",
    )


def test_wrong_mlflow_credentials_exit_5(mlflow_stack: MlflowStack, stack_runs: StackRuns) -> None:
    env = {
        "MLFLOW_TRACKING_URI": mlflow_stack.auth.url,
        "MLFLOW_TRACKING_USERNAME": ADMIN,
        "MLFLOW_TRACKING_PASSWORD": "wrong",
    }
    assert_one_line_error(invoke("experiments", env=env), 5, "401", "MLFLOW_TRACKING_PASSWORD")


def test_wrong_s3_keys_exit_9(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    env = {**s3_env(mlflow_stack), "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    result = invoke("pull", stack_runs.plain_run, "--dest", str(tmp_path), env=env)
    assert_one_line_error(result, 9, "AWS_SECRET_ACCESS_KEY")
    assert leftovers(tmp_path) == []


def test_endpoints_that_do_not_answer_exit_with_the_timeout_they_waited(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path, silent_port: int
) -> None:
    silent = f"http://127.0.0.1:{silent_port}"
    env = {**s3_env(mlflow_stack), "AWS_ENDPOINT_URL": silent}
    del env["MLFLOW_S3_ENDPOINT_URL"]
    pulled = invoke(
        "pull", stack_runs.plain_run, "--dest", str(tmp_path), "--timeout", "1", env=env
    )
    assert_one_line_error(pulled, 10, "did not answer within 1 s", silent)
    listed = invoke("experiments", "--tracking-uri", silent, "--timeout", "1.5")
    assert_one_line_error(listed, 4, "within 1.5 s")
    refused = invoke("experiments", "--tracking-uri", f"http://127.0.0.1:{free_port()}")
    assert_one_line_error(refused, 4)


# --- crash safety --------------------------------------------------------------------------------


def start_pull(run_id: str, dest: Path, tracking_uri: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    return subprocess.Popen(
        [DIGITFLOW, "pull", run_id, "--dest", str(dest), "--no-progress", "--workers", "1"],
        env={**env, "MLFLOW_TRACKING_URI": tracking_uri},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def signal_once_writing(
    process: subprocess.Popen[bytes], dest: Path, run_id: str, signum: int = signal.SIGKILL
) -> int:
    """Send `signum` to the pull as soon as a staged file has bytes in it; return its exit code."""
    deadline = time.monotonic() + 60
    sent = False
    while time.monotonic() < deadline and process.poll() is None:
        staged = [p for p in dest.glob(f".{run_id}.partial-*/artifacts/**/*") if p.is_file()]
        if any(p.stat().st_size > 0 for p in staged):
            os.kill(process.pid, signum)
            sent = True
            break
        time.sleep(0.002)
    process.wait(timeout=30)
    assert sent, "the pull ended before the signal could be sent"
    return process.returncode


def kill_once_writing(process: subprocess.Popen[bytes], dest: Path, run_id: str) -> None:
    """SIGKILL the pull as soon as a staged file has bytes in it."""
    assert signal_once_writing(process, dest, run_id) == -signal.SIGKILL


def test_a_pull_killed_mid_way_leaves_no_model_and_the_next_pull_completes(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    run_id = stack_runs.big_run
    kill_once_writing(start_pull(run_id, tmp_path, mlflow_stack.proxy.url), tmp_path, run_id)
    assert not (tmp_path / run_id).exists()
    assert list(tmp_path.glob(f".{run_id}.partial-*"))

    result = invoke(
        "pull", run_id, "--dest", str(tmp_path), "--tracking-uri", mlflow_stack.proxy.url
    )
    assert result.exit_code == 0, result.stderr
    blob = tmp_path / run_id / "artifacts" / "extra" / "blob.bin"
    assert blob.stat().st_size == stack_runs.big_artifact_size
    assert verify_pulled_run(tmp_path / run_id)
    assert visible(tmp_path) == [run_id]
    assert not list(tmp_path.glob(f".{run_id}.partial-*"))  # the killed pull's staging is gone


def test_a_killed_repull_never_touches_the_model_already_in_place(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    run_id = stack_runs.big_run
    uri = mlflow_stack.proxy.url
    assert invoke("pull", run_id, "--dest", str(tmp_path), "--tracking-uri", uri).exit_code == 0
    model = tmp_path / run_id / "artifacts" / "model" / "model.pt"
    digest, inode = file_sha256(model), model.stat().st_ino
    blob = tmp_path / run_id / "artifacts" / "extra" / "blob.bin"
    blob.write_bytes(b"damaged")

    kill_once_writing(start_pull(run_id, tmp_path, uri), tmp_path, run_id)
    assert (file_sha256(model), model.stat().st_ino) == (digest, inode)

    again = invoke("pull", run_id, "--dest", str(tmp_path), "--tracking-uri", uri)
    assert again.exit_code == 0 and "pulled 1 of" in again.stderr
    assert verify_pulled_run(tmp_path / run_id) and file_sha256(model) == digest


def test_pull_refuses_an_unknown_shell_before_touching_any_server(tmp_path: Path) -> None:
    result = invoke("pull", "a" * 32, "--shell", "fish", "--dest", str(tmp_path))
    assert result.exit_code == 2 and "fish" in result.stderr
    assert leftovers(tmp_path) == []


def test_ctrl_c_during_a_pull_exits_130_and_cleans_up_its_staging_folder(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    run_id = stack_runs.big_run
    process = start_pull(run_id, tmp_path, mlflow_stack.proxy.url)
    assert signal_once_writing(process, tmp_path, run_id, signal.SIGINT) == 130
    assert leftovers(tmp_path) == []


def test_a_proxy_whose_s3_refuses_it_gives_one_line_and_leaves_nothing(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    # A second artifact proxy on the same tracking store, with a wrong S3 secret: the run is
    # found, but every download through the proxy fails on the S3 side.
    from tests.support.mlflow_server import launch_mlflow_server
    from tests.support.processes import running

    workdir = tmp_path / "broken-proxy"
    workdir.mkdir()
    (workdir / "mlflow.db").symlink_to(mlflow_stack.proxy.log_path.parent / "mlflow.db")
    broken = launch_mlflow_server(
        workdir,
        ["--artifacts-destination", f"s3://{BUCKET}/proxied", "--serve-artifacts"],
        env={**mlflow_stack.s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret"},
    )
    with running(broken, "/health", timeout=180):
        result = invoke(
            "pull",
            stack_runs.proxy_run,
            "--dest",
            str(tmp_path / "models"),
            env={"MLFLOW_TRACKING_URI": broken.url},
        )
    # Blamed on the server's storage, not on the (absent) client credentials.
    assert_one_line_error(result, 9, "artifact store refused the server", "HTTP 401")
    assert not list((tmp_path / "models").rglob("model.pt"))
