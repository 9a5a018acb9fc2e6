"""What `/ready` reports: whether this worker can answer predictions, and why not."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from digitflow.selftest import SelfTestReport


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
    golden_file: str | None = None
    model_generation: int | None = None
    refused_swaps: int | None = None
    last_refused_swap: dict[str, str] | None = None

    @classmethod
    def serving(cls, model_uuid: str, report: SelfTestReport) -> Readiness:
        """Loaded, warmed up and (when there was a golden file) self-tested."""
        return cls(
            ready=True,
            model_loaded=True,
            model_uuid=model_uuid,
            self_test="passed" if report.golden_file is not None else None,
            warmed_up=report.warmed_up,
            golden_checked=report.golden_checked,
            golden_file=str(report.golden_file) if report.golden_file is not None else None,
        )

    @classmethod
    def self_test_failed(cls, model_uuid: str, detail: str) -> Readiness:
        """Loaded but disagreeing with its run's golden answers: up, never ready."""
        return cls(False, True, model_uuid, self_test="failed", detail=detail)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


NOT_LOADED = Readiness(ready=False, model_loaded=False)
