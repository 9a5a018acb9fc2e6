"""ONNX exports of checkpoints, cached in a private folder so server workers never import torch.

An export is named by the checkpoint's SHA-256, so it stands for those exact bytes (which went
through the weights-only loader when it was made). The cache folder must be a real folder (not a
link) owned by this user; it is kept closed to others (0700). Otherwise no cache is used and each
start exports again. Exports are opened without following links, must be regular files of this user,
and are written through a temporary file beside them. An empty or unreadable export is rebuilt.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digitflow.atomic import write_bytes_atomically
from digitflow.digests import file_sha256

if TYPE_CHECKING:
    from digitflow.training.net import Net

logger = logging.getLogger(__name__)


def export_name(checkpoint: Path) -> str:
    """The export's file name, keyed by the checkpoint's SHA-256."""
    return f"model.{file_sha256(checkpoint)[:16]}.onnx"


def private_folder(cache_dir: Path | None) -> Path | None:
    """`cache_dir/onnx`, created 0700 (an own folder open to others is closed); None when it is a
    link or someone else's."""
    if cache_dir is None:
        return None
    folder = cache_dir / "onnx"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
    except OSError as exc:
        logger.warning("no ONNX cache: cannot create %s (%s)", folder, exc.strerror)
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        logger.warning("no ONNX cache: %s is a link or another user's folder", folder)
        return None
    if info.st_mode & 0o077:  # e.g. made 0755 by an older digitflow; files are checked one by one
        os.chmod(folder, 0o700)
    return folder


def read_cached(folder: Path | None, name: str) -> bytes | None:
    """The cached export's bytes, if a regular non-empty file of this user is there."""
    if folder is None:
        return None
    try:
        fd = os.open(folder / name, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_size == 0:
            return None
        return handle.read()


def export_model(model: Net, folder: Path | None, name: str) -> bytes:
    """The ONNX bytes of `model`, saved as `folder/name` when there is a private cache folder.

    Uses the TorchScript exporter (`dynamo=False`): the dynamo one needs onnxscript.
    """
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.cpu(),
            (torch.zeros(1, 1, 28, 28),),
            buffer,  # type: ignore[arg-type]  # a file object is accepted at run time
            dynamo=False,
            input_names=["images"],
            output_names=["log_probabilities"],
            dynamic_axes={"images": {0: "n"}, "log_probabilities": {0: "n"}},
        )
    data = buffer.getvalue()
    if folder is not None:
        try:
            write_bytes_atomically(folder / name, data, mode=0o600)
        except OSError as exc:
            logger.warning("could not cache the ONNX export in %s (%s)", folder, exc.strerror)
    return data


def onnx_session(model_bytes: bytes, num_threads: int) -> Any:
    """An ONNX Runtime CPU session with `num_threads` intra-op threads, run sequentially."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    # ORT's Python wrapper keeps the model bytes for the session's life (its own TODO says so),
    # only to rebuild the session when a GPU provider fails; a CPU session never does, and the
    # graph's weights are already in the session: 4.6 MiB per worker for the float graph.
    if getattr(session, "_model_bytes", None) is model_bytes:
        session._model_bytes = None
    return session


def cached_session(folder: Path | None, name: str, num_threads: int) -> Any | None:
    """A session on the cached export, or None when there is none or it does not load."""
    data = read_cached(folder, name)
    if data is None:
        return None
    try:
        return onnx_session(data, num_threads)
    except Exception as exc:  # ORT raises its own types for a corrupt model
        logger.warning("rebuilding the unreadable ONNX export %s (%s)", name, type(exc).__name__)
        return None
