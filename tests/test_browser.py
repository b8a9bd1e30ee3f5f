"""The app in a real browser: Debian's chromium driven by Playwright for Python, at 1280 px and 390 px, light and dark.

Set DYCOKE_SCREENSHOT=1 to write the README's screenshots (assets/screenshot.png, the desktop in light mode, and
assets/screenshot-phone.png, the phone in dark mode); otherwise every screenshot goes to the test's temporary
directory, so that running the tests never rewrites a tracked file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # app.py sits at the repository root, outside the installed package

from conftest import serving  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
# Every wait is bounded and a timeout fails the test with what the page showed (and a screenshot), never hangs.
UI_WAIT_MS = 60_000  # the page reacting to a click or an upload
RUN_WAIT_MS = 240_000  # both runs of a Send on the tiny model, on a busy CPU
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
README_SHOTS = {("desktop", "light"): "screenshot.png", ("phone", "dark"): "screenshot-phone.png"}

pytestmark = pytest.mark.browser


def _skip(reason: str) -> None:
    print(f"SKIPPED browser test: {reason}")  # shown with -s, and in CI logs, not only in -rs summaries
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip("playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        _skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def app_url(pipeline):
    with serving(pipeline) as (_, url):
        yield url


def open_page(browser, app_url: str, viewport: dict, theme: str, problems: list[str]):
    context = browser.new_context(viewport=viewport, color_scheme=theme, device_scale_factor=1)
    page = context.new_page()
    page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}")
            if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.problems = problems  # for wait_until's failure message
    page.set_default_timeout(UI_WAIT_MS)
    page.goto(app_url)
    page.locator("#model-banner").wait_for()
    return context, page


# What a plotly plot holds, for a failure message: its size, its axes' lengths, drawn heatmap images, its title.
PLOT_STATE_JS = """(id) => { const plot = document.querySelector(`#${id} .js-plotly-plot`);
  if (!plot) return '(no plot)';
  const layout = plot._fullLayout || {}, box = plot.getBoundingClientRect();
  return {size: [box.width, box.height], axes: [layout.xaxis?._length, layout.yaxis?._length],
          heatmap_images: plot.querySelectorAll('g.hm image').length, traces: (plot.data || []).length,
          title: layout.title?.text}; }"""


def wait_until(page, condition: str, what: str, shots: Path, timeout_ms: int = UI_WAIT_MS) -> None:
    """Wait for the JavaScript `condition`; past `timeout_ms`, fail saying what did not happen and what the page
    showed instead (status, error and progress lines), with a screenshot of it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(condition, timeout=timeout_ms)
    except PlaywrightTimeout:
        shot = shots / f"timeout-{len(list(shots.glob('timeout-*.png')))}.png"
        page.screenshot(path=str(shot), full_page=True)
        shown = page.evaluate("""() => Object.fromEntries(['status-line', 'error-box', 'progress-slot'].map(
            id => [id, (document.getElementById(id)?.innerText ?? '(absent)').trim().slice(0, 300)]))""")
        plots = {pane: page.evaluate(PLOT_STATE_JS, pane) for pane in ("comparison-heatmap", "method-heatmap")}
        pytest.fail(f"{what}: not within {timeout_ms / 1000:.0f} s; the page showed {shown}; the heatmaps: {plots}; "
                    f"browser errors: {getattr(page, 'problems', [])}; screenshot {shot}", pytrace=False)


def drawn(page, elem_id: str, layer: str) -> int:
    """How many `layer` elements (an SVG selector) the plotly graph in gradio Plot `elem_id` drew."""
    return page.locator(f"#{elem_id} .js-plotly-plot {layer}").count()


def overlapping_texts(page, elem_id: str) -> list[tuple[str, str]]:
    """Pairs of texts in the plot `elem_id` (titles, bar numbers, axis labels) whose bounding boxes intersect."""
    return page.evaluate("""(id) => {
        const nodes = [...document.querySelectorAll(
            `#${id} .js-plotly-plot .annotation-text, #${id} .js-plotly-plot text.bartext,
             #${id} .js-plotly-plot .ytick text`)].filter(n => n.textContent.trim());
        const boxes = nodes.map(n => [n.textContent, n.getBoundingClientRect()]);
        const hits = [];
        for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
            const [a, p] = boxes[i], [b, q] = boxes[j];
            if (p.left < q.right - 1 && q.left < p.right - 1 && p.top < q.bottom - 1 && q.top < p.bottom - 1)
                hits.push([a, b]);
        }
        return hits;
    }""", elem_id)


def cut_titles(page, elem_id: str) -> list[str]:
    """The titles of the plot `elem_id` that reach past its drawing's edges (cut off there)."""
    return page.evaluate("""(id) => {
        const svg = document.querySelector(`#${id} .js-plotly-plot .main-svg`).getBoundingClientRect();
        return [...document.querySelectorAll(`#${id} .js-plotly-plot .gtitle`)].filter(n => {
            const r = n.getBoundingClientRect();
            return r.left < svg.left - 1 || r.right > svg.right + 1 || r.top < svg.top - 1; })
            .map(n => n.textContent);
    }""", elem_id)


def heights(page, *elem_ids: str) -> list[float]:
    return [page.locator(f"#{elem_id}").bounding_box()["height"] for elem_id in elem_ids]


def in_view(page, selector: str) -> bool:
    return page.evaluate("""(sel) => { const r = document.querySelector(sel).getBoundingClientRect();
        return r.top >= -1 && r.top < window.innerHeight; }""", selector)


def ask_about_the_scene_cut(page, shots: Path) -> None:
    page.locator("#video input[type=file]").set_input_files(str(ROOT / "assets" / "examples" / "change.mp4"))
    wait_until(page, "document.querySelector('#status-line')?.innerText.includes('New conversation about')",
               "the upload's status line", shots)
    question = page.locator("#question textarea")
    question.fill("What colour is the background at the end?")
    page.locator("#send").click()


def wait_for_the_run(page, shots: Path) -> None:
    wait_until(page, "document.querySelector('#method-stats')?.innerText.includes('TTFT')",
               "the method's stats after Send", shots, RUN_WAIT_MS)
    wait_until(page, "document.querySelector('#ttm-view .js-plotly-plot image') !== null", "the TTM view", shots)
    wait_until(page, "document.querySelector('#gauges .js-plotly-plot .barlayer .point') !== null", "the gauges",
               shots)
    for pane in ("comparison-heatmap", "method-heatmap"):
        wait_for_cells(page, pane, shots)
    page.wait_for_timeout(500)


def wait_for_cells(page, pane: str, shots: Path) -> None:
    """Wait for the heatmap `pane` to draw its cells.

    Twice (once in CI, once here, both in the dark theme) the comparison pane stayed without cells for a minute
    after the run had ended; some 30 runs here did not reproduce it. The likely cause is plotly's redraws of the
    streamed updates overlapping in gradio's Plot. Resizing the window (and back) makes plotly redraw from the
    figure it holds, as a user's resize would; the cells must then come from that figure, or the test fails with
    what it held."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    cells = f"document.querySelector('#{pane} .js-plotly-plot g.hm image') !== null"
    try:
        page.wait_for_function(cells, timeout=UI_WAIT_MS)
    except PlaywrightTimeout:
        print(f"{pane}: no cells after {UI_WAIT_MS / 1000:.0f} s, redrawing on a resize; the plot held "
              f"{page.evaluate(PLOT_STATE_JS, pane)}")
        viewport = page.viewport_size
        page.set_viewport_size({**viewport, "width": viewport["width"] - 20})
        page.wait_for_timeout(500)
        page.set_viewport_size(viewport)
        wait_until(page, cells, f"the {pane}'s cells, even after a resize", shots, 10_000)


@pytest.mark.parametrize("size", ["desktop", "phone"])
@pytest.mark.parametrize("theme", ["light", "dark"])
def test_a_full_run_reads_well_at_each_size_and_theme(browser, app_url, tmp_path, size, theme):
    problems: list[str] = []
    context, page = open_page(browser, app_url, DESKTOP if size == "desktop" else PHONE, theme, problems)
    try:
        banner = page.locator("#model-banner")
        assert "tiny random weights" in banner.inner_text() and "mean nothing" in banner.inner_text()
        if theme == "dark":  # the banner's text stays readable: light text on the dark page
            wait_until(page, "document.body.classList.contains('dark')", "the dark theme", tmp_path)
            colour = page.evaluate("getComputedStyle(document.querySelector('#model-banner p')).color")
            assert colour == "rgb(255, 224, 184)", colour

        ask_about_the_scene_cut(page, tmp_path)
        if size == "phone":  # Send brings the answers into view, past the inputs stacked above them
            page.locator("#method-chat [data-testid='user']").first.wait_for()
            assert in_view(page, "#answers"), "the answers are not in view after Send"
        wait_for_the_run(page, tmp_path)
        assert page.locator("#comparison-chat [data-testid='bot']").last.inner_text().strip()
        assert page.locator("#method-chat [data-testid='bot']").last.inner_text().strip()
        assert page.locator("#question textarea").input_value() == ""

        # Every plot drew: heatmap cells (plotly draws a heatmap as an image), gauge bars, the frames image.
        for pane in ("comparison-heatmap", "method-heatmap"):
            assert drawn(page, pane, "g.hm image") >= 1, f"{pane}: no cells drawn"
        assert drawn(page, "gauges", ".barlayer .point path") >= 8, "gauges: no bars drawn"
        assert drawn(page, "ttm-view", "g.imagelayer image") == 1
        assert not overlapping_texts(page, "gauges"), overlapping_texts(page, "gauges")
        for plot in ("comparison-heatmap", "method-heatmap", "ttm-view"):  # titles wrap to fit, at 390 px too
            assert page.locator(f"#{plot} .gtitle").count() == 1, f"{plot}: no title"
            assert not cut_titles(page, plot), f"{plot}: title cut at the edge: {cut_titles(page, plot)}"
        if size == "desktop":  # the panes side by side: their headers (and so their chats) line up
            comparison, method = heights(page, "comparison-header", "method-header")
            assert abs(comparison - method) <= 1, f"pane headers {comparison:.1f} px and {method:.1f} px high"
        assert "dycoke vs baseline" in page.locator("#headline").inner_text()
        assert page.locator("#download").is_visible()
        if theme == "dark":  # plots follow the theme: transparent, with light text
            fill = page.evaluate("getComputedStyle(document.querySelector('#gauges .annotation-text')).fill")
            assert fill == "rgb(229, 231, 235)", fill

        shot = README_SHOTS.get((size, theme))
        target = (ROOT / "assets" / shot) if shot and os.environ.get("DYCOKE_SCREENSHOT") \
            else tmp_path / f"screenshot-{size}-{theme}.png"
        page.locator("#answers").scroll_into_view_if_needed()
        page.screenshot(path=str(target), full_page=True)
        print(f"screenshot: {target}")
    finally:
        context.close()
    assert not problems, "errors in the browser:\n" + "\n".join(problems)


def test_settings_follow_the_method_and_uploads_are_checked_on_arrival(browser, app_url, tmp_path):
    problems: list[str] = []
    context, page = open_page(browser, app_url, DESKTOP, "light", problems)
    try:
        page.get_by_text("Settings", exact=True).click()

        visible = """[...document.querySelectorAll('[id^=knob-]')].filter(n => n.offsetParent !== null)
            .map(n => n.id.slice(5)).sort().join(',')"""

        def knobs_shown(expected: set[str], what: str) -> set[str]:
            """Wait until exactly `expected` knobs are visible (the panel opens and Gradio updates them
            asynchronously), then return what is visible."""
            wait_until(page, f"({visible}) === {','.join(sorted(expected))!r}", what, tmp_path)
            return set(page.evaluate(f"() => {visible}").split(","))

        dycoke = {"merge_ratio", "window", "prune_layer", "prune_ratio", "reselect_threshold"}
        assert knobs_shown(dycoke, "DyCoke's knobs") == dycoke
        page.locator("#method input").fill("fastv")
        page.locator("#method input").press("Enter")
        page.locator("#match-budget input").wait_for(state="visible")
        # fastv matched to DyCoke's budget: its layer, and DyCoke's K, W, P that set the budget.
        matched = {"fastv_layer", "merge_ratio", "window", "prune_ratio"}
        assert knobs_shown(matched, "fastv's layer and DyCoke's budget knobs") == matched
        page.locator("#match-budget input").uncheck()
        assert knobs_shown({"fastv_layer", "fastv_ratio"}, "fastv's own knobs") == {"fastv_layer", "fastv_ratio"}
        page.locator("#reset").click()
        assert knobs_shown(dycoke, "DyCoke's knobs after Reset") == dycoke

        # A text file is refused with the app's own message as soon as it arrives, before any Send.
        notes = tmp_path / "notes.txt"
        notes.write_text("not a video\n")
        page.locator("#video input[type=file]").set_input_files(str(notes))
        wait_until(page, "document.querySelector('#error-box')?.innerText.includes('not a readable video')",
                   "the app's message about a text file", tmp_path)
        message = page.locator("#error-box").inner_text()
        assert "not a readable video" in message and "allowed" not in message
        assert page.locator("#method-chat [data-testid='user']").count() == 0
    finally:
        context.close()
    assert not problems, "errors in the browser:\n" + "\n".join(problems)
