"""The FastAPI application factory: the model is loaded once per worker, in the lifespan.

Which model is decided once per start (`digitflow.artifacts.refs.pin_served_model`, see
`lifecycle.handoff`): a gunicorn worker reads the master's decision from the model state folder;
a Ray replica is given it; only a single uvicorn process decides itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import NoReturn

from fastapi import FastAPI

from digitflow.artifacts.refs import ServedModel, served_model_of
from digitflow.errors import ConfigError, DigitflowError, SelfTestFailed
from digitflow.inference.classifier import Classifier
from digitflow.inference.microbatch import MicroBatcher
from digitflow.inference.selftest import SelfTestReport, load_checked_classifier, worker_threads
from digitflow.logging_setup import configure_logging_from_file
from digitflow.settings import read_core_settings
from digitflow_fastapi import metrics
from digitflow_fastapi.config import Settings, get_settings
from digitflow_fastapi.deps import ModelService
from digitflow_fastapi.docs import declare_edge_in_schema, install_docs
from digitflow_fastapi.edge.asgi import LeanFastAPI
from digitflow_fastapi.edge.checks import Edge
from digitflow_fastapi.errors import install_error_handlers
from digitflow_fastapi.health import router as health_router
from digitflow_fastapi.lifecycle.connection_guard import open_connections
from digitflow_fastapi.lifecycle.handoff import Handoff, decided_pin, read_handoff
from digitflow_fastapi.lifecycle.model_state import DesiredModel
from digitflow_fastapi.lifecycle.model_swap import ModelFollower, desired_at_boot
from digitflow_fastapi.protocols.decoding import DecodeLimits, ImageDecoder
from digitflow_fastapi.protocols.mlflow_scoring import router as mlflow_router
from digitflow_fastapi.protocols.page import install_page
from digitflow_fastapi.protocols.v1 import router as model_router
from digitflow_fastapi.protocols.v2.oip import router as oip_router
from digitflow_fastapi.readiness import NOT_LOADED, Readiness
from digitflow_fastapi.responses import OrjsonResponse

logger = logging.getLogger(__name__)

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def forward_on_event_loop(conf: Settings) -> bool:
    """Whether this worker runs its forward passes on its event loop (`FORWARD_ON_EVENT_LOOP`):
    only on a CPU with one inference thread per worker, where the thread was measured to cost
    more than it overlaps; a GPU or several threads keep the inference thread."""
    on_cpu = not (conf.USE_CUDA or conf.USE_MPS)
    single = worker_threads(conf.TORCH_THREADS, conf.WEB_CONCURRENCY) == 1
    return conf.FORWARD_ON_EVENT_LOOP and on_cpu and single


def load_served_classifier(
    settings: Settings, served: ServedModel
) -> tuple[Classifier, SelfTestReport]:
    """Load and self-test the served model with this worker's share of the cores."""
    return load_checked_classifier(
        served.model_path,
        backend=settings.INFERENCE_BACKEND,
        use_cuda=settings.USE_CUDA,
        use_mps=settings.USE_MPS,
        num_threads=worker_threads(settings.TORCH_THREADS, settings.WEB_CONCURRENCY),
        cache_dir=read_core_settings().cache_dir(),
    )


def _model_to_serve(
    settings: Settings, handoff: Handoff, given: ServedModel | None
) -> tuple[ServedModel, DesiredModel | None]:
    """Which model this worker loads, read from the start's decision (raises DigitflowError).

    Under the gunicorn master: the state folder's newest generation (the start-up model, or the
    last one swapped in), so a respawned worker matches its siblings. A Ray replica is `given`
    its pinned model. A single uvicorn process makes the decision itself.
    """
    state = handoff.DIGITFLOW_MODEL_STATE_DIR
    if state is not None:
        desired = desired_at_boot(state)
        if desired is None:
            raise ConfigError(f"the model state folder {state} names no model to serve")
        return ServedModel(Path(desired.model_path), desired.model_uuid), desired
    if given is not None:
        return given, None
    store = read_core_settings().store()
    pin = decided_pin(settings, handoff, store)
    return served_model_of(pin, settings.PRED_MODELS_DIR, store), None


def _load(
    settings: Settings,
    handoff: Handoff,
    given: Classifier | None,
    given_model: ServedModel | None,
) -> tuple[Classifier, Readiness] | Readiness:
    """The classifier and its readiness, or only a failed readiness (the worker stays up)."""
    if given is not None:
        given.warm_up()
        report = SelfTestReport(golden_checked=0, golden_file=None)
        return given, Readiness.serving(settings.PRED_MODEL_UUID, report, given.backend)
    desired: DesiredModel | None = None
    try:
        served, desired = _model_to_serve(settings, handoff, given_model)
        classifier, report = load_served_classifier(settings, served)
    except SelfTestFailed as exc:
        logger.error("not ready: %s", exc)
        return Readiness.self_test_failed(served.model_uuid, str(exc))
    except DigitflowError as exc:
        copied = f" (a copy of {desired.origin})" if desired and desired.origin else ""
        stop_worker_at_boot(f"start-up failed: {exc}{copied}")
    readiness = Readiness.serving(served.model_uuid, report, classifier.backend)
    if desired is not None:
        readiness = dataclasses.replace(readiness, model_generation=desired.generation)
    return classifier, readiness


WORKER_BOOT_ERROR = 3  # gunicorn's exit code for "worker failed to boot": the master stops too


def stop_worker_at_boot(message: str) -> NoReturn:
    """End this worker with one line on stderr and gunicorn's boot-error code.

    Raising out of the lifespan instead makes Starlette and uvicorn log the whole traceback
    (about 40 lines) for a cause the message already names; nothing needs cleaning up yet.
    """
    logger.error(message)
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(WORKER_BOOT_ERROR)


# The collector's young-generation threshold once a worker serves. A worker with 32 requests in
# flight holds ~1,000 newly tracked objects, so at CPython's 700 it collected every ~28 requests
# (3.8 µs a request in-process, measured with 32 concurrent predicts); at 2,000 those requests
# finish first (2 collections in 36,000 requests). Cyclic garbage waits for 2,000 tracked
# objects instead of 700.
YOUNG_GENERATION_THRESHOLD = 2000


def _tune_collector() -> None:
    """Keep the collector off everything loaded so far (it lives as long as the worker, and full
    collections walking it under load cost ~100 ms p99 spikes), and off the objects of the
    requests in flight (`YOUNG_GENERATION_THRESHOLD`)."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_GENERATION_THRESHOLD), middle, old)


def _start_follower(
    app: FastAPI, conf: Settings, state: Path | None, readiness: Readiness
) -> asyncio.Task[None] | None:
    """Follow the master's model swaps (see `model_swap`), if there is a master keeping state."""
    if state is None:
        if conf.MODEL_POLL_SECONDS > 0:
            logger.warning("MODEL_POLL_SECONDS is ignored without the gunicorn master")
        return None
    loader = partial(load_served_classifier, conf)
    follower = ModelFollower(app, state, loader, readiness.model_generation or 0)
    return asyncio.create_task(follower.follow(), name="digitflow-model-follower")


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def build_lifespan(
    settings: Settings | None, classifier: Classifier | None, served: ServedModel | None = None
) -> Lifespan:
    """The lifespan: load and check the model, run the micro-batcher, publish metrics."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        conf = settings or get_settings()
        handoff: Handoff = app.state.handoff
        app.state.settings = conf
        configure_logging_from_file(conf.LOGGER_CONFIG_PATH)
        loaded = _load(conf, handoff, classifier, served)
        if isinstance(loaded, Readiness):
            app.state.readiness = loaded
            yield
            return
        model, readiness = loaded
        batcher = MicroBatcher(
            model,
            conf.MAX_BATCH_SIZE,
            conf.MAX_BATCH_WAIT_MS,
            on_batch=metrics.METRICS.observe_batch,
            max_queued_images=conf.MAX_QUEUED_IMAGES_PER_WORKER,
            timeout_ms=conf.REQUEST_TIMEOUT_MS,
            on_wait=metrics.METRICS.observe_queue_wait,
            inline_max_images=conf.INLINE_FORWARD_MAX_IMAGES,
            alone=lambda: open_connections() == 1,
            forward_on_loop=forward_on_event_loop(conf),
        )
        await batcher.start()
        app.state.service = ModelService(batcher=batcher, model_uuid=readiness.model_uuid or "")
        app.state.readiness = readiness
        metrics.METRICS.model.uuid = readiness.model_uuid or ""
        logger.info(
            "model ready on %s (%d golden images checked), forward passes on %s",
            readiness.engine,
            readiness.golden_checked or 0,
            "the event loop" if batcher.forward_on_loop else "an inference thread",
        )
        _tune_collector()
        folder = handoff.DIGITFLOW_METRICS_DIR
        publisher = asyncio.create_task(metrics.publish_forever(folder)) if folder else None
        follower = _start_follower(app, conf, handoff.DIGITFLOW_MODEL_STATE_DIR, readiness)
        try:
            yield
        finally:
            app.state.readiness = NOT_LOADED
            await _cancel(follower)  # no swap while shutting down
            await batcher.stop()
            await _cancel(publisher)

    return lifespan


def decode_limits(conf: Settings) -> DecodeLimits:
    """The decoder's limits as the settings name them (MAX_IMAGE_PIXELS, MAX_DECODE_PIXELS…)."""
    return DecodeLimits(
        max_pixels=conf.MAX_IMAGE_PIXELS,
        max_work_pixels=conf.MAX_DECODE_PIXELS,
        max_request_work_pixels=conf.MAX_REQUEST_DECODE_PIXELS,
        large_slots=conf.MAX_LARGE_DECODES_PER_WORKER,
        inline_bytes=conf.INLINE_DECODE_MAX_BYTES,
        max_segments=conf.MAX_IMAGE_SEGMENTS,
        max_components=conf.MAX_DIGIT_COMPONENTS,
    )


def create_app(
    settings: Settings | None = None,
    classifier: Classifier | None = None,
    served: ServedModel | None = None,
) -> FastAPI:
    """Build the app; nothing is loaded until the lifespan starts.

    `served`: the model to serve, when the caller was handed the start's decision (a Ray
    replica); `classifier`: one already loaded (tests).
    """
    conf = settings or get_settings()
    app = LeanFastAPI(
        max_body_bytes=conf.MAX_UPLOAD_BYTES,
        max_in_flight=conf.MAX_IN_FLIGHT_PER_WORKER,
        edge=Edge.from_settings(conf),
        title=conf.API_NAME,
        description="Recognises a handwritten digit (0–9) in an uploaded image.",
        default_response_class=OrjsonResponse,
        lifespan=build_lifespan(settings, classifier, served),
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = None
    app.state.settings = conf
    app.state.handoff = read_handoff()
    app.state.decoder = ImageDecoder(decode_limits(conf))
    app.state.readiness = NOT_LOADED
    install_error_handlers(app)
    install_docs(app)
    app.include_router(health_router)
    app.include_router(model_router, prefix=conf.API_V1_STR)
    app.include_router(oip_router)
    app.include_router(mlflow_router)
    install_page(app)
    declare_edge_in_schema(app, app.edge)
    return app
