"""The ONNX graph logged beside a checkpoint, and when a server may trust it (torch-free).

A run's `model/` folder is an MLflow Model: `MLmodel` (ONNX flavor + pyfunc), `model.onnx`, the
seed's `model.pt` and `golden.json`, and `model.int8.onnx` when the calibrated int8 graph passed
its check (`training.quantize`). The `MLmodel` carries, under `metadata.digitflow`, the SHA-256
of the checkpoint the graphs were exported from and of each graph (with the int8 check's figures).
A server given `model.pt` serves a graph only when its digests match the bytes it reads; otherwise
it exports again (which needs torch). Only YAML is parsed here: no MLflow, no torch.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from digitflow.artifacts.run_layout import (
    INT8_ONNX_FILENAME,
    int8_onnx_path,
    mlmodel_path,
    onnx_path,
)
from digitflow.digests import file_sha256

logger = logging.getLogger(__name__)

METADATA_KEY: Final = "digitflow"
GRAPH_FORMAT: Final = 1
MAX_MLMODEL_BYTES: Final = 1 << 20  # an MLmodel is a few KiB; refuse to parse a huge one
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class GraphRecord:
    """What `MLmodel` says about the graphs: the digests of the checkpoint, of `model.onnx` and
    (when it passed its check) of `model.int8.onnx`, with the figures of that check."""

    checkpoint_sha256: str
    onnx_sha256: str
    int8_sha256: str | None = None
    int8_check: dict[str, float | int] = field(default_factory=dict, hash=False)

    def as_metadata(self) -> dict[str, dict[str, Any]]:
        """The `metadata` mapping of an MLflow Model that records these graphs."""
        entry: dict[str, Any] = {
            "format": GRAPH_FORMAT,
            "checkpoint_sha256": self.checkpoint_sha256,
            "onnx_sha256": self.onnx_sha256,
        }
        if self.int8_sha256:
            entry["int8"] = {
                "file": INT8_ONNX_FILENAME,
                "onnx_sha256": self.int8_sha256,
                **self.int8_check,
            }
        return {METADATA_KEY: entry}


def read_record(mlmodel: Path) -> GraphRecord | None:
    """The graph record in an `MLmodel` file; None when there is none or it is malformed."""
    try:
        if mlmodel.stat().st_size > MAX_MLMODEL_BYTES:
            return None
        document = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
        entry = document["metadata"][METADATA_KEY]
        int8 = entry.get("int8") or {}
        int8_sha256 = str(int8["onnx_sha256"]) if int8 else None
        figures = {k: v for k, v in int8.items() if isinstance(v, int | float)}
        record = GraphRecord(
            str(entry["checkpoint_sha256"]), str(entry["onnx_sha256"]), int8_sha256, figures
        )
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return None
    digests = (record.checkpoint_sha256, record.onnx_sha256, record.int8_sha256 or "0" * 64)
    return record if all(_SHA256.match(d) for d in digests) else None


def logged_graph(checkpoint: Path, int8: bool = False) -> bytes | None:
    """The bytes of `model.onnx` (or, with `int8`, of `model.int8.onnx`) beside `checkpoint` when
    `MLmodel` vouches for both files.

    None, with the reason logged, when there is no graph, no record, or a digest differs (the
    checkpoint was replaced, or the graph was): the caller then falls back (int8 → float graph,
    float graph → an export from the checkpoint).
    """
    graph = int8_onnx_path(checkpoint) if int8 else onnx_path(checkpoint)
    if not graph.is_file():
        return None
    record = read_record(mlmodel_path(checkpoint))
    expected = None if record is None else record.int8_sha256 if int8 else record.onnx_sha256
    if record is None or expected is None:
        logger.warning("%s has no digest in %s; not using it", graph, mlmodel_path(checkpoint))
        return None
    if file_sha256(checkpoint) != record.checkpoint_sha256:
        logger.warning("%s was not exported from this %s; not using it", graph, checkpoint.name)
        return None
    data = graph.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        logger.warning(
            "%s does not match its SHA-256 in %s; not using it", graph, mlmodel_path(checkpoint)
        )
        return None
    return data
