"""The edge's pure parts: settings parsing, key checks, the token bucket, CORS, request ids."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from digitflow.errors import ConfigError
from digitflow.logging_setup import JsonFormatter, RequestIdFilter, current_request_id
from digitflow_fastapi.app import create_app
from digitflow_fastapi.config import Settings, get_settings
from digitflow_fastapi.edge.body_cap import check_declared_length, check_received_bytes
from digitflow_fastapi.edge.cors import CorsPolicy
from digitflow_fastapi.edge.keys import KeyChecker, presented_key
from digitflow_fastapi.edge.rate_limit import RateLimiter
from digitflow_fastapi.edge.request_log import RequestIds, loggable
from digitflow_fastapi.edge.routing import RoutePolicy, RouteTable
from digitflow_fastapi.errors import RequestError

KEY = "test-key-0123456789abcdef"


def settings_error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError) as caught:
            get_settings()
    finally:
        get_settings.cache_clear()
    return str(caught.value)


def test_keys_come_from_the_list_and_the_file_without_blanks_comments_or_repeats(
    tmp_path: Path,
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# team A\n{KEY}\n\nfile-key-0123456789abcdef\n")
    settings = Settings(API_KEYS=f" {KEY} ,other-key-0123456789", API_KEYS_FILE=keys_file)
    assert settings.api_keys() == (KEY, "other-key-0123456789", "file-key-0123456789abcdef")
    assert Settings().api_keys() == ()


def test_a_short_key_is_refused_in_one_line_that_does_not_repeat_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = settings_error(monkeypatch, API_KEYS=f"{KEY},short-secret")
    assert "API_KEYS" in message and "key #2" in message and "\n" not in message
    assert "short-secret" not in message


def test_an_unreadable_keys_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    message = settings_error(monkeypatch, API_KEYS_FILE=str(tmp_path / "missing"))
    assert "API_KEYS_FILE" in message and "missing" in message


def test_a_wildcard_origin_with_credentials_is_refused_at_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = settings_error(monkeypatch, CORS_ORIGINS="*", CORS_ALLOW_CREDENTIALS="true")
    assert "CORS_ORIGINS" in message and "\n" not in message


def test_bad_origins_and_rate_limits_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "not an origin" in settings_error(monkeypatch, CORS_ORIGINS="https://a.example/path")
    monkeypatch.delenv("CORS_ORIGINS")
    assert "RATE_LIMIT" in settings_error(monkeypatch, RATE_LIMIT="100/fortnight")


def test_a_key_is_read_from_x_api_key_first_then_a_bearer_token() -> None:
    assert presented_key({b"x-api-key": b" k1 ", b"authorization": b"Bearer k2"}) == b"k1"
    assert presented_key({b"authorization": b"bearer k2"}) == b"k2"
    assert presented_key({b"authorization": b"Basic k2"}) is None
    assert presented_key({}) is None


def test_the_key_checker_answers_401_without_a_key_403_with_a_wrong_one() -> None:
    checker = KeyChecker([KEY, "second-key-0123456789"])
    missing = checker.refusal(None)
    assert missing is not None and missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = checker.refusal(b"nope")
    assert wrong is not None and wrong.status_code == 403
    assert checker.refusal(b"second-key-0123456789") is None


def _policy(table: RouteTable, method: str, path: str, root_path: str = "") -> RoutePolicy:
    scope = {"type": "http", "method": method, "path": root_path + path, "root_path": root_path}
    return table.policy(scope)


@pytest.mark.parametrize("root_path", ["", "/digitflow"])
def test_only_the_probes_docs_and_page_are_open_and_every_other_route_is_keyed(
    root_path: str,
) -> None:
    table = RouteTable(create_app(Settings()).router.routes)
    keyed = [
        ("POST", "/api/v1/model/predict"),
        ("GET", "/api/v1/model/version"),
        ("POST", "/v2/models/mnist/infer"),
        ("POST", "/v2/models/mnist/versions/abc/infer"),
        ("GET", "/v2/models/mnist"),
        ("GET", "/v2"),
        ("POST", "/invocations"),
        ("GET", "/metrics"),
        ("GET", "/version"),
        ("GET", "/no/such/route"),
        ("POST", "/health"),  # the wrong method reaches no endpoint: keyed too
    ]
    for method, path in keyed:
        assert not _policy(table, method, path, root_path).open, (method, path)
    for path in ("/health", "/ready", "/docs", "/openapi.json", "/v2/health/ready", "/ping", "/"):
        assert _policy(table, "GET", path, root_path).open, path
    assert _policy(table, "GET", "/static/app.js", root_path).open


def test_the_model_posts_are_fast_with_their_path_params_and_nothing_else_is() -> None:
    table = RouteTable(create_app(Settings()).router.routes)
    versioned = _policy(table, "POST", "/v2/models/mnist/versions/abc/infer")
    assert versioned.fast is not None
    assert versioned.path_params == {"name": "mnist", "version": "abc"}
    for path in ("/api/v1/model/predict", "/invocations", "/v2/models/other/infer"):
        assert _policy(table, "POST", path).fast is not None, path
    assert _policy(table, "GET", "/api/v1/model/version").fast is None
    assert _policy(table, "GET", "/api/v1/model/predict").fast is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_count_then_refuses_with_retry_after_until_it_refills() -> None:
    clock = Clock()
    limiter = RateLimiter(3, 60.0, max_clients=10, clock=clock)
    assert [limiter.refusal("a") for _ in range(3)] == [None, None, None]
    refused = limiter.refusal("a")
    assert refused is not None and refused.status_code == 429
    assert refused.headers["retry-after"] == "20"  # one token every 20 s
    assert limiter.refusal("b") is None  # another client has its own bucket
    clock.now += 20.0
    assert limiter.refusal("a") is None
    assert limiter.refusal("a") is not None


def test_buckets_stay_bounded_by_evicting_the_least_recently_seen_client() -> None:
    limiter = RateLimiter(1, 1.0, max_clients=100, clock=Clock())
    for client in range(10_000):
        limiter.refusal(client)
    assert len(limiter) == 100


def test_cors_allows_listed_origins_only_and_never_sends_credentials_with_a_wildcard() -> None:
    policy = CorsPolicy(["https://app.example"], allow_credentials=True)
    allowed = dict(policy.response_headers(b"https://app.example"))
    assert allowed[b"access-control-allow-origin"] == b"https://app.example"
    assert allowed[b"access-control-allow-credentials"] == b"true"
    assert b"access-control-allow-origin" not in dict(policy.response_headers(b"https://x.example"))
    refused = policy.preflight(b"https://x.example", {b"access-control-request-method": b"POST"})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    anyone = CorsPolicy(["*"], allow_credentials=False)
    headers = dict(anyone.response_headers(b"https://x.example"))
    assert headers[b"access-control-allow-origin"] == b"*"
    assert b"access-control-allow-credentials" not in headers
    with pytest.raises(ValueError, match="credentials"):
        CorsPolicy(["*"], allow_credentials=True)


def test_a_valid_incoming_request_id_is_kept_and_anything_else_replaced() -> None:
    ids = RequestIds()
    assert ids.take(b"abc.DEF_1:2-3") == ("abc.DEF_1:2-3", None)
    for bad in (b"", b"x" * 129, b"has space", b"new\nline", "é".encode()):
        made, rejected = ids.take(bad)
        assert made != bad.decode("latin-1") and rejected is not None
        assert "\n" not in rejected
    first, second = ids.new(), ids.new()
    assert first != second and first.split("-")[0] == second.split("-")[0]


def test_a_forked_worker_makes_ids_its_parent_never_makes() -> None:
    ids = RequestIds()
    parent = ids.new()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one id down the pipe, then out without running pytest's exit
        os.write(write_end, ids.new().encode())
        os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 100).decode()
    os.waitpid(pid, 0)
    os.close(read_end)
    assert child.split("-")[0] != parent.split("-")[0]
    assert ids.new().split("-")[0] == parent.split("-")[0]


def test_client_strings_are_truncated_and_escaped_before_logging() -> None:
    assert loggable("/api/v1/model/predict") == "/api/v1/model/predict"
    assert loggable("/a\nb\x1b[31m") == "/a\\nb\\x1b[31m"
    assert len(loggable("/" + "x" * 5000)) == 200


def test_every_line_logged_while_a_request_is_handled_carries_its_id() -> None:
    record = logging.LogRecord("digitflow.x", logging.INFO, __file__, 1, "inside", (), None)
    token = current_request_id.set("req-42")
    try:
        assert RequestIdFilter().filter(record)
    finally:
        current_request_id.reset(token)
    payload = json.loads(JsonFormatter().format(record))
    assert payload["request_id"] == "req-42" and payload["message"] == "inside"
    outside = logging.LogRecord("digitflow.x", logging.INFO, __file__, 1, "outside", (), None)
    RequestIdFilter().filter(outside)
    assert "request_id" not in json.loads(JsonFormatter().format(outside))


def test_the_body_cap_refuses_a_body_one_byte_over_with_413_naming_the_setting() -> None:
    check_received_bytes(100, 100)
    with pytest.raises(RequestError) as refused:
        check_received_bytes(101, 100)
    assert (refused.value.status_code, refused.value.detail) == (
        413,
        "request body exceeds MAX_UPLOAD_BYTES (100)",
    )


@pytest.mark.parametrize(
    ("declared", "status"), [(b"101", 413), (b"-1", 400), (b"ten", 400), (b"100", None)]
)
def test_a_declared_length_over_the_cap_or_invalid_is_refused_and_closes(
    declared: bytes, status: int | None
) -> None:
    if status is None:
        check_declared_length(declared, 100)
        return
    with pytest.raises(RequestError) as refused:
        check_declared_length(declared, 100)
    assert refused.value.status_code == status
    assert refused.value.headers == {"Connection": "close"}
