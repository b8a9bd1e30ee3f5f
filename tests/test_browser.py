"""The app in a real browser: Debian's chromium driven by Playwright for Python.

Set DYCOKE_SCREENSHOT=1 to write the README's screenshot to assets/screenshot.png; otherwise it goes to the
test's temporary directory, so that running the tests never rewrites a tracked file.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # app.py sits at the repository root, outside the installed package

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
TIMEOUT_MS = 120_000

pytestmark = pytest.mark.browser


def _skip(reason: str) -> None:
    print(f"SKIPPED browser test: {reason}")  # shown with -s, and in CI logs, not only in -rs summaries
    pytest.skip(reason)


@pytest.fixture(scope="module")
def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip("playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        _skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    return sync_playwright


@pytest.fixture(scope="module")
def app_url(pipeline):
    import app

    demo = app.build_app(pipeline)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app.launch_app(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def plot_rendered(page, elem_id: str, layer: str) -> bool:
    """The gradio Plot `elem_id` holds a plotly graph that drew `layer` (an SVG class or element selector)."""
    return page.locator(f"#{elem_id} .js-plotly-plot {layer}").count() > 0


def test_upload_ask_and_see_both_answers_and_the_figures(sync_playwright, app_url, tmp_path):
    # The project's own synthetic clip: the screenshot goes into the README, and third-party media must not.
    video = ROOT / "assets" / "examples" / "scene_cut.mp4"
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}")
                    if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.set_default_timeout(TIMEOUT_MS)

            page.goto(app_url)
            banner = page.locator("#model-banner")
            banner.wait_for()
            assert "tiny random weights" in banner.inner_text()
            assert "mean nothing" in banner.inner_text()

            page.locator("#video input[type=file]").set_input_files(str(video))
            page.locator("#video video").wait_for()  # uploaded and shown
            question = page.locator("#question textarea")
            question.fill("What changes halfway through the video?")
            question.press("Enter")

            # Both panes stream text, then the stats line marks the end of the method's run.
            page.locator("#comparison-chat [data-testid='bot']").first.wait_for()
            page.locator("#method-chat [data-testid='bot']").first.wait_for()
            page.wait_for_function("document.querySelector('#method-stats').innerText.includes('TTFT')")
            page.wait_for_function("document.querySelector('#ttm-view .js-plotly-plot') !== null")
            assert page.locator("#comparison-chat [data-testid='bot']").first.inner_text().strip()
            assert page.locator("#method-chat [data-testid='bot']").first.inner_text().strip()

            # gradio's bundled plotly.js draws the plotly 6 figures: heatmap cells, gauges, the frames image.
            for pane in ("comparison-heatmap", "method-heatmap"):
                assert plot_rendered(page, pane, "g.hm image"), f"{pane}: no heatmap drawn"
                assert "TTM" in (page.locator(f"#{pane} .xtick").first.text_content() or "")
            numbers = page.locator("#gauges .js-plotly-plot .indicatorlayer text.number")
            assert numbers.count() == 10  # 2 runs × 4 gauges, and 2 ratios
            assert plot_rendered(page, "ttm-view", "g.imagelayer image")
            assert "Decoded" in page.locator("#status-line").inner_text()
            assert page.locator("#question textarea").input_value() == ""

            page.get_by_text("Settings", exact=True).click()  # show every control in the screenshot
            page.locator("#method-heatmap").scroll_into_view_if_needed()
            page.wait_for_timeout(1000)
            target = ROOT / "assets" / "screenshot.png" if os.environ.get("DYCOKE_SCREENSHOT") \
                else tmp_path / "screenshot.png"
            page.screenshot(path=str(target), full_page=True)
            print(f"screenshot: {target}")

            # An example fills the video and the question; a new video starts a new conversation; Send asks.
            page.get_by_text("moving shapes", exact=True).click()
            page.wait_for_function("document.querySelector('#question textarea').value.includes('shapes')")
            page.wait_for_function("document.querySelector('#method-stats').innerText.trim() === ''")
            page.locator("#send").click()
            page.wait_for_function("document.querySelector('#method-stats').innerText.includes('TTFT')")
            assert page.locator("#method-chat [data-testid='user']").count() == 1
            assert "moving_shapes.mp4" in page.locator("#status-line").inner_text()
        finally:
            browser.close()
    assert not problems, "errors in the browser:\n" + "\n".join(problems)
