"""The floor: the least a Python ASGI predict can do under gunicorn's uvicorn workers.

Not a server to run: a measuring stick for `make bench` (`python-floor`, `python-floor-int8`).
It does only what every answer needs, with the pieces digitflow and the in-process ceiling use:
read the body, cut the PNGs out of the benchmark's multipart bodies (no validation: it trusts
wrk), `bytes_to_input`, the project's `MicroBatcher` with the forward pass on the event loop,
and an orjson answer in the seed's shape. No edge (keys, rate limit, caps, request ids, logs),
no connection guard, no metrics, no error answers, no FastAPI.

Its gap to the ceiling is what uvicorn, per-request Python and the sockets cost on this
machine; digitflow's distance from it is the cost of its features. Served from the repository
root (`PRED_MODEL_PATH`, optional `INFERENCE_BACKEND`: `onnx` or `onnx-int8`):

    gunicorn benchmarks.floor_app:APP -w 2 -k uvicorn_worker.UvicornWorker
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from digitflow.inference.classifier import Classifier
from digitflow.inference.microbatch import MicroBatcher
from digitflow.inference.preprocess import bytes_to_input

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_BOUNDARY = re.compile(rb"boundary=([^;\s]+)")
_PART = re.compile(rb'filename="([^"]*)"[^\r]*\r\n(?:[^\r]+\r\n)*\r\n')
_HEADERS = [(b"content-type", b"application/json")]
_batcher: MicroBatcher | None = None


async def _start() -> None:
    global _batcher
    classifier = Classifier.from_checkpoint(
        Path(os.environ["PRED_MODEL_PATH"]),
        backend=os.environ.get("INFERENCE_BACKEND", "onnx"),
        num_threads=1,
    )
    classifier.warm_up()
    _batcher = MicroBatcher(classifier, 64, forward_on_loop=True)
    await _batcher.start()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await _start()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if _batcher is not None:
                await _batcher.stop()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def APP(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:  # noqa: N802
    """Answer every POST as a predict request (see the module docstring)."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    assert _batcher is not None
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    content_type = dict(scope["headers"])[b"content-type"]
    found = _BOUNDARY.search(content_type)
    assert found is not None
    separator = b"\r\n--" + found.group(1)
    names, inputs = [], []
    for chunk in body.split(separator)[:-1]:  # the last piece is the closing `--`
        part = _PART.search(chunk)
        assert part is not None
        names.append(part.group(1).decode())
        inputs.append(bytes_to_input(chunk[part.end() :]))
    predictions = await _batcher.predict(np.stack(inputs))
    answer = orjson.dumps(
        {
            "data": [
                {"image_filename": name, "prediction": str(p.label)}
                for name, p in zip(names, predictions, strict=True)
            ]
        }
    )
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": answer})
