"""X-Forwarded-For is believed only from the proxies FORWARDED_ALLOW_IPS names (none by default),
against the seed's gunicorn command: a client cannot pick the address its rate limit counts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.gunicorn_server import TrainedModel, serve
from tests.support.processes import ServerProcess

pytestmark = pytest.mark.slow  # starts real servers


def _statuses(server: ServerProcess, count: int) -> list[int]:
    """`count` requests from 127.0.0.1, each claiming another client address."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        return [
            client.get(
                "/api/v1/model/version", headers={"X-Forwarded-For": f"203.0.113.{n}"}
            ).status_code
            for n in range(1, count + 1)
        ]


@pytest.fixture
def limited(
    trained_model: TrainedModel, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[ServerProcess]:
    extra = {"RATE_LIMIT": "3/minute", **getattr(request, "param", {})}
    yield from serve(tmp_path / "g.log", trained_model, extra)


def test_a_forwarded_address_does_not_buy_a_fresh_rate_limit_bucket(
    limited: ServerProcess,
) -> None:
    assert _statuses(limited, 6) == [200, 200, 200, 429, 429, 429]


@pytest.mark.parametrize("limited", [{"FORWARDED_ALLOW_IPS": "127.0.0.1"}], indirect=True)
def test_a_proxy_named_in_forwarded_allow_ips_is_believed(limited: ServerProcess) -> None:
    assert _statuses(limited, 6) == [200] * 6
