"""API keys, rate limit, CORS and the Authorize button, against the real gunicorn server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright

from tests.support.gunicorn_server import TrainedModel, serve, start_gunicorn
from tests.support.processes import ServerProcess, stop_process

pytestmark = pytest.mark.slow  # starts a real server and trains a model

KEY = "team-a-key-0123456789abcdef"
FILE_KEY = "team-b-key-from-the-file-0123"
LIMITED_KEY = "rate-limited-key-0123456789"
METRICS_KEY = "prometheus-key-0123456789"
ORIGIN = "https://app.example"
PREDICT = "/api/v1/model/predict"
LIMIT = 20
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def server(
    trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("access")
    keys_file = folder / "keys"
    keys_file.write_text(f"# one key a line\n{FILE_KEY}\n{LIMITED_KEY}\n")
    env = {
        "API_KEYS": f"{KEY},{METRICS_KEY}",
        "API_KEYS_FILE": str(keys_file),
        "CORS_ORIGINS": f"{ORIGIN},http://localhost:3000",
        "RATE_LIMIT": f"{LIMIT}/minute",
        "REQUEST_LOG": "true",  # so that the keys could reach the log if anything leaked them
    }
    yield from serve(folder / "gunicorn.log", trained_model, env)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def png(data_dir: Path) -> bytes:
    return sorted((data_dir / "test" / "3").glob("*.png"))[0].read_bytes()


def test_model_routes_without_a_key_get_401_with_www_authenticate(
    client: httpx.Client, png: bytes
) -> None:
    answers = [
        client.post(PREDICT, files={"image_file": ("a.png", png)}),
        client.get("/api/v1/model/version"),
        client.get("/v2/models/mnist"),
        client.post("/v2/models/mnist/infer", json={"inputs": []}),
        client.post("/invocations", json={"instances": []}),
        client.get("/metrics"),
    ]
    for answer in answers:
        assert answer.status_code == 401, answer.request.url
        assert answer.headers["www-authenticate"] == "Bearer"
        assert "API key" in answer.json()["detail"]
        assert answer.headers["x-request-id"]


def test_a_wrong_key_gets_403_in_either_header(client: httpx.Client) -> None:
    for headers in ({"X-API-Key": "wrong-key-0123456789"}, {"Authorization": "Bearer wrong"}):
        r = client.get("/api/v1/model/version", headers=headers)
        assert r.status_code == 403 and r.json() == {"detail": "the API key is not valid"}


def test_a_known_key_in_either_header_or_from_the_file_is_served(
    client: httpx.Client, png: bytes, trained_model: TrainedModel
) -> None:
    r = client.post(PREDICT, files={"image_file": ("a.png", png)}, headers={"X-API-Key": KEY})
    assert r.status_code == 200 and r.json()["data"][0]["prediction"] == "3"
    bearer = {"Authorization": f"Bearer {FILE_KEY}"}
    r = client.get("/api/v1/model/version", headers=bearer)
    assert r.json() == {"data": {"model_uuid": trained_model.run_id}}


def test_health_ready_docs_and_the_schema_stay_open(client: httpx.Client) -> None:
    for path in ("/health", "/ready", "/docs", "/openapi.json", "/v2/health/ready"):
        assert client.get(path).status_code == 200, path


def test_the_schema_declares_both_key_schemes_on_the_model_routes_only(
    client: httpx.Client,
) -> None:
    schema = client.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["APIKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["HTTPBearer"]["scheme"] == "bearer"
    predict = schema["paths"][PREDICT]["post"]
    assert predict["security"] == [{"APIKeyHeader": []}, {"HTTPBearer": []}]
    assert {"401", "403", "429"} <= set(predict["responses"])
    assert "security" in schema["paths"]["/metrics"]["get"]
    assert "security" not in schema["paths"]["/health"]["get"]


def test_keys_never_reach_the_log(server: ServerProcess, client: httpx.Client) -> None:
    client.get("/api/v1/model/version", headers={"X-API-Key": "wrong-key-never-logged-123"})
    client.get("/api/v1/model/version", headers={"X-API-Key": KEY})
    time.sleep(0.5)
    log = server.log()
    assert '"status":403' in log
    for secret in (KEY, FILE_KEY, LIMITED_KEY, "wrong-key-never-logged-123"):
        assert secret not in log


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_client_over_the_rate_limit_gets_429_with_retry_after_and_it_shows_in_metrics(
    client: httpx.Client, png: bytes
) -> None:
    assert client.post(PREDICT, files={"image_file": ("a.png", png)}).status_code == 401
    assert client.get("/metrics", headers={"X-API-Key": "wrong-key-0123456789"}).status_code == 403
    limited = {"X-API-Key": LIMITED_KEY}
    # One keep-alive connection: one worker, whose bucket holds LIMIT tokens for this key.
    with httpx.Client(base_url=client.base_url, timeout=30) as one:
        statuses = [
            one.get("/api/v1/model/version", headers=limited).status_code for _ in range(40)
        ]
        refused = one.get("/api/v1/model/version", headers=limited)
    assert statuses[:LIMIT] == [200] * LIMIT and 429 in statuses
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert "RATE_LIMIT" in refused.json()["detail"]
    assert client.get("/api/v1/model/version", headers={"X-API-Key": KEY}).status_code == 200
    deadline = time.monotonic() + 10
    while True:  # the other worker publishes its totals every second
        text = client.get("/metrics", headers={"X-API-Key": METRICS_KEY}).text
        counts = {
            s: metric(text, f'digitflow_refused_requests_total{{status="{s}"}}')
            for s in (401, 403, 429)
        }
        if all(counts.values()) or time.monotonic() > deadline:
            break
        time.sleep(1.0)  # at most ~10 scrapes: METRICS_KEY stays under the limit
    assert counts[429] >= 1 and counts[401] >= 1 and counts[403] >= 1
    assert metric(text, 'digitflow_predict_requests_total{status="401"}') >= 1


def test_a_preflight_from_a_listed_origin_gets_the_allow_headers(client: httpx.Client) -> None:
    r = client.options(
        PREDICT,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key",
        },
    )
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "X-API-Key" in r.headers["access-control-allow-headers"]
    assert "access-control-allow-credentials" not in r.headers


def test_a_preflight_from_an_unknown_origin_gets_no_allow_header(client: httpx.Client) -> None:
    r = client.options(
        PREDICT, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert r.status_code == 400
    assert not any(name.startswith("access-control-allow") for name in r.headers)


def test_the_hot_predict_path_answers_a_listed_origin_with_cors_headers_errors_too(
    client: httpx.Client, png: bytes
) -> None:
    files = {"image_file": ("a.png", png)}
    ok = client.post(PREDICT, files=files, headers={"Origin": ORIGIN, "X-API-Key": KEY})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "X-Request-ID" in ok.headers["access-control-expose-headers"]
    denied = client.post(PREDICT, files=files, headers={"Origin": ORIGIN})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN
    other = client.post(
        PREDICT, files=files, headers={"Origin": "https://evil.example", "X-API-Key": KEY}
    )
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_the_docs_page_has_an_authorize_button_that_makes_try_it_out_work(
    server: ServerProcess, tmp_path: Path
) -> None:
    if not CHROMIUM.is_file():
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            page.goto(server.url + "/docs")
            authorize = page.locator("button.authorize")
            authorize.wait_for(timeout=30_000)
            authorize.click()
            dialog = page.locator(".dialog-ux")
            dialog.wait_for()
            assert "APIKeyHeader" in dialog.inner_text() and "HTTPBearer" in dialog.inner_text()
            dialog.locator("input").first.fill(KEY)
            dialog.locator("button.authorize").first.click()
            page.screenshot(path=tmp_path / "authorize.png")
            dialog.locator("button.btn-done").first.click()
            operation = page.locator("#operations-model-version_api_v1_model_version_get")
            operation.locator(".opblock-summary").click()
            operation.locator("button.try-out__btn").click()
            operation.locator("button.execute").click()
            status = operation.locator(".live-responses-table tbody .response-col_status").first
            status.wait_for(timeout=30_000)
            assert status.inner_text().strip() == "200"
        finally:
            browser.close()


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"CORS_ORIGINS": "*", "CORS_ALLOW_CREDENTIALS": "true"}, "CORS_ORIGINS='*' cannot"),
        ({"API_KEYS": "short-secret"}, "key #1 in API_KEYS"),
        ({"RATE_LIMIT": "lots/second"}, "RATE_LIMIT"),
    ],
)
def test_the_server_refuses_a_bad_edge_setting_at_start_up_with_one_line(
    trained_model: TrainedModel, tmp_path: Path, env: dict[str, str], words: str
) -> None:
    server = start_gunicorn(
        tmp_path / "g.log", {"PRED_MODEL_PATH": str(trained_model.model_path), **env}, workers=1
    )
    try:
        returncode = server.process.wait(timeout=120)
    finally:
        stop_process(server)
    log = server.log()
    assert returncode != 0 and words in log
    assert "Traceback" not in log
    assert "short-secret" not in log
