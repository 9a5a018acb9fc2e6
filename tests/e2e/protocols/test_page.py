"""The page at `/` in headless Chromium (Debian's, via Playwright) against real gunicorn."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright

from digitflow.inference.preprocess import bytes_to_input
from tests.support.gunicorn_server import TrainedModel, serve
from tests.support.processes import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PREDICT = "/api/v1/model/predict"
READY = "html[data-ready='true']"  # app.js sets it once every handler is wired

pytestmark = pytest.mark.slow  # starts a real server and trains a model
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def server(
    trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("page") / "gunicorn.log"
    yield from serve(log, trained_model, {"MAX_IMAGE_PIXELS": str(MAX_PIXELS)})


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser, server: ServerProcess) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    outside: list[str] = []
    page.on(
        "request",
        lambda r: (
            outside.append(r.url) if not r.url.startswith((server.url, "data:", "blob:")) else None
        ),
    )
    open_page(page, server.url + "/")
    try:
        yield page
    finally:
        context.close()
    assert outside == [], f"the page fetched from outside the app: {outside}"


@pytest.fixture(scope="module")
def test_pngs(data_dir: Path) -> list[tuple[Path, int]]:
    with (data_dir / "test.csv").open() as f:
        return [(data_dir / r["filepath"], int(r["label"])) for r in csv.DictReader(f)]


def open_page(page: Page, url: str) -> None:
    """Load the page and wait until app.js says its handlers are wired (not a network lull)."""
    page.goto(url)
    page.wait_for_selector(READY, state="attached", timeout=30_000)


def draw_one(page: Page) -> None:
    """A large, clear "1": one thick vertical stroke, drawn with pointer events."""
    box = page.locator("#pad").bounding_box()
    assert box is not None
    x = box["x"] + box["width"] * 0.5
    page.mouse.move(x, box["y"] + box["height"] * 0.15)
    page.mouse.down()
    page.mouse.move(x, box["y"] + box["height"] * 0.85, steps=20)
    page.mouse.up()


def pixels_drawn(page: Page, selector: str) -> int:
    """How many pixels of a canvas are not fully transparent / black."""
    return int(
        page.eval_on_selector(
            selector,
            """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                      let n = 0; for (let i = 0; i < d.length; i += 4)
                        if (d[i + 3] > 0 && (d[i] + d[i + 1] + d[i + 2]) > 0) n++;
                      return n; }""",
        )
    )


def test_a_one_drawn_with_pointer_events_is_predicted_as_1_with_its_input_and_bars(
    page: Page, tmp_path: Path
) -> None:
    draw_one(page)
    result = page.locator("li[data-source='drawing'][data-state='done']")
    result.wait_for(timeout=30_000)
    page.screenshot(path=tmp_path / "drawn-one.png", full_page=True)
    assert result.get_attribute("data-prediction") == "1"
    assert result.locator(".digit").inner_text() == "1"
    assert result.locator(".bars li").count() == 10
    assert result.locator(".bars li.top span").first.inner_text() == "1"
    assert pixels_drawn(page, "li[data-source='drawing'] canvas.seen") > 20  # the 28×28 input


def test_clear_empties_the_canvas_and_a_redrawn_digit_is_predicted_again(
    page: Page, tmp_path: Path
) -> None:
    draw_one(page)
    page.locator("li[data-source='drawing'][data-state='done']").wait_for(timeout=30_000)
    page.get_by_role("button", name="Clear", exact=True).click()
    page.screenshot(path=tmp_path / "cleared.png", full_page=True)
    assert pixels_drawn(page, "#pad") == 0
    assert page.locator("li[data-source='drawing']").count() == 0
    draw_one(page)
    page.locator("li[data-source='drawing'][data-state='done']").wait_for(timeout=30_000)
    assert page.locator("li[data-source='drawing']").count() == 1


def test_an_uploaded_test_png_shows_the_same_prediction_as_the_api(
    page: Page, server: ServerProcess, test_pngs: list[tuple[Path, int]], tmp_path: Path
) -> None:
    paths = [path for path, _ in test_pngs[:3]]
    api = httpx.post(
        server.url + PREDICT,
        params={"probabilities": "true"},
        files=[("image_file", (p.name, p.read_bytes(), "image/png")) for p in paths],
        timeout=60,
    ).json()["data"]
    page.set_input_files("#files", [str(p) for p in paths])
    done = page.locator("li[data-source='upload'][data-state='done']")
    done.nth(2).wait_for(timeout=30_000)
    page.screenshot(path=tmp_path / "uploaded.png", full_page=True)
    shown = {
        done.nth(i).locator(".name").inner_text(): done.nth(i).get_attribute("data-prediction")
        for i in range(3)
    }
    assert shown == {item["image_filename"]: item["prediction"] for item in api}
    cards = {done.nth(i).locator(".name").inner_text(): done.nth(i) for i in range(3)}
    for item in api:
        top = max(item["probabilities"])
        bar = cards[item["image_filename"]].locator(".bars li.top .pct").inner_text()
        assert bar == f"{top * 100:.1f}%"


def test_an_uploaded_text_file_shows_the_error_in_plain_words(page: Page, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list: milk, eggs\n")
    page.set_input_files("#files", str(notes))
    error = page.locator("li[data-source='upload'][data-state='error'] .error")
    error.wait_for(timeout=30_000)
    page.screenshot(path=tmp_path / "text-file-error.png", full_page=True)
    text = error.inner_text()
    assert "“notes.txt” is not an image the model can read" in text
    assert "PNG, JPEG, WebP, BMP or GIF" in text
    assert "notes.txt" in page.locator("#status").inner_text()


def test_an_image_over_the_pixel_limit_shows_that_it_is_too_large(
    page: Page, tmp_path: Path
) -> None:
    big = tmp_path / "poster.png"
    Image.new("L", (1500, 1000), 255).save(big)  # 1.5 megapixels, a few kB
    page.set_input_files("#files", str(big))
    error = page.locator("li[data-source='upload'][data-state='error'] .error")
    error.wait_for(timeout=30_000)
    page.screenshot(path=tmp_path / "too-large-error.png", full_page=True)
    assert "“poster.png” is too large for the server." in error.inner_text()
    assert f"the limit is {MAX_PIXELS}" in error.inner_text()


def test_the_footer_names_the_model_and_version_and_links_to_the_docs(
    page: Page, trained_model: TrainedModel
) -> None:
    assert page.locator("#model-uuid").inner_text() == trained_model.run_id
    assert page.locator("#app-version").inner_text() == "0.1.0"
    link = page.get_by_role("link", name="API documentation")
    assert link.get_attribute("href") == "/docs"


def test_the_page_fits_a_phone_screen_and_the_file_picker_opens_from_the_keyboard(
    browser: Browser, server: ServerProcess, tmp_path: Path
) -> None:
    context = browser.new_context(
        viewport={"width": 375, "height": 740}, has_touch=True, is_mobile=True
    )
    try:
        page = context.new_page()
        # Listen before the page loads. Playwright turns Chromium's file-chooser interception on
        # only when the first listener appears, with a message it does not wait for; subscribing
        # inside `expect_file_chooser` right before the key press let the press overtake it (the
        # key reached the page, which opened the picker, before interception was on: no event).
        # Subscribed here, interception is on before the page's later protocol round trips
        # (readiness, focus) return, so it is on when Enter is pressed.
        page.on("filechooser", lambda _: None)
        open_page(page, server.url + "/")
        page.screenshot(path=tmp_path / "phone.png", full_page=True)
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0
        page.locator("#drop").focus()
        with page.expect_file_chooser(timeout=30_000) as chooser:
            page.keyboard.press("Enter")
        assert chooser.value.is_multiple()
    finally:
        context.close()


def test_explain_returns_the_28x28_input_the_model_saw_and_a_bad_flag_is_a_422(
    server: ServerProcess, test_pngs: list[tuple[Path, int]]
) -> None:
    path = test_pngs[0][0]
    files = {"image_file": (path.name, path.read_bytes(), "image/png")}
    r = httpx.post(server.url + PREDICT, params={"explain": "true"}, files=files, timeout=30)
    assert r.status_code == 200
    item = r.json()["data"][0]
    grid = np.array(item["model_input"])
    assert grid.shape == (28, 28)
    np.testing.assert_allclose(grid, bytes_to_input(path.read_bytes()), atol=5e-4)
    plain = httpx.post(server.url + PREDICT, files=files, timeout=30).json()["data"][0]
    assert "model_input" not in plain and plain["prediction"] == item["prediction"]
    bad = httpx.post(server.url + PREDICT, params={"explain": "maybe"}, files=files, timeout=30)
    assert bad.status_code == 422
    assert bad.json()["detail"] == "query.explain: not a boolean: 'maybe'"
