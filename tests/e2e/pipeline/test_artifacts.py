"""The artifacts library against real servers: SeaweedFS (S3) and three `mlflow server` processes.

Servers start once per session (tests/support/artifact_stores.py); each test pulls into its own
temporary models folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from digitflow.artifacts.pull import (
    RETRY_BACKOFF,
    _sync_run,
    list_run_artifacts,
    pull_run_artifacts,
    verify_pulled_run,
)
from digitflow.artifacts.refs import ModelReference, parse_reference, resolve_model
from digitflow.artifacts.run_layout import MANIFEST_NAME, is_run_id
from digitflow.artifacts.sources import RemoteFile
from digitflow.artifacts.tracking import embedded_target, list_experiments, list_runs
from digitflow.errors import (
    ArtifactIntegrityError,
    ArtifactNotFound,
    DestinationNotWritable,
    ExperimentNotFound,
    ModelNotFound,
    RegisteredModelNotFound,
    RunNotFound,
    StorageAuthError,
    StorageUnavailable,
    TrackingAuthError,
    TrackingUnavailable,
)
from digitflow.settings import CoreSettings, StoreConfig
from digitflow.training.config import load_train_config
from digitflow.training.run import run_training
from tests.support.artifact_stores import (
    ADMIN,
    ADMIN_PASSWORD,
    BUCKET,
    OUTSIDER,
    OUTSIDER_PASSWORD,
    TINY_TRAINING,
    MlflowStack,
    StackRuns,
)
from tests.support.fake_sources import FlakySource, fake_files
from tests.support.folders import leftovers, visible
from tests.support.processes import free_port

pytestmark = pytest.mark.slow  # starts real servers or trains a model

SEED_FILES = {"model/model.pt", "model/golden.json", "train_model_config.json"}
MLFLOW_MODEL_FILES = {"model/model.onnx", "model/MLmodel"}


def proxy_store(stack: MlflowStack, **extra: Any) -> StoreConfig:
    return StoreConfig(tracking_uri=stack.proxy.url, timeout=5.0, **extra)


def plain_store(stack: MlflowStack, **extra: Any) -> StoreConfig:
    values: dict[str, Any] = {
        "tracking_uri": stack.plain.url,
        "s3_endpoint_url": stack.s3.endpoint_url,
        "aws_access_key_id": stack.s3.access_key,
        "aws_secret_access_key": stack.s3.secret_key,
        "timeout": 5.0,
    }
    values.update(extra)
    return StoreConfig(**values)


def auth_store(stack: MlflowStack, password: str | None = ADMIN_PASSWORD) -> StoreConfig:
    return StoreConfig(
        tracking_uri=stack.auth.url,
        username=ADMIN if password else None,
        password=password,
        timeout=5.0,
    )


def s3_objects(stack: MlflowStack, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix` in the test bucket, read with boto3 directly."""
    client: Any = stack.s3.client()
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {
        o["Key"][len(prefix) :]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
        for o in listed
    }


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- pure functions --------------------------------------------------------------------------


def test_store_config_reads_mlflow_and_aws_variables_and_prefers_the_mlflow_s3_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_TRACKING_USERNAME": "ann",
        "MLFLOW_TRACKING_PASSWORD": "pw",
        "MLFLOW_S3_ENDPOINT_URL": "https://ecs.example",
        "AWS_ENDPOINT_URL": "https://other.example",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }.items():
        monkeypatch.setenv(name, value)
    store = CoreSettings().store()
    assert store.s3_region == "eu-west-1"
    assert (store.tracking_uri, store.username, store.password) == (
        "http://mlflow:5000",
        "ann",
        "pw",
    )
    assert store.s3_endpoint_url == "https://ecs.example"
    assert (store.aws_access_key_id, store.aws_secret_access_key) == ("key", "secret")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.setenv(name, "")
    fallback = CoreSettings().store()
    assert fallback.s3_endpoint_url == "https://other.example" and fallback.tracking_uri is None


def test_references_are_classified_as_run_registered_model_or_local_path() -> None:
    uuid = "0123456789abcdef0123456789abcdef"
    assert parse_reference(uuid) == ModelReference("run", uuid)
    assert parse_reference(f"runs:/{uuid}/model") == ModelReference("run", uuid)
    assert parse_reference("models:/digits/3") == ModelReference("model", "digits", version="3")
    assert parse_reference("models:/digits@champion") == ModelReference(
        "model", "digits", alias="champion"
    )
    assert parse_reference("models/x/model.pt") == ModelReference("path", "models/x/model.pt")


def test_a_run_id_with_a_trailing_newline_is_not_a_run_id() -> None:
    uuid = "0123456789abcdef0123456789abcdef"
    assert is_run_id(uuid)
    assert not is_run_id(uuid + "\n")
    assert not is_run_id(uuid.upper())


# --- listing -----------------------------------------------------------------------------------


def test_experiments_show_the_artifact_location_of_proxy_and_plain_s3_servers(
    mlflow_stack: MlflowStack, stack_runs: StackRuns
) -> None:
    proxied = {e.name: e for e in list_experiments(proxy_store(mlflow_stack))}
    plain = {e.name: e for e in list_experiments(plain_store(mlflow_stack))}
    assert proxied["digitflow"].artifact_location.startswith("mlflow-artifacts:")
    assert plain["digitflow"].artifact_location.startswith(f"s3://{BUCKET}/plain")


def test_runs_are_listed_newest_first_with_their_test_metrics(
    mlflow_stack: MlflowStack, stack_runs: StackRuns
) -> None:
    experiment, runs = list_runs(proxy_store(mlflow_stack), "digitflow")
    ids = [r.run_id for r in runs]
    assert experiment.name == "digitflow"
    assert ids.index(stack_runs.big_run) < ids.index(stack_runs.proxy_run)
    starts = [r.start_time for r in runs]
    assert starts == sorted(starts, reverse=True)  # type: ignore[type-var]
    trained = next(r for r in runs if r.run_id == stack_runs.proxy_run)
    assert trained.status == "FINISHED" and trained.run_name == "proxy-run"
    assert trained.test_accuracy is not None and 0.0 < trained.test_accuracy <= 1.0
    assert trained.test_loss is not None and trained.test_loss > 0


def test_artifact_listing_through_the_proxy_matches_the_objects_in_s3(
    mlflow_stack: MlflowStack, stack_runs: StackRuns
) -> None:
    listing = list_run_artifacts(stack_runs.proxy_run, proxy_store(mlflow_stack))
    objects = s3_objects(mlflow_stack, "proxied/")
    in_s3 = {
        key.split(f"{stack_runs.proxy_run}/artifacts/", 1)[1]: len(body)
        for key, body in objects.items()
        if f"/{stack_runs.proxy_run}/artifacts/" in f"/{key}"
    }
    assert {f.path: f.size for f in listing.files} == in_s3
    assert set(in_s3) >= SEED_FILES


def test_artifact_listing_straight_from_s3_has_sizes_md5_etags_and_dates(
    mlflow_stack: MlflowStack, stack_runs: StackRuns
) -> None:
    listing = list_run_artifacts(stack_runs.plain_run, plain_store(mlflow_stack))
    assert listing.artifact_uri.startswith(f"s3://{BUCKET}/plain/")
    by_path = {f.path: f for f in listing.files}
    assert set(by_path) >= SEED_FILES
    config = by_path["train_model_config.json"]
    body = s3_objects(mlflow_stack, listing.artifact_uri.split(f"{BUCKET}/", 1)[1] + "/")
    assert config.size == len(body["train_model_config.json"])
    assert config.md5 == hashlib.md5(body["train_model_config.json"]).hexdigest()
    assert config.modified is not None


# --- pulling ----------------------------------------------------------------------------------


def test_pull_through_the_artifact_proxy_lands_in_the_run_layout_byte_for_byte(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    run_id = stack_runs.proxy_run
    result = pull_run_artifacts(run_id, tmp_path / "models", proxy_store(mlflow_stack))
    artifacts = tmp_path / "models" / run_id / "artifacts"
    assert result.model_path == artifacts / "model" / "model.pt"
    assert result.config_path == artifacts / "train_model_config.json"
    objects = s3_objects(mlflow_stack, "proxied/")
    expected = {
        key.split("/artifacts/", 1)[1]: body
        for key, body in objects.items()
        if f"{run_id}/artifacts/" in key
    }
    assert tree(artifacts) == expected
    assert result.downloaded_files == len(expected) and verify_pulled_run(result.run_dir)
    assert result.run_dir.stat().st_mode & 0o755 == 0o755
    assert visible(tmp_path / "models") == [run_id]


def test_pull_straight_from_s3_with_the_endpoint_and_keys(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    result = pull_run_artifacts(stack_runs.plain_run, tmp_path, plain_store(mlflow_stack))
    manifest = json.loads((result.run_dir / MANIFEST_NAME).read_text())
    assert {e["path"] for e in manifest["files"]} >= SEED_FILES | MLFLOW_MODEL_FILES
    config = next(e for e in manifest["files"] if e["path"] == "train_model_config.json")
    assert config["md5"] == hashlib.md5(result.config_path.read_bytes()).hexdigest()
    assert json.loads(result.config_path.read_text())["epochs"] == 1


def test_pull_from_a_basic_auth_server_with_the_right_credentials(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    result = pull_run_artifacts(stack_runs.auth_run, tmp_path, auth_store(mlflow_stack))
    assert result.model_path.stat().st_size > 1_000_000 and verify_pulled_run(result.run_dir)


def test_a_second_pull_of_a_complete_run_downloads_nothing_and_keeps_the_files(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    store = plain_store(mlflow_stack)
    first = pull_run_artifacts(stack_runs.plain_run, tmp_path, store)
    inode = first.model_path.stat().st_ino
    second = pull_run_artifacts(stack_runs.plain_run, tmp_path, store)
    assert first.downloaded_files == first.files > 0
    assert (second.downloaded_files, second.downloaded_bytes) == (0, 0)
    assert second.model_path.stat().st_ino == inode


def test_a_corrupted_local_file_is_downloaded_again_and_only_that_file(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    store = proxy_store(mlflow_stack)
    first = pull_run_artifacts(stack_runs.proxy_run, tmp_path, store)
    golden = first.run_dir / "artifacts" / "model" / "golden.json"
    original = golden.read_bytes()
    golden.write_bytes(original[:-1] + b"X")
    assert not verify_pulled_run(first.run_dir)
    again = pull_run_artifacts(stack_runs.proxy_run, tmp_path, store)
    assert again.downloaded_files == 1 and golden.read_bytes() == original
    assert verify_pulled_run(again.run_dir)


def test_resolve_model_accepts_uuid_runs_uri_registry_version_alias_and_a_local_path(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    store = proxy_store(mlflow_stack)
    run_id = stack_runs.proxy_run
    expected = (tmp_path / run_id / "artifacts" / "model" / "model.pt").absolute()
    for reference in (
        run_id,
        f"runs:/{run_id}/model",
        "models:/digits/1",
        "models:/digits@champion",
    ):
        resolved = resolve_model(reference, tmp_path, store)
        assert (resolved.run_id, resolved.model_path) == (run_id, expected), reference
    local = resolve_model(str(expected), tmp_path / "unused", StoreConfig())
    assert (local.run_id, local.model_path) == (run_id, expected)
    assert resolve_model(str(tmp_path / run_id), tmp_path, store).model_path == expected
    expected.write_bytes(expected.read_bytes()[:-10])
    with pytest.raises(ArtifactIntegrityError):
        resolve_model(str(expected), tmp_path / "unused", StoreConfig())


def test_resolve_model_uses_a_verified_cache_without_contacting_any_server(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    pull_run_artifacts(stack_runs.proxy_run, tmp_path, proxy_store(mlflow_stack))
    offline = StoreConfig(tracking_uri=f"http://127.0.0.1:{free_port()}", timeout=1.0)
    resolved = resolve_model(stack_runs.proxy_run, tmp_path, offline)
    assert resolved.model_path.is_file()
    resolved.model_path.write_bytes(b"truncated")
    with pytest.raises(TrackingUnavailable):
        resolve_model(stack_runs.proxy_run, tmp_path, offline)


def test_an_unknown_registered_model_or_alias_is_reported(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    for reference in ("models:/digits/99", "models:/digits@nobody", "models:/nothing/1"):
        with pytest.raises(RegisteredModelNotFound):
            resolve_model(reference, tmp_path, proxy_store(mlflow_stack))


def test_a_missing_local_model_path_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        resolve_model(str(tmp_path / "nope" / "model.pt"), tmp_path, StoreConfig())


def test_the_embedded_store_lists_runs_and_pulls_from_its_local_folder(
    data_dir: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    mlruns = tmp_path_factory.mktemp("embedded") / "mlruns"
    config = load_train_config(None, [*TINY_TRAINING, "mlflow_run_name=embedded"])
    run_id = run_training(config, data_dir, embedded_target(mlruns), progress=False).run_id
    store = StoreConfig(mlruns_dir=mlruns)
    experiment, runs = list_runs(store)
    assert experiment.artifact_location.startswith("file://")
    assert [r.run_id for r in runs] == [run_id]
    result = pull_run_artifacts(run_id, tmp_path, store)
    assert tree(result.run_dir / "artifacts") == tree(mlruns / "artifacts" / run_id / "artifacts")
    assert resolve_model(f"runs:/{run_id}/model", tmp_path, store).model_path == result.model_path


# --- errors ------------------------------------------------------------------------------------


def test_unknown_experiment_and_unknown_run_are_reported(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    with pytest.raises(ExperimentNotFound, match="no-such-experiment"):
        list_runs(proxy_store(mlflow_stack), "no-such-experiment")
    with pytest.raises(RunNotFound, match="f" * 32):
        pull_run_artifacts("f" * 32, tmp_path, proxy_store(mlflow_stack))
    with pytest.raises(RunNotFound):
        pull_run_artifacts("not-a-run", tmp_path, proxy_store(mlflow_stack))


def test_a_run_without_model_pt_is_reported_and_nothing_is_written(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    with pytest.raises(ArtifactNotFound, match=r"model/model\.pt"):
        pull_run_artifacts(stack_runs.no_model_run, tmp_path, proxy_store(mlflow_stack))
    assert leftovers(tmp_path) == []


def test_wrong_or_missing_mlflow_credentials_are_refused(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    with pytest.raises(TrackingAuthError, match="401"):
        pull_run_artifacts(stack_runs.auth_run, tmp_path, auth_store(mlflow_stack, "wrong"))
    with pytest.raises(TrackingAuthError, match="missing"):
        list_experiments(auth_store(mlflow_stack, None))


def test_a_user_without_permission_on_the_experiment_gets_403(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    store = StoreConfig(
        tracking_uri=mlflow_stack.auth.url,
        username=OUTSIDER,
        password=OUTSIDER_PASSWORD,
        timeout=5.0,
    )
    with pytest.raises(TrackingAuthError, match=r"PERMISSION_DENIED|403"):
        pull_run_artifacts(stack_runs.auth_run, tmp_path, store)
    assert leftovers(tmp_path) == []


def test_wrong_s3_keys_are_refused(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    store = plain_store(mlflow_stack, aws_secret_access_key="not-the-secret")
    with pytest.raises(StorageAuthError, match="refused the access keys"):
        pull_run_artifacts(stack_runs.plain_run, tmp_path, store)
    unknown = plain_store(mlflow_stack, aws_access_key_id="nobody")
    with pytest.raises(StorageAuthError):
        list_run_artifacts(stack_runs.plain_run, unknown)


def test_an_s3_endpoint_that_never_answers_fails_fast_naming_the_timeout(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path, silent_port: int
) -> None:
    store = plain_store(
        mlflow_stack, s3_endpoint_url=f"http://127.0.0.1:{silent_port}", timeout=1.0
    )
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"did not answer within 1 s"):
        pull_run_artifacts(stack_runs.plain_run, tmp_path, store)
    assert time.monotonic() - started < 15


def test_a_tracking_server_that_never_answers_or_is_down_is_reported(
    tmp_path: Path, silent_port: int
) -> None:
    silent = StoreConfig(tracking_uri=f"http://127.0.0.1:{silent_port}", timeout=1.0)
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=r"within 1 s"):
        list_experiments(silent)
    assert time.monotonic() - started < 5
    down = StoreConfig(tracking_uri=f"http://127.0.0.1:{free_port()}", timeout=1.0)
    with pytest.raises(TrackingUnavailable):
        pull_run_artifacts("a" * 32, tmp_path, down)


def test_a_destination_that_cannot_be_written_is_reported(
    mlflow_stack: MlflowStack, stack_runs: StackRuns, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DestinationNotWritable, match="a-file"):
        pull_run_artifacts(stack_runs.proxy_run, blocker / "models", proxy_store(mlflow_stack))


# --- retries, integrity and parallelism, with an in-memory source -----------------------------


def test_transient_download_errors_are_retried_with_backoff(tmp_path: Path) -> None:
    source = FlakySource(fake_files(), failures=2)
    files = source.list_files()
    started = time.monotonic()
    result = _sync_run("b" * 32, files, source, tmp_path, workers=len(files), progress=False)
    assert time.monotonic() - started >= RETRY_BACKOFF * 3  # waited 0.5 s, then 1 s
    assert all(count == 3 for count in source.calls.values())
    assert tree(result.run_dir / "artifacts") == source.files


def test_a_file_that_keeps_arriving_short_fails_the_pull_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("digitflow.artifacts.pull.RETRY_BACKOFF", 0.01)
    source = FlakySource(fake_files(), short=True)
    with pytest.raises(StorageUnavailable):
        _sync_run("c" * 32, source.list_files(), source, tmp_path, workers=2, progress=False)
    assert leftovers(tmp_path) == []


def test_a_size_mismatch_is_an_integrity_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("digitflow.artifacts.pull.RETRY_BACKOFF", 0.01)
    source = FlakySource(fake_files())
    files = [RemoteFile(f.path, f.size + 1) for f in source.list_files()]
    with pytest.raises(ArtifactIntegrityError, match="bytes"):
        _sync_run("d" * 32, files, source, tmp_path, workers=2, progress=False)
    assert leftovers(tmp_path) == []


def test_files_download_in_parallel(tmp_path: Path) -> None:
    source = FlakySource(fake_files())
    _sync_run("e" * 32, source.list_files(), source, tmp_path, workers=4, progress=False)
    assert source.peak >= 3


@pytest.mark.parametrize("path", ["../escape.bin", "model/../../escape.bin", "/etc/escape"])
def test_an_artifact_path_leaving_the_run_folder_is_refused(tmp_path: Path, path: str) -> None:
    source = FlakySource({path: b"x", "model/model.pt": b"w"})
    with pytest.raises(ArtifactIntegrityError, match="outside the run"):
        _sync_run("f" * 32, source.list_files(), source, tmp_path / "models", 2, progress=False)
    assert not (tmp_path / "models").exists() and not (tmp_path / "escape.bin").exists()
