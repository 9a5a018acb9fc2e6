"""A local artifact folder (`file://` store): links are neither listed nor followed."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from digitflow.artifacts.sources import LocalSource
from digitflow.errors import ArtifactNotFound


def test_a_link_in_a_local_store_is_not_listed_and_not_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of any run")
    secret.chmod(0o600)
    root = tmp_path / "run" / "artifacts"
    (root / "model").mkdir(parents=True)
    (root / "model" / "model.pt").write_bytes(b"weights")
    (root / "model" / "stolen.txt").symlink_to(secret)
    source = LocalSource(root)
    assert [f.path for f in source.list_files()] == ["model/model.pt"]
    with pytest.raises(ArtifactNotFound):
        source.download("model/stolen.txt", io.BytesIO(), lambda n: None)
    out = io.BytesIO()
    source.download("model/model.pt", out, lambda n: None)
    assert out.getvalue() == b"weights"
