"""The page at `/` and the offline `/docs`, in a real browser: Debian's chromium driven by Playwright.

Every page is watched: each request it makes is recorded, and any to a host but the server is aborted and fails
the test. Screenshots go to $NNSERVE_SCREENSHOTS (the README's come from `NNSERVE_SCREENSHOTS=docs/images`), else
to the system's temporary folder, so a test run leaves the checkout as it was.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, Request, Route, sync_playwright

from service import web
from tests.data import CIFAR10_CLASSES, data_dir, mnist_test, weather_2015
from tests.serving import RunningServer, running_server

CHROMIUM = Path(os.environ.get("NNSERVE_CHROMIUM", "/usr/bin/chromium"))
IMAGES = Path(os.environ.get("NNSERVE_SCREENSHOTS") or Path(tempfile.gettempdir()) / "nnserve-screenshots")
N_DIGITS = 50
MIN_DIGITS_RIGHT = 45  # 90 %
API_KEY = "web-test-key"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    IMAGES.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        # --no-sandbox: chromium refuses to start as root (containers, CI) with its sandbox on.
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield launched
        launched.close()


@dataclass
class Visit:
    """One browser tab on the server, with every request it made and every script error it raised."""

    page: Page
    origin: str
    requests: list[Request] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def outside(self) -> list[str]:
        return [r.url for r in self.requests if not r.url.startswith((self.origin + "/", "data:"))]

    def check_clean(self) -> None:
        assert self.outside() == [], f"the page asked other hosts: {self.outside()}"
        assert self.errors == [], f"script errors: {self.errors}"


def open_visit(browser: Browser, server: RunningServer, path: str = "/") -> Visit:
    origin = f"{urlsplit(server.url).scheme}://{urlsplit(server.url).netloc}"
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    visit = Visit(page, origin)
    page.on("request", lambda request: visit.requests.append(request))
    page.on("pageerror", lambda error: visit.errors.append(str(error)))

    def only_the_server(route: Route) -> None:
        if route.request.url.startswith(origin + "/"):
            route.continue_()
        else:
            route.abort()

    page.route("**/*", only_the_server)
    page.goto(server.url + path)
    return visit


@pytest.fixture
def visit(browser: Browser, server: RunningServer) -> Iterator[Visit]:
    opened = open_visit(browser, server)
    yield opened
    opened.page.close()


def draw_digit(page: Page, image: np.ndarray) -> None:
    """Trace a 28x28 MNIST digit as dark strokes on the pad: one stroke along each row's run of ink."""
    box = page.locator("#digit-canvas").bounding_box()
    assert box is not None
    cell = box["width"] / 28
    for y, row in enumerate(image >= 128):
        x = 0
        while x < 28:
            if not row[x]:
                x += 1
                continue
            end = x
            while end + 1 < 28 and row[end + 1]:
                end += 1
            top = box["y"] + (y + 0.5) * cell
            page.mouse.move(box["x"] + (x + 0.5) * cell, top)
            page.mouse.down()
            page.mouse.move(box["x"] + (end + 0.5) * cell, top, steps=max(1, end - x))
            page.mouse.up()
            x = end + 1


def pad_version(page: Page) -> int:
    return int(page.get_attribute("#digit-canvas", "data-version") or 0)


def shown_digit(page: Page, drawn_after: int) -> str:
    """The label shown once the answer for the final drawing (changed since version `drawn_after`) has arrived."""
    page.wait_for_function(
        """(after) => {
            const drawn = Number(document.querySelector('#digit-canvas').dataset.version);
            return drawn > after && String(drawn) === document.querySelector('#digit-result').dataset.version;
        }""",
        arg=drawn_after,
    )
    return page.inner_text("#digit-label")


def test_drawn_mnist_digits_are_recognised(visit: Visit) -> None:
    page = visit.page
    images, labels = mnist_test()
    right = 0
    wrong = []
    for i in range(N_DIGITS):
        page.click("#digit-clear")
        cleared = pad_version(page)
        draw_digit(page, images[i])
        shown = shown_digit(page, cleared)
        assert page.locator("#digit-error").is_hidden(), page.inner_text("#digit-error")
        bars = page.locator("#digit-bars .name").all_inner_texts()
        assert sorted(bars) == [str(d) for d in range(10)], f"digit {i}: the chart shows all ten probabilities"
        assert bars[0] == shown
        if shown == str(labels[i]):
            right += 1
        else:
            wrong.append((i, int(labels[i]), shown))
    print(f"drawn MNIST test digits recognised: {right}/{N_DIGITS}; wrong (index, true, shown): {wrong}")
    assert right >= MIN_DIGITS_RIGHT, f"{right}/{N_DIGITS} right; wrong (index, true, shown): {wrong}"
    visit.check_clean()


# A "2" as a person draws it: one stroke, curling over the top and ending in a flat base (fractions of the pad).
TWO = [
    (0.32, 0.33),
    (0.36, 0.24),
    (0.45, 0.19),
    (0.56, 0.19),
    (0.65, 0.25),
    (0.67, 0.34),
    (0.62, 0.45),
    (0.50, 0.57),
    (0.38, 0.69),
    (0.30, 0.79),
    (0.45, 0.79),
    (0.60, 0.79),
    (0.72, 0.79),
]


def test_a_hand_drawn_stroke_is_recognised(visit: Visit) -> None:
    page = visit.page
    start = pad_version(page)
    box = page.locator("#digit-canvas").bounding_box()
    assert box is not None
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in TWO]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=5)
    page.mouse.up()
    assert shown_digit(page, start) == "2"
    assert float(page.inner_text("#digit-prob").rstrip("%")) > 90
    page.locator("#digits").screenshot(path=IMAGES / "web-digits.png")
    visit.check_clean()


def test_a_finger_draws_on_a_phone(browser: Browser, server: RunningServer) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
    page = context.new_page()
    page.goto(server.url + "/")
    start = pad_version(page)
    box = page.locator("#digit-canvas").bounding_box()
    assert box is not None
    touch = context.new_cdp_session(page)
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in TWO]
    touch.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": at[0][0], "y": at[0][1]}]})
    for x, y in at[1:]:
        touch.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y}]})
    touch.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    assert shown_digit(page, start) == "2"
    assert page.evaluate("window.scrollY") == 0, "drawing must not scroll the page"
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, "the page fits a phone's width"
    context.close()


def _cifar_files() -> list[Path]:
    root = data_dir() / "cifar10-subset" / "test"
    return [sorted((root / name).glob("*.png"))[k] for name in CIFAR10_CLASSES for k in (0, 1)]


def _photo_answer(page: Page) -> tuple[str, list[str], list[str]]:
    page.wait_for_selector('#photo-result[data-state="done"]')
    return (
        page.inner_text("#photo-label"),
        page.locator("#photo-bars .name").all_inner_texts(),
        page.locator("#photo-bars .pct").all_inner_texts(),
    )


def test_uploaded_cifar_photos_get_the_servers_answer(visit: Visit, server: RunningServer) -> None:
    page = visit.page
    files = _cifar_files()
    for path in files:
        page.evaluate("document.querySelector('#photo-result').dataset.state = ''")
        page.set_input_files("#photo-input", str(path))
        label, names, percents = _photo_answer(page)
        expected = httpx.post(
            f"{server.url}/v1/cifar/predict?top_k=5",
            content=path.read_bytes(),
            headers={"Content-Type": "image/png"},
        ).json()["predictions"][0]
        assert label == expected["label"], path
        assert names == [s["label"] for s in expected["top_k"]], path
        # Within a rounding step: the same image may share a batch with others, which moves the last digits.
        shown = [float(p.rstrip("%")) for p in percents]
        assert np.allclose(shown, [100 * s["probability"] for s in expected["top_k"]], atol=0.051), path
        # The 32x32 preview is exactly the image the model was given.
        seen = page.evaluate(
            "Array.from(document.querySelector('#photo-seen').getContext('2d').getImageData(0, 0, 32, 32).data)"
        )
        with Image.open(path) as im:
            original = np.asarray(im.convert("RGB"))
        assert np.array_equal(np.array(seen, np.uint8).reshape(32, 32, 4)[..., :3], original), path
    page.locator("#photo").screenshot(path=IMAGES / "web-cifar.png")
    print(f"{len(files)} CIFAR-10 test photos: the page showed the server's own top-5 for each")
    visit.check_clean()


def test_a_dropped_photo_is_classified(visit: Visit, server: RunningServer) -> None:
    page = visit.page
    path = _cifar_files()[-1]
    transfer = page.evaluate_handle(
        """(bytes) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([new Uint8Array(bytes)], "dropped.png", { type: "image/png" }));
            return transfer;
        }""",
        list(path.read_bytes()),
    )
    page.dispatch_event("#photo-drop", "drop", {"dataTransfer": transfer})
    label, _, _ = _photo_answer(page)
    expected = httpx.post(
        f"{server.url}/v1/cifar/predict", content=path.read_bytes(), headers={"Content-Type": "image/png"}
    ).json()["predictions"][0]["label"]
    assert label == expected
    visit.check_clean()


def test_a_photo_shrinks_to_what_the_model_sees(visit: Visit, server: RunningServer) -> None:
    """A large photo is sent as the 32x32 shown, so its answer is the server's for that 32x32 image."""
    page = visit.page
    with Image.open(_cifar_files()[4]) as im:
        big = im.convert("RGB").resize((640, 480), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=92)
    page.set_input_files("#photo-input", {"name": "big.jpg", "mimeType": "image/jpeg", "buffer": buffer.getvalue()})
    label, _, _ = _photo_answer(page)
    seen = page.evaluate(
        "Array.from(document.querySelector('#photo-seen').getContext('2d').getImageData(0, 0, 32, 32).data)"
    )
    pixels = np.array(seen, np.uint8).reshape(32, 32, 4)[..., :3].tolist()
    expected = httpx.post(f"{server.url}/v1/cifar/predict", json={"instances": [pixels]}).json()
    assert label == expected["predictions"][0]["label"]
    visit.check_clean()


def test_unreadable_photo_is_reported(visit: Visit) -> None:
    page = visit.page
    page.set_input_files("#photo-input", {"name": "notes.png", "mimeType": "image/png", "buffer": b"not a png"})
    page.wait_for_selector("#photo-error:not([hidden])")
    assert "notes.png is not an image" in page.inner_text("#photo-error")
    visit.check_clean()


def test_bundled_sample_is_seattle_2015() -> None:
    sample = json.loads((web.PAGE_DIR / "seattle-2015.json").read_text())
    assert sample["start"] == "2015-01-01"
    assert "NOAA" in sample["source"]
    assert np.allclose(sample["values"], weather_2015(), atol=0.051)


def test_forecast_of_the_bundled_sample(visit: Visit, server: RunningServer) -> None:
    page = visit.page
    page.click("#series-sample")
    page.wait_for_function("document.querySelector('#series-input').value.length > 0")
    page.click("#series-run")
    page.wait_for_selector("#forecast-values li")
    history = json.loads((web.PAGE_DIR / "seattle-2015.json").read_text())["values"]
    expected = httpx.post(f"{server.url}/v1/sequence/predict", json={"series": history}).json()
    forecast = expected["predictions"][0]["forecast"]
    shown = page.locator("#forecast-values li span").all_inner_texts()
    assert all(len(text.split(".")[1]) == 1 for text in shown)
    # Equal to the shown precision: batching may move the API's last digits between two calls.
    assert np.allclose([float(text) for text in shown], forecast, atol=0.051)
    points = page.get_attribute("#forecast-line", "points")
    assert points is not None and len(points.split()) == len(forecast) + 1  # joined to the last known day
    history_points = page.get_attribute("#history-line", "points")
    assert history_points is not None and len(history_points.split()) > 1
    # The line rises where the forecast rises: SVG y grows downwards.
    ys = [float(p.split(",")[1]) for p in points.split()[1:]]
    assert all((ya > yb) == (a < b) for ya, yb, a, b in zip(ys, ys[1:], forecast, forecast[1:], strict=False) if a != b)
    page.locator("#forecast").screenshot(path=IMAGES / "web-forecast.png")
    visit.check_clean()


def test_forecast_errors_are_readable(visit: Visit) -> None:
    page = visit.page
    page.fill("#series-input", "8.5, 9, warm")
    page.click("#series-run")
    page.wait_for_selector("#forecast-error:not([hidden])")
    assert '"warm" is not a number' in page.inner_text("#forecast-error")
    page.fill("#series-input", "8.5 9 10")
    page.click("#series-run")
    page.wait_for_function("document.querySelector('#forecast-error').textContent.includes('invalid_series')")
    assert "series of 3 values" in page.inner_text("#forecast-error")
    assert page.locator("#forecast-line").count() == 0
    visit.check_clean()


def test_model_list(visit: Visit, server: RunningServer) -> None:
    page = visit.page
    page.wait_for_selector("#models-body tr")
    models = httpx.get(f"{server.url}/v1/models").json()["models"]
    for model in models:
        cells = page.locator(f'#models-body tr[data-model="{model["name"]}"] td').all_inner_texts()
        assert cells[:4] == [model["name"], model["version"], model["backend"], model["device"]]
        first = next(m for m in model["manifest"]["metrics"] if "validation" not in m["split"])
        assert f"{first['name']} {round(first['value'], 4):g}" in cells[5]
    assert page.get_attribute("a[href='/docs']", "href") == "/docs"
    visit.check_clean()


def test_docs_render_offline(visit: Visit, server: RunningServer) -> None:
    page = visit.page
    page.goto(server.url + "/docs")
    page.wait_for_selector(".opblock")
    # Swagger UI breaks long paths with zero-width spaces.
    paths = {p.replace("\u200b", "") for p in page.locator(".opblock-summary-path").all_inner_texts()}
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert paths == set(spec["paths"])
    assert {"/v1/digits/predict", "/v1/cifar/predict", "/v1/sequence/predict", "/v1/models"} <= paths
    assert spec["info"]["title"] == "nnserve"
    page.screenshot(path=IMAGES / "web-docs.png")
    visit.check_clean()


def test_the_page_works_with_an_api_key(browser: Browser) -> None:
    with running_server(NNSERVE_API_KEY=API_KEY) as server:
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        for path in (
            "/",
            "/ui/app.js",
            "/ui/seattle-2015.json",
            "/docs",
            "/openapi.json",
            "/ui/swagger/swagger-ui.css",
        ):
            assert httpx.get(server.url + path).status_code == 200, f"{path} needs no key"
        visit = open_visit(browser, server)
        page = visit.page
        page.wait_for_selector("#models-error:not([hidden])")
        assert "Enter the API key" in page.inner_text("#models-error")
        page.fill("#api-key", API_KEY)
        page.press("#api-key", "Enter")
        page.wait_for_selector("#models-body tr")
        assert page.locator("#models-error").is_hidden()
        assert page.evaluate("sessionStorage.getItem('nnserve.apiKey')") == API_KEY
        assert page.evaluate("localStorage.length") == 0
        images, labels = mnist_test()
        start = pad_version(page)
        draw_digit(page, images[0])
        assert shown_digit(page, start) == str(labels[0])
        assert page.locator("#digit-error").is_hidden()
        sent = [r for r in visit.requests if urlsplit(r.url).path == "/v1/digits/predict"]
        assert sent and all(r.headers.get("x-api-key") == API_KEY for r in sent)
        page.goto(server.url + "/docs")  # the docs page and its files load without the key
        page.wait_for_selector(".opblock")
        visit.check_clean()
        visit.page.close()


def test_swagger_ui_tries_a_route_with_the_api_key(browser: Browser) -> None:
    """The document's security schemes give /docs an Authorize button; "Try it out" then sends the key."""
    with running_server(NNSERVE_API_KEY=API_KEY) as server:
        visit = open_visit(browser, server, "/docs")
        page = visit.page
        page.click("button.authorize")
        key_input = page.locator(".auth-container", has_text="X-API-Key").locator("input")
        key_input.fill(API_KEY)
        page.locator(".auth-container", has_text="X-API-Key").locator("button.authorize").click()
        page.click("button.btn-done")
        page.click("#operations-models-list_models_v1_models_get .opblock-summary")
        page.click("#operations-models-list_models_v1_models_get button.try-out__btn")
        page.click("#operations-models-list_models_v1_models_get button.execute")
        live = "#operations-models-list_models_v1_models_get .live-responses-table tbody .response-col_status"
        page.wait_for_selector(live)
        assert page.inner_text(live).strip() == "200"
        sent = [r for r in visit.requests if urlsplit(r.url).path == "/v1/models"]
        assert sent and sent[-1].headers.get("x-api-key") == API_KEY
        page.screenshot(path=IMAGES / "web-docs-authorized.png", full_page=False)
        visit.check_clean()
        page.close()
