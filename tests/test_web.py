"""The web page at GET /: served self-contained with its headers, and working in a real browser.

The browser test runs the real app on a loopback port and drives Debian's chromium through Playwright.
Set CLIP_SCREENSHOT=path to also save a screenshot of the page showing results (docs/web-page.png).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from clip_service.http.page import SECURITY_HEADERS
from tests.support.guard import require_system_test
from tests.support.http_fixtures import serve_app, stop_http
from tests.support.system import find_program, unavailable
from tests.support.trained_clip import COLOURS, draw_picture, write_labels

CHROMIUM = find_program("chromium")  # on the PATH, as .ci/run checks it


def test_page_is_self_contained_html_with_csp(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    assert response.headers["Content-Security-Policy"] == SECURITY_HEADERS["Content-Security-Policy"]
    assert "connect-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    policy = response.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    html = response.get_data(as_text=True)
    assert "<title>" in html and 'id="file"' in html and 'id="url"' in html
    lowered = html.lower()
    assert "<style" not in lowered and "<script>" not in lowered, "no inline code: the CSP forbids it"
    assert re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", lowered) == ["/static/page.css",
                                                                        "/static/page.js"]
    for name, mimetype in (("page.css", "text/css"), ("page.js", "text/javascript")):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and asset.mimetype == mimetype
        assert asset.headers["Content-Security-Policy"] == policy
        text = asset.get_data(as_text=True).lower()
        for forbidden in ("@import", "url(http", "url(//", "http://", "https://"):
            assert forbidden not in text, (name, forbidden)


def test_page_is_served_only_at_the_root(client):
    for path in ("/static/index.html", "/static/../web.py", "/static/%2e%2e%2fweb.py"):
        response = client.get(path)
        assert response.status_code == 404, path
    assert response.get_json()["status"] == "error"


@pytest.fixture
def live_url(app):
    server = serve_app(app)
    yield f"http://127.0.0.1:{server.server_port}/"
    stop_http(server)


@pytest.fixture
def page(live_url):
    """chromium (through Playwright) on the live page; the test fails on any script error."""
    require_system_test("chromium")
    if CHROMIUM is None:
        unavailable("no browser: chromium is not on the PATH (apt-get install chromium)")
    try:
        from playwright import sync_api
    except ImportError:
        unavailable("playwright is not installed (pip install -r requirements-dev.txt)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            # An HTTP error status or a refused request is logged too; those are expected, not bugs.
            page.on("console", lambda msg: errors.append(msg.text)
                    if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
            page.goto(live_url)
            yield page
            assert errors == []  # no script errors, no CSP violations
        finally:
            browser.close()


@pytest.fixture
def photo(tmp_path) -> Path:
    from PIL import Image
    from skimage import data

    path = tmp_path / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(path, quality=90)
    return path


def shown_time(seconds: float) -> str:
    """processing_time as the page writes it."""
    return f"{int(seconds * 1000 + 0.5)} ms" if seconds < 1 else f"{seconds:.2f} s"


@pytest.mark.system
def test_upload_shows_predictions_in_browser(page, photo):
    with page.expect_response("**/analyze") as answer:
        page.set_input_files("#file", str(photo))
    metadata = answer.value.json()["metadata"]
    rows = page.locator("#predictions li.row")
    rows.nth(9).wait_for(timeout=30_000)
    assert rows.count() == 10  # threshold 0 in the test settings, ten labels
    for i in range(10):
        row = rows.nth(i)
        assert row.locator(".label").inner_text().strip()
        assert re.fullmatch(r"\d+(\.\d+)?%", row.locator(".pct").inner_text().strip())
        assert re.fullmatch(r"\d+(\.\d+)?%", row.locator(".bar").evaluate("bar => bar.style.width"))
    cat = rows.filter(has=page.locator(".label", has_text=re.compile(r"^cat$")))
    assert cat.count() == 1
    assert cat.locator(".emoji").inner_text() == "🐱"
    model = metadata["model_info"]["model"]
    assert page.locator("#meta").inner_text() == (
        f"Model {model} (OpenCLIP) · on cpu · in {shown_time(metadata['processing_time'])}")
    assert page.locator("#preview").get_attribute("src").startswith("blob:")
    assert "chelsea.jpg" in page.locator("#preview").get_attribute("alt")
    assert page.locator("#status").inner_text().startswith("Most likely:")
    if shot := os.environ.get("CLIP_SCREENSHOT"):
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=shot, full_page=True)


@pytest.mark.system
def test_a_coloured_picture_is_named_by_its_colour_in_browser(page, make_app, settings, trained_model_dir,
                                                               tmp_path):
    """On the model trained to name colours (tests/support/trained_clip.py) the page names what it
    is shown."""
    labels = write_labels(tmp_path / "labels", {"colours": COLOURS})
    server = serve_app(make_app(dataclasses.replace(settings, clip_model=f"local-dir:{trained_model_dir}",
                                                    labels_dir=labels)))
    try:
        for colour, shape, seed in (("red", "circle", 80_000), ("blue", "square", 80_001)):
            path = tmp_path / f"{colour}.png"
            draw_picture(colour, shape, 200, seed=seed).save(path)
            page.goto(f"http://127.0.0.1:{server.server_port}/")  # a fresh page: no earlier result
            page.set_input_files("#file", str(path))
            page.locator("#status", has_text="Most likely:").wait_for(timeout=30_000)
            assert page.locator("#predictions li.row .label").first.inner_text().strip() == colour
            assert page.locator("#status").inner_text().startswith(f"Most likely: {colour} (")
    finally:
        stop_http(server)


@pytest.mark.system
def test_url_error_is_shown_in_plain_words(page):
    page.fill("#url", "http://127.0.0.1:9/x.jpg")
    page.click("#url-button")
    status = page.locator("#status.error")
    status.wait_for(timeout=30_000)
    text = status.inner_text()
    assert "loopback" in text and "not allowed" in text, text
    assert page.locator("#predictions li").count() == 0


@pytest.mark.system
def test_network_failure_is_shown_in_plain_words(page, live_url):
    page.route("**/analyze**", lambda route: route.abort("connectionrefused"))
    page.fill("#url", "https://example.com/cat.jpg")
    page.click("#url-button")
    status = page.locator("#status.error")
    status.wait_for(timeout=30_000)
    assert "Could not reach the service" in status.inner_text()


@pytest.mark.system
def test_api_key_is_asked_for_and_sent(page, make_app, settings, photo):
    server = serve_app(make_app(dataclasses.replace(settings, api_key="s3cret")))
    try:
        page.goto(f"http://127.0.0.1:{server.server_port}/")
        page.set_input_files("#file", str(photo))
        page.locator("#status.error").wait_for(timeout=30_000)
        assert "API key" in page.locator("#status").inner_text()
        assert page.locator("#key-box").get_attribute("open") is not None
        page.fill("#key", "s3cret")
        page.set_input_files("#file", str(photo))
        page.locator("#predictions li.row").nth(9).wait_for(timeout=30_000)
    finally:
        stop_http(server)
