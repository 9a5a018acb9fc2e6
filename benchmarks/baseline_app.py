"""The seed's reference design of the predict API, kept faithful on purpose: the baseline.

What the template's tutorial-style server does, and what digitflow is measured against:
a synchronous FastAPI route (run in Starlette's thread pool), `UploadFile` (spooled by
python-multipart), the upload written to a file on disk and opened from there with Pillow,
grayscale + resize to 28×28, one forward pass per request with PyTorch's default thread count,
and the seed's response shape. Served the seed's way, from the repository root:

    PRED_MODEL_PATH=… gunicorn benchmarks.baseline_app:APP -b 127.0.0.1:8081 -w 4 \
        -k uvicorn.workers.UvicornWorker

Not for production: no input limits, no readiness, no batching.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from digitflow.training.net import Net

APP = FastAPI(title="seed reference design (baseline)")

_MODEL = Net()
_checkpoint = torch.load(os.environ["PRED_MODEL_PATH"], map_location="cpu", weights_only=True)
_MODEL.load_state_dict(_checkpoint.get("model_state_dict", _checkpoint))
_MODEL.eval()
_UPLOAD_DIR = Path(tempfile.mkdtemp(prefix="baseline-uploads-"))


@APP.post("/api/v1/model/predict")
def predict(image_file: UploadFile = File(...)) -> dict[str, list[dict[str, str]]]:
    """Save the upload, reopen it from disk, and run the model on it alone."""
    fd, name = tempfile.mkstemp(dir=_UPLOAD_DIR, suffix=".png")
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(image_file.file, out)
    try:
        image = Image.open(name).convert("L").resize((28, 28))
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None, None]
        with torch.no_grad():
            prediction = int(_MODEL(tensor).argmax(dim=1).item())
    finally:
        os.unlink(name)
    return {"data": [{"image_filename": image_file.filename or "", "prediction": str(prediction)}]}
