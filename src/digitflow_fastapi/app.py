"""The FastAPI application factory: model loaded once per worker in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from digitflow.errors import ConfigError, DigitflowError, SelfTestFailed
from digitflow.inference import Classifier
from digitflow.logging_setup import configure_logging_from_file
from digitflow.microbatch import MicroBatcher
from digitflow.selftest import run_self_test
from digitflow_fastapi import metrics
from digitflow_fastapi.asgi import LeanFastAPI
from digitflow_fastapi.config import Settings, get_settings
from digitflow_fastapi.deps import ModelService
from digitflow_fastapi.docs import install_docs
from digitflow_fastapi.errors import install_error_handlers
from digitflow_fastapi.health import router as health_router
from digitflow_fastapi.responses import OrjsonResponse
from digitflow_fastapi.v1.routers.model import predict_lean
from digitflow_fastapi.v1.routers.model import router as model_router

logger = logging.getLogger(__name__)


def resolve_model_path(settings: Settings) -> tuple[Path, str]:
    """The checkpoint to load and the model UUID to report."""
    if settings.PRED_MODEL_PATH:
        return Path(settings.PRED_MODEL_PATH), settings.PRED_MODEL_UUID
    if settings.PRED_MODEL_URI:
        try:
            from digitflow.artifacts import StoreConfig, resolve_model
        except ImportError as exc:  # pragma: no cover - depends on the artifacts issue
            raise ConfigError("PRED_MODEL_URI needs digitflow.artifacts, not installed") from exc
        resolved = resolve_model(
            settings.PRED_MODEL_URI,
            Path(settings.PRED_MODELS_DIR),
            StoreConfig.from_env(os.environ),
        )
        return resolved.model_path, settings.PRED_MODEL_UUID or (resolved.run_id or "")
    raise ConfigError("set PRED_MODEL_PATH (or PRED_MODEL_URI) to the model to serve")


def torch_threads(settings: Settings) -> int:
    """TORCH_THREADS, or cores // workers when it is 0."""
    if settings.TORCH_THREADS > 0:
        return settings.TORCH_THREADS
    workers = max(1, settings.WEB_CONCURRENCY)
    return max(1, (os.cpu_count() or 1) // workers)


def load_classifier(settings: Settings) -> tuple[Classifier, str, dict[str, Any]]:
    """Load, warm up and self-test the model; raises DigitflowError with one clear message."""
    model_path, model_uuid = resolve_model_path(settings)
    device = None  # the CPU; only a GPU request needs torch here (the ONNX path may never)
    if settings.USE_CUDA or settings.USE_MPS:
        from digitflow.device import select_device

        device = select_device(settings.USE_CUDA, settings.USE_MPS)
    classifier = Classifier.from_checkpoint(
        model_path,
        device=device,
        backend=settings.INFERENCE_BACKEND,
        num_threads=torch_threads(settings),
    )
    report = run_self_test(classifier, model_path)
    return classifier, model_uuid, report


def create_app(settings: Settings | None = None, classifier: Classifier | None = None) -> FastAPI:
    """Build the app; nothing is loaded until the lifespan starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        conf = settings or get_settings()
        app.state.settings = conf
        config_path = Path(conf.LOGGER_CONFIG_PATH)
        if config_path.is_file():
            configure_logging_from_file(config_path)
        model_uuid = conf.PRED_MODEL_UUID
        try:
            if classifier is None:
                loaded, model_uuid, report = load_classifier(conf)
            else:
                loaded = classifier
                loaded.warm_up()
                report = {"warmed_up": True, "golden_checked": 0, "golden_file": None}
        except SelfTestFailed as exc:
            # The worker stays up, unready: probes see why, predict answers 503.
            logger.error("not ready: %s", exc)
            app.state.readiness = {
                "ready": False,
                "model_loaded": True,
                "model_uuid": model_uuid,
                "self_test": "failed",
                "detail": str(exc),
            }
            yield
            return
        except DigitflowError as exc:
            logger.error("start-up failed: %s", exc)
            raise SystemExit(f"start-up failed: {exc}") from exc
        batcher = MicroBatcher(
            loaded,
            conf.MAX_BATCH_SIZE,
            conf.MAX_BATCH_WAIT_MS,
            on_batch=metrics.METRICS.observe_batch,
        )
        await batcher.start()
        app.state.service = ModelService(batcher=batcher, model_uuid=model_uuid)
        app.state.readiness = {"ready": True, "model_loaded": True, "model_uuid": model_uuid}
        app.state.readiness.update(report)
        logger.info("model ready (%d golden images checked)", report["golden_checked"])
        # Everything loaded so far lives as long as the worker: keep the collector off it, so
        # a full collection under load walks only request garbage (it cost ~100 ms p99 spikes).
        gc.collect()
        gc.freeze()
        folder = Path(conf.DIGITFLOW_METRICS_DIR) if conf.DIGITFLOW_METRICS_DIR else None
        publisher = asyncio.create_task(metrics.publish_forever(folder)) if folder else None
        try:
            yield
        finally:
            app.state.readiness = {"ready": False, "model_loaded": False}
            await batcher.stop()
            if publisher is not None:
                publisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publisher

    conf_for_routes = settings or get_settings()
    predict_path = f"{conf_for_routes.API_V1_STR}/model/predict"
    app = LeanFastAPI(
        {predict_path: predict_lean},
        max_body_bytes=conf_for_routes.MAX_UPLOAD_BYTES,
        title=conf_for_routes.API_NAME,
        description="Recognises a handwritten digit (0–9) in an uploaded image.",
        default_response_class=OrjsonResponse,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = None
    app.state.settings = conf_for_routes
    app.state.readiness = {"ready": False, "model_loaded": False}
    install_error_handlers(app)
    install_docs(app)
    app.include_router(health_router)
    app.include_router(model_router, prefix=conf_for_routes.API_V1_STR)
    return app
