"""A worker's side of a model swap: follow the state folder's newest generation (see `model_state`).

Every `every_s` seconds (0.25 by default) the worker `stat`s `desired.json` and `refusals.json`;
only when one changed does it read them. A newer generation is loaded and self-tested in a
thread while the old model keeps serving; then `batcher.classifier` is replaced between two
forward passes (`MicroBatcher._run` reads it once per batch), so every answer comes wholly from
one model. A model that fails to load here keeps the old one serving: one log line, counted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI

from digitflow.artifacts.refs import ServedModel
from digitflow.inference.classifier import Classifier
from digitflow.inference.selftest import SelfTestReport
from digitflow_fastapi import metrics
from digitflow_fastapi.deps import ModelService
from digitflow_fastapi.lifecycle import model_state
from digitflow_fastapi.lifecycle.model_state import DesiredModel
from digitflow_fastapi.readiness import Readiness

logger = logging.getLogger(__name__)

Loader = Callable[[ServedModel], tuple[Classifier, SelfTestReport]]


def desired_at_boot(folder: Path | None) -> DesiredModel | None:
    """The newest generation a (re)booting worker should serve, if the master keeps state."""
    return model_state.read_desired(folder) if folder is not None else None


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_ino, info.st_size


class ModelFollower:
    """Keeps one worker's model in step with the state folder."""

    def __init__(self, app: FastAPI, folder: Path, load: Loader, generation: int) -> None:
        self.app = app
        self.folder = folder
        self.load = load
        self.generation = generation
        self._failed_generation = -1
        self._stamps: dict[str, tuple[int, int, int] | None] = {}
        metrics.METRICS.model.generation = generation

    def _changed(self, name: str) -> bool:
        stamp = _stamp(self.folder / name)
        if stamp == self._stamps.get(name, ()):
            return False
        self._stamps[name] = stamp
        return True

    async def follow(self, every_s: float = 0.25) -> None:
        """Poll until cancelled."""
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the follower die: the old model keeps serving
                logger.exception("model follower: unexpected error; still serving")
            await asyncio.sleep(every_s)

    async def check(self) -> None:
        """Show new refusals; switch to a newer generation."""
        if self._changed(model_state.REFUSALS_FILE):
            self._show_refusals()
        if not self._changed(model_state.DESIRED_FILE):
            return
        desired = model_state.read_desired(self.folder)
        if desired is None or desired.generation <= self.generation:
            return
        if desired.generation == self._failed_generation:
            return
        await self._switch(desired)

    def _show_refusals(self) -> None:
        refusals = model_state.read_refusals(self.folder)
        metrics.METRICS.model.refused = refusals.count
        readiness: Readiness = self.app.state.readiness
        if refusals.last is not None:
            self.app.state.readiness = dataclasses.replace(
                readiness, last_refused_swap=refusals.last, refused_swaps=refusals.count
            )

    async def _switch(self, desired: DesiredModel) -> None:
        service: ModelService | None = self.app.state.service
        if service is None:
            return
        served = ServedModel(Path(desired.model_path), desired.model_uuid)
        try:
            classifier, report = await asyncio.to_thread(self.load, served)
        except Exception as exc:  # the master verified it; a failure here is local (disk, memory)
            self._failed_generation = desired.generation
            metrics.METRICS.model.load_failures += 1
            logger.error(
                "model swap: this worker could not load generation %d (%s): %s; still serving %s",
                desired.generation,
                desired.model_uuid,
                exc,
                service.model_uuid,
            )
            return
        old = service.model_uuid
        service.batcher.classifier = classifier  # the next forward pass uses it
        service.model_uuid = desired.model_uuid
        self.generation = desired.generation
        previous: Readiness = self.app.state.readiness
        self.app.state.readiness = dataclasses.replace(
            Readiness.serving(desired.model_uuid, report, classifier.backend),
            model_generation=desired.generation,
            last_refused_swap=previous.last_refused_swap,
            refused_swaps=previous.refused_swaps,
        )
        metrics.METRICS.model.uuid = desired.model_uuid
        metrics.METRICS.model.generation = desired.generation
        metrics.METRICS.model.swaps = desired.generation
        logger.info(
            "model swap: now serving %s (generation %d, was %s)",
            desired.model_uuid,
            desired.generation,
            old,
        )
