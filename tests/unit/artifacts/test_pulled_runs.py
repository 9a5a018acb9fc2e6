"""Pulled-run folders: concurrent pulls take turns, and readers never see a swap half-done."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from digitflow.artifacts.pull import _sync_run
from digitflow.artifacts.pulled_runs import publish, run_lock
from digitflow.artifacts.run_layout import MANIFEST_NAME
from tests.support.fake_sources import FlakySource, fake_files

RUN = "e" * 32


def _stage(dest: Path, version: int) -> Path:
    staging = dest / f".{RUN}.partial-0-{version}"
    (staging / "artifacts" / "model").mkdir(parents=True)
    (staging / "artifacts" / "model" / "model.pt").write_text(f"v{version}")
    (staging / MANIFEST_NAME).write_text(json.dumps({"version": version}))
    return staging


def test_readers_never_see_a_missing_file_or_a_mixed_copy_while_a_run_is_republished(
    tmp_path: Path,
) -> None:
    publish(_stage(tmp_path, 0), tmp_path, RUN)
    link = tmp_path / RUN
    stop = threading.Event()
    problems: list[str] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                model = (link / "artifacts" / "model" / "model.pt").read_text()
                manifest = json.loads((link / MANIFEST_NAME).read_text())
            except FileNotFoundError as exc:
                problems.append(f"missing: {exc.filename}")
                continue
            folder = link.resolve()  # one version, read whole
            try:
                pair = ((folder / "artifacts/model/model.pt").read_text(), folder / MANIFEST_NAME)
                version = json.loads(pair[1].read_text())["version"]
            except FileNotFoundError:
                continue  # that version was retired meanwhile: not a mixed copy
            if pair[0] != f"v{version}":
                problems.append(f"mixed: {pair[0]} with manifest {version}")
            assert model.startswith("v") and "version" in manifest
            reads[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    for version in range(1, 300):
        with run_lock(tmp_path, RUN):
            publish(_stage(tmp_path, version), tmp_path, RUN)
        time.sleep(0.002)
    stop.set()
    for thread in threads:
        thread.join()
    assert problems == []
    assert reads[0] > 100
    assert (link / "artifacts" / "model" / "model.pt").read_text() == "v299"
    assert len(list(tmp_path.glob(f".{RUN}.v*"))) == 3  # the published one and two before it


def test_concurrent_pulls_of_one_run_take_turns_and_only_the_first_downloads(
    tmp_path: Path,
) -> None:
    source = FlakySource(fake_files())
    results = []
    errors: list[BaseException] = []

    def pull() -> None:
        try:
            results.append(_sync_run(RUN, source.list_files(), source, tmp_path, 2, False))
        except BaseException as exc:  # a failed pull is what this test looks for
            errors.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(r.downloaded_files for r in results) == [0, 0, 0, len(fake_files())]
    assert all(count == 1 for count in source.calls.values())  # each file fetched once
    model = tmp_path / RUN / "artifacts" / "model" / "model.pt"
    assert model.read_bytes() == fake_files()["model/model.pt"]


def test_a_run_folder_from_an_older_digitflow_is_replaced_by_a_link(tmp_path: Path) -> None:
    old = tmp_path / RUN / "artifacts" / "model"
    old.mkdir(parents=True)
    (old / "model.pt").write_text("old")
    publish(_stage(tmp_path, 7), tmp_path, RUN)
    assert (tmp_path / RUN).is_symlink()
    assert (tmp_path / RUN / "artifacts" / "model" / "model.pt").read_text() == "v7"
