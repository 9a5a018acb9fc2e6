"""What `/ready` reports: whether this worker can answer predictions, and why not.

A probe (kubelet, load balancer) needs only the first: `probe_view`. The rest (self-test,
warm-up, swap refusals and their reasons) is for operators: `as_dict`, shown when no API keys
are set or the request carries a valid key (see `health.ready`). No file paths in either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from digitflow.inference.selftest import SelfTestReport


@dataclass(frozen=True)
class Readiness:
    """A worker's readiness; `as_dict` is the `/ready` body (unset fields left out)."""

    ready: bool
    model_loaded: bool
    model_uuid: str | None = None
    self_test: Literal["passed", "failed"] | None = None
    detail: str | None = None
    warmed_up: bool | None = None
    golden_checked: int | None = None
    engine: str | None = None
    model_generation: int | None = None
    refused_swaps: int | None = None
    last_refused_swap: dict[str, str] | None = None

    @classmethod
    def serving(cls, model_uuid: str, report: SelfTestReport, engine: str) -> Readiness:
        """Loaded, warmed up and (when there was a golden file) self-tested; `engine` names what
        runs the forward pass (`onnx`, `onnx-int8` or `torch`)."""
        return cls(
            ready=True,
            model_loaded=True,
            model_uuid=model_uuid,
            self_test="passed" if report.golden_file is not None else None,
            warmed_up=report.warmed_up,
            golden_checked=report.golden_checked,
            engine=engine,
        )

    @classmethod
    def self_test_failed(cls, model_uuid: str, detail: str) -> Readiness:
        """Loaded but disagreeing with its run's golden answers: up, never ready."""
        return cls(False, True, model_uuid, self_test="failed", detail=detail)

    def as_dict(self) -> dict[str, Any]:
        """Everything known (for operators), unset fields left out."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def probe_view(self) -> dict[str, Any]:
        """What an open probe needs: ready or not, and which model."""
        view: dict[str, Any] = {"ready": self.ready}
        if self.model_uuid is not None:
            view["model_uuid"] = self.model_uuid
        return view


NOT_LOADED = Readiness(ready=False, model_loaded=False)
