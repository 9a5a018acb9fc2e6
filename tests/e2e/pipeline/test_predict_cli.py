"""`digitflow predict`: JSON Lines per image, folders walked, unreadable files reported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.gunicorn_server import TrainedModel

pytestmark = pytest.mark.slow  # starts real servers or trains a model

CLI = str(Path(sys.executable).parent / "digitflow")


def test_predict_writes_one_json_line_per_image_of_files_and_folders(
    trained_model: TrainedModel, data_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    sources = sorted((data_dir / "test" / "3").glob("*.png"))[:3]
    for src in sources:
        shutil.copy(src, folder / src.name)
    single = sorted((data_dir / "test" / "8").glob("*.png"))[0]
    result = subprocess.run(
        [CLI, "predict", str(folder), str(single), "--model-path", str(trained_model.model_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["image_filepath"]).name for r in rows] == [s.name for s in sources] + [
        single.name
    ]
    assert all(set(r) == {"time", "image_filepath", "prediction"} for r in rows)
    assert all(r["prediction"] in {str(d) for d in range(10)} for r in rows)
    assert "img" in result.stderr  # the progress bar


def test_predict_reports_an_unreadable_file_and_exits_non_zero(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    result = subprocess.run(
        [CLI, "predict", str(bad), "--model-path", str(trained_model.model_path), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    row = json.loads(result.stdout.splitlines()[0])
    assert row["image_filepath"] == str(bad)
    assert "not a supported image" in row["error"]
