"""The same API on Ray Serve: `digitflow serve --engine ray` and `serve deploy` configs.

Each replica runs the very FastAPI app gunicorn serves (`create_app`, its lifespan, its errors),
behind Ray Serve's HTTP proxy (`@serve.ingress`, with the app built inside the replica).

- The model is decided once, where the application is built (`digitflow serve` hands its
  decision on; else `pin_served_model` decides here): a local checkpoint, or a
  `runs:/`/`models:/` reference pinned to one run id, so a registry alias that moves later
  cannot make two replicas serve two models.
- Each replica makes the pin local (a run is pulled into that node's `PRED_MODELS_DIR` only if it
  is not there and intact) and loads and self-tests the model once, in the app's lifespan.
- Intra-op threads per replica = its CPU reservation (unless `TORCH_THREADS` says otherwise).

Run `python -m digitflow_fastapi.scale.ray_serve --help`; with `RAY_ADDRESS` set it joins that
cluster, otherwise it starts a small local one that lives as long as the command.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment

from digitflow.artifacts.refs import ModelPin, ServedModel, pin_served_model, served_model_of
from digitflow.errors import DigitflowError
from digitflow.settings import read_core_settings
from digitflow_fastapi.app import create_app
from digitflow_fastapi.config import Settings, get_settings
from digitflow_fastapi.lifecycle.handoff import decided_pin, read_handoff

logger = logging.getLogger(__name__)

APP_NAME = "digitflow"
DEPLOYMENT_NAME = "DigitflowAPI"
DEFAULT_OBJECT_STORE_MB = 200
# Concurrent requests per replica: the app's micro-batcher needs them in flight to batch them
# (Ray's default, 5, would cap every forward pass at 5 images).
DEFAULT_MAX_ONGOING = 64


def replica_model(pin: ModelPin) -> ServedModel:
    """The pinned model on this replica's node (a run is pulled into its PRED_MODELS_DIR)."""
    return served_model_of(pin, get_settings().PRED_MODELS_DIR, read_core_settings().store())


def replica_settings(threads: int) -> Settings:
    """This replica's server settings: the environment's, with its share of threads."""
    settings = get_settings()
    return settings.model_copy(
        update={"TORCH_THREADS": settings.TORCH_THREADS or threads, "WEB_CONCURRENCY": 1}
    )


class DigitflowReplica:
    """One replica: digitflow's FastAPI app, built and started inside the replica's process."""

    def __init__(self, pin: ModelPin, threads: int = 1) -> None:
        self._pin = pin
        self._threads = threads

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Ray Serve after `__init__`; the app's lifespan then loads the model."""
        return create_app(replica_settings(self._threads), served=replica_model(self._pin))

    def check_health(self) -> None:
        """Ray replaces a replica whose model is not loaded and self-tested."""
        app: Any = getattr(self, "app", None)
        if app is None or not app.state.readiness.ready:
            raise RuntimeError("digitflow model not ready (see the replica's log)")


DigitflowAPI: Deployment = serve.deployment(
    name=DEPLOYMENT_NAME, max_ongoing_requests=DEFAULT_MAX_ONGOING
)(serve.ingress()(DigitflowReplica))


class AppArgs(BaseModel):
    """`args` of a `serve deploy` config (each falls back to the nodes' environment)."""

    model_path: str | None = None
    model_uri: str | None = None
    model_uuid: str | None = None
    replicas: int = Field(default=1, ge=1)
    replica_cpus: float = Field(default=1.0, gt=0)
    max_ongoing_requests: int = Field(default=DEFAULT_MAX_ONGOING, ge=1)


def build_app(args: AppArgs) -> Application:
    """The Serve application: `import_path: digitflow_fastapi.scale.ray_serve:build_app`."""
    settings, store = get_settings(), read_core_settings().store()
    if args.model_path or args.model_uri or args.model_uuid:  # the config names its own model
        pin = pin_served_model(
            Path(args.model_path) if args.model_path else settings.PRED_MODEL_PATH,
            args.model_uri or settings.PRED_MODEL_URI,
            args.model_uuid or settings.PRED_MODEL_UUID or None,
            store,
        )
    else:
        pin = decided_pin(settings, read_handoff(), store)
    logger.info("serving model %s from %s", pin.model_uuid, pin.model_path or pin.model_uri)
    deployment = DigitflowAPI.options(
        num_replicas=args.replicas,
        max_ongoing_requests=args.max_ongoing_requests,
        ray_actor_options={"num_cpus": args.replica_cpus},
    )
    return deployment.bind(pin, max(1, math.floor(args.replica_cpus)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m digitflow_fastapi.scale.ray_serve",
        description="Serve digitflow's API on Ray Serve (joins RAY_ADDRESS if set).",
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--max-ongoing-requests", type=int, default=DEFAULT_MAX_ONGOING)
    parser.add_argument(
        "--object-store-mb",
        type=int,
        default=DEFAULT_OBJECT_STORE_MB,
        help="Object store of the local cluster (requests do not go through it)",
    )
    return parser


def start_ray(address: str | None, cpus: float, object_store_mb: int) -> None:
    """Join `address`, or start a small local cluster: no dashboard, a small object store."""
    import ray

    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    ray.init(
        num_cpus=max(os.cpu_count() or 1, math.ceil(cpus)),
        include_dashboard=False,
        object_store_memory=object_store_mb * 1024 * 1024,
        logging_level=logging.WARNING,
    )


class StopRequested(Exception):
    """SIGTERM or SIGINT arrived: tear down and exit 0."""


def _raise_stop(signum: int, frame: object) -> None:
    raise StopRequested(signal.Signals(signum).name)


def _catch_stop_signals() -> None:
    """Turn SIGTERM/SIGINT into `StopRequested`, at any stage (even while Serve is still
    deploying). Called again after `ray.init`, which installs Ray's crash handler for them."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _raise_stop)


def main(argv: list[str] | None = None) -> int:
    """Start or join Ray, deploy the app, serve until SIGTERM/SIGINT, then tear down."""
    from digitflow.logging_setup import configure_cli_logging

    configure_cli_logging()
    options = _parser().parse_args(argv)
    args = AppArgs(
        replicas=options.replicas,
        replica_cpus=options.replica_cpus,
        max_ongoing_requests=options.max_ongoing_requests,
    )
    address = get_settings().RAY_ADDRESS
    try:
        app = build_app(args)
    except DigitflowError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    _catch_stop_signals()
    try:
        start_ray(address, args.replicas * args.replica_cpus, options.object_store_mb)
        _catch_stop_signals()
        serve.start(http_options={"host": options.host, "port": options.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        sys.stderr.write(
            f"serving on Ray Serve at http://{options.host}:{options.port} with "
            f"{args.replicas} replicas\n"
        )
        while True:
            time.sleep(3600)
    except StopRequested:
        pass
    except Exception as exc:  # Ray reports a failed deployment with its own exception types
        sys.stderr.write(f"error: Ray Serve deployment failed: {exc}\n")
        return 1
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):  # one teardown, not interrupted
            signal.signal(signum, signal.SIG_IGN)
        stop_serving(joined=bool(address))
    return 0


def stop_serving(joined: bool) -> None:
    """Remove the app from a joined cluster, or shut Serve and the local cluster down."""
    import ray

    with contextlib.suppress(Exception):  # best effort: Ray may already be gone
        if joined:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
