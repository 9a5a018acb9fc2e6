"""The golden-set file: written and read back, and a malformed one is one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from digitflow.errors import SelfTestFailed
from digitflow.training.golden import GoldenImage, read_golden, write_golden


def test_a_golden_file_reads_back_what_was_written(tmp_path: Path) -> None:
    images = [GoldenImage("test/7/1.png", 7, "7", b"\x89PNG-bytes")]
    write_golden(tmp_path / "golden.json", images)
    assert read_golden(tmp_path / "golden.json") == images
    assert read_golden(tmp_path / "absent.json") is None


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"format": 1}',
        '{"images": [{"label": 1}]}',
        '{"images": 3}',
        '{"images": [{"prediction": "1", "png_base64": "!!!"}]}',
        "[]",
    ],
)
def test_a_malformed_golden_file_is_a_self_test_failure_naming_the_file(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "golden.json"
    path.write_text(text)
    with pytest.raises(SelfTestFailed, match="unreadable golden file"):
        read_golden(path)
