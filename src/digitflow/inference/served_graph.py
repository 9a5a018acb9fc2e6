"""The ONNX graph logged beside a checkpoint, and when a server may trust it (torch-free).

A run's `model/` folder is an MLflow Model: `MLmodel` (ONNX flavor + pyfunc), `model.onnx`, the
seed's `model.pt` and `golden.json`. The `MLmodel` carries, under `metadata.digitflow`, the SHA-256
of the checkpoint the graph was exported from and of the graph itself. A server given `model.pt`
serves `model.onnx` only when both digests match the bytes it reads; otherwise it exports again
(which needs torch). Only YAML is parsed here: no MLflow, no torch.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from digitflow.artifacts.run_layout import mlmodel_path, onnx_path
from digitflow.digests import file_sha256

logger = logging.getLogger(__name__)

METADATA_KEY: Final = "digitflow"
GRAPH_FORMAT: Final = 1
MAX_MLMODEL_BYTES: Final = 1 << 20  # an MLmodel is a few KiB; refuse to parse a huge one
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class GraphRecord:
    """What `MLmodel` says about the graph: the digests of the checkpoint and of `model.onnx`."""

    checkpoint_sha256: str
    onnx_sha256: str

    def as_metadata(self) -> dict[str, dict[str, Any]]:
        """The `metadata` mapping of an MLflow Model that records this graph."""
        return {
            METADATA_KEY: {
                "format": GRAPH_FORMAT,
                "checkpoint_sha256": self.checkpoint_sha256,
                "onnx_sha256": self.onnx_sha256,
            }
        }


def read_record(mlmodel: Path) -> GraphRecord | None:
    """The graph record in an `MLmodel` file; None when there is none or it is malformed."""
    try:
        if mlmodel.stat().st_size > MAX_MLMODEL_BYTES:
            return None
        document = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
        entry = document["metadata"][METADATA_KEY]
        record = GraphRecord(str(entry["checkpoint_sha256"]), str(entry["onnx_sha256"]))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        return None
    digests = (record.checkpoint_sha256, record.onnx_sha256)
    return record if all(_SHA256.match(d) for d in digests) else None


def logged_graph(checkpoint: Path) -> bytes | None:
    """The bytes of `model.onnx` beside `checkpoint` when `MLmodel` vouches for both files.

    None, with the reason logged, when there is no graph, no record, or a digest differs (the
    checkpoint was replaced, or the graph was): the caller then exports from the checkpoint.
    """
    graph = onnx_path(checkpoint)
    if not graph.is_file():
        return None
    record = read_record(mlmodel_path(checkpoint))
    if record is None:
        logger.warning("%s has no digests in %s; not using it", graph, mlmodel_path(checkpoint))
        return None
    if file_sha256(checkpoint) != record.checkpoint_sha256:
        logger.warning("%s was not exported from this %s; not using it", graph, checkpoint.name)
        return None
    data = graph.read_bytes()
    if hashlib.sha256(data).hexdigest() != record.onnx_sha256:
        logger.warning(
            "%s does not match its SHA-256 in %s; not using it", graph, mlmodel_path(checkpoint)
        )
        return None
    return data
