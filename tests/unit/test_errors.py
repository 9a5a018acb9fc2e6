"""Core errors: their text never carries the credentials of a URL."""

from __future__ import annotations

import pytest

from digitflow.artifacts.tracking import probe_server
from digitflow.errors import TrackingUnavailable, redact_credentials
from tests.support.processes import free_port


def test_userinfo_in_any_url_is_redacted_and_other_text_is_kept() -> None:
    text = "server http://ann:s3cret@host:5000/x, token https://tok@x.io and s3://bucket/path"
    assert redact_credentials(text) == (
        "server http://***@host:5000/x, token https://***@x.io and s3://bucket/path"
    )


def test_an_unreachable_tracking_url_with_credentials_is_reported_without_them() -> None:
    uri = f"http://ann:s3cret@127.0.0.1:{free_port()}"
    with pytest.raises(TrackingUnavailable) as caught:
        probe_server(uri, None, None, timeout=1.0)
    message = str(caught.value)
    assert "s3cret" not in message and "ann" not in message
    assert f"http://***@127.0.0.1:{uri.rsplit(':', 1)[1]}" in message
