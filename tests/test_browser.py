"""The notebook explorers in a real browser: JupyterLab on localhost, headless Chromium.

nbval runs the notebooks but cannot tell whether a slider does anything. Here notebook 04 (a
temporary copy) runs in JupyterLab, driven by Playwright through Debian's `chromium` package
(nothing is downloaded); the box-threshold and decision-threshold sliders are moved with the
keyboard, as a person would, and the drawn boxes and the precision/recall table must change.
Notebook 07's explorer is moved the same way: K and its threshold must redraw the map and boxes.
Screenshots go to the test's temporary folder. Skips, saying why, without Chromium or Playwright.
"""

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "04_cam_heatmaps_and_boxes.ipynb"
GOOD_PARTS_NOTEBOOK = REPO / "notebooks" / "07_new_product_few_good_parts.ipynb"
CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright never downloads a browser here
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Running the notebook may first train the demo model (a minute or two on 2 CPU cores).
RUN_TIMEOUT_S = 900
UPDATE_TIMEOUT_MS = 60_000  # a slider change: a kernel round trip and a redrawn figure

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason=f"no {CHROMIUM}: install Debian's chromium package (apt-get install chromium)"),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is missing: pip install -e '.[browser]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a free localhost port, no token, a temporary root and home; yields
    (its URL, its root folder)."""
    root = tmp_path_factory.mktemp("lab")
    home = tmp_path_factory.mktemp("home")
    port = free_port()
    env = {**os.environ, "HOME": str(home), "JUPYTER_CONFIG_DIR": str(home / ".jupyter"),
           "JUPYTER_DATA_DIR": str(home / "data"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(home / "lab-settings")}
    # Every cell in the page (JupyterLab may leave cells out of view out of the page, widgets too).
    tracker = home / "lab-settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text('{"windowingMode": "none"}')
    log = open(home / "jupyterlab.log", "wb")  # noqa: SIM115 (closed after the server below)
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         "--ServerApp.port_retries=0", "--IdentityProvider.token=",
         f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         # Nothing fetched from the internet: no news, no update check, no extension index.
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly",
         *(["--allow-root"] if os.geteuid() == 0 else [])],  # CI containers run as root
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                tail = (home / "jupyterlab.log").read_text()[-2000:]
                raise RuntimeError(f"JupyterLab did not start: {tail}")
            time.sleep(0.5)
        yield url, root
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for every notebook of the module (Playwright's sync API allows one
    instance per thread)."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def notebook_run_in_lab(lab, browser, notebook: Path, name: str):
    """A temporary copy of `notebook` opened in JupyterLab in a new page, all its cells run;
    yields the page."""
    url, root = lab
    shutil.copy(notebook, root / name)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        # A workspace of its own: the notebook, not one an earlier page opened, is the current one.
        page.goto(f"{url}/lab/workspaces/{Path(name).stem}/tree/{name}?reset", timeout=120_000)
        page.wait_for_function(
            "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
            " && window.jupyterapp.shell.currentWidget.sessionContext"
            " && window.jupyterapp.shell.currentWidget.sessionContext.session"
            " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel",
            timeout=120_000,
        )
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        wait_until_run(page, notebook.name)
        yield page
    finally:
        page.close()


@pytest.fixture(scope="module")
def page(lab, browser):
    """Notebook 04 (a temporary copy), all cells run, in a headless Chromium page."""
    with notebook_run_in_lab(lab, browser, NOTEBOOK, "explorers.ipynb") as page:
        yield page


def wait_until_run(page, what: str = "notebook 04") -> None:
    """Until every code cell has run (asked of JupyterLab's notebook model, not of the page);
    fail at the first error output."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        state = page.evaluate("""() => {
            const cells = window.jupyterapp.shell.currentWidget.content.widgets
                .filter(cell => cell.model.type === 'code');
            const errors = cells.flatMap(cell => cell.model.outputs.toJSON())
                .filter(out => out.output_type === 'error')
                .map(out => `${out.ename}: ${out.evalue}`);
            return {n: cells.length, done: cells.filter(cell => cell.model.executionCount).length, errors};
        }""")
        assert not state["errors"], f"{what} failed in JupyterLab: {state['errors']}"
        if state["n"] and state["done"] == state["n"]:
            return
        assert time.monotonic() < deadline, f"{what} did not finish in {RUN_TIMEOUT_S} s: {state}"
        time.sleep(1)


def control(page, label: str):
    """The ipywidgets control whose description starts with `label` (found by the text a person
    reads, so the test survives edits of the notebook around it)."""
    found = page.locator(".widget-inline-hbox").filter(
        has=page.locator(".widget-label", has_text=re.compile(rf"^{re.escape(label)}")))
    assert found.count() == 1, f"expected one control labelled {label!r}, found {found.count()}"
    return found


def explorer(page, label: str):
    """The explorer (the ipywidgets VBox of an output area) that holds the control `label`."""
    return page.locator(".jp-OutputArea-output").filter(has=control(page, label))


def press(page, label: str, key: str, times: int = 1) -> None:
    """Focus the slider `label`'s handle and press `key`: the keyboard moves it step by step."""
    handle = control(page, label).locator(".noUi-handle")
    handle.focus()
    for _ in range(times):
        page.keyboard.press(key)


def settle(page) -> None:
    """Wait until the kernel is idle: every change sent so far has been redrawn (the kernel sends
    a redraw's outputs before it reports idle)."""
    page.wait_for_function(
        "() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
        timeout=UPDATE_TIMEOUT_MS)


def figure(area) -> str:
    """The drawn figure of an explorer (the image's data URL)."""
    return area.locator("img").last.get_attribute("src")


def test_heatmap_explorer_opens_on_a_box(page, tmp_path):
    """The explorer's first state shows a box (on the worked example's defect: notebook 04
    asserts that it touches the mask), not an empty heatmap a reader must first tune."""
    area = explorer(page, "box threshold")
    summary = area.locator(".widget-html", has_text=re.compile(r"box\(es\) at heat"))
    area.screenshot(path=tmp_path / "heatmap_explorer_default.png")
    assert boxes_drawn(summary.inner_text())[0] >= 1


def test_box_threshold_slider_redraws_the_boxes(page, tmp_path):
    area = explorer(page, "box threshold")
    summary = area.locator(".widget-html", has_text=re.compile(r"box\(es\) at heat"))
    expect = sync_api.expect
    # Per-image min-max scaling: every image has a hottest pixel (1.0), so boxes at any threshold.
    mode = control(page, "normalise").locator("select")
    per_image = next(t for t in mode.locator("option").all_inner_texts() if "per-image" in t)
    if mode.evaluate("s => s.options[s.selectedIndex].text") != per_image:
        shown = figure(area)
        mode.select_option(label=per_image)
        expect(area.locator("img").last).not_to_have_attribute("src", shown, timeout=UPDATE_TIMEOUT_MS)
        settle(page)
    # From heat > 0.50 (wherever the explorer opened) to 0.90, in steps of 0.05.
    start = float(re.search(r"at heat > ([\d.]+)", summary.inner_text()).group(1))
    steps = round((start - 0.5) / 0.05)
    if steps:
        press(page, "box threshold", "ArrowLeft" if steps > 0 else "ArrowRight", times=abs(steps))
        expect(summary).to_contain_text("at heat > 0.50", timeout=UPDATE_TIMEOUT_MS)
        settle(page)
    before, before_figure = boxes_drawn(summary.inner_text()), figure(area)
    area.screenshot(path=tmp_path / "heatmap_explorer_before.png")
    press(page, "box threshold", "ArrowRight", times=8)  # heat > 0.50 -> 0.90, in steps of 0.05
    expect(summary).to_contain_text("at heat > 0.90", timeout=UPDATE_TIMEOUT_MS)
    settle(page)
    assert figure(area) != before_figure
    area.screenshot(path=tmp_path / "heatmap_explorer_after.png")
    after = boxes_drawn(summary.inner_text())
    assert before[0] >= 1 and after[0] >= 1  # per-image scaling: a box around the hottest pixel
    assert after != before  # higher threshold: smaller (or fewer) boxes
    assert sum(area_of(b) for b in after[1]) < sum(area_of(b) for b in before[1])
    print(f"screenshots in {tmp_path}")


def boxes_drawn(text: str) -> tuple[int, list[tuple[int, ...]]]:
    """(count, [(x0, y0, x1, y1), ...]) from the explorer's box summary."""
    count = int(re.search(r"(\d+) box\(es\)", text).group(1))
    boxes = [tuple(map(int, m)) for m in re.findall(r"\((\d+), (\d+), (\d+), (\d+)\) peak", text)]
    assert len(boxes) == count, text
    return count, boxes


def area_of(box: tuple[int, ...]) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def test_decision_threshold_slider_changes_the_table(page, tmp_path):
    label = "anomaly if logit margin"
    area = explorer(page, label)
    table = area.locator("table", has_text="positive class: anomaly")
    readout = control(page, label).locator(".widget-readout")
    before, before_value, before_figure = table.inner_text(), readout.inner_text(), figure(area)
    area.screenshot(path=tmp_path / "threshold_explorer_before.png")
    press(page, label, "ArrowRight")
    page.wait_for_timeout(500)
    if readout.inner_text() == before_value:  # the model's threshold was the last stop
        press(page, label, "ArrowLeft")
    sync_api.expect(table).not_to_have_text(before, timeout=UPDATE_TIMEOUT_MS)
    settle(page)
    assert figure(area) != before_figure  # the threshold line moved
    area.screenshot(path=tmp_path / "threshold_explorer_after.png")
    after, value = table.inner_text(), readout.inner_text()
    assert value != before_value
    shown = float(re.search(r"anomaly if score > (-?[\d.]+)", after).group(1))
    assert abs(shown - float(value)) <= 0.01  # the table is at the slider's threshold (both rounded)
    # One step moves past the next score: one image changes side, so the confusion counts move.
    assert counts(after) != counts(before)
    assert sum(counts(after).values()) == sum(counts(before).values())


def counts(table: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(TP|FN|FP|TN) \([^)]*\)\s+(\d+)", table)}


def test_explorer_labels_are_readable(page, tmp_path):
    """No description or drop-down option is cut off at this (JupyterLab's usual) page width."""
    page.screenshot(path=tmp_path / "notebook.png", full_page=True)
    cut = page.evaluate("""() => {
        const cut = [];
        for (const label of document.querySelectorAll('.jp-OutputArea-output .widget-label')) {
            if (label.innerText && label.scrollWidth > label.clientWidth) cut.push(label.innerText);
        }
        const ctx = document.createElement('canvas').getContext('2d');
        for (const select of document.querySelectorAll('.jp-OutputArea-output .widget-dropdown select')) {
            const style = getComputedStyle(select);
            ctx.font = `${style.fontSize} ${style.fontFamily}`;
            const room = select.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
            for (const option of select.options) {
                if (ctx.measureText(option.text).width > room) cut.push(option.text);
            }
        }
        return cut;
    }""")
    assert cut == []


@pytest.fixture(scope="module")
def good_parts_page(lab, browser):
    """Notebook 07 (a temporary copy), all cells run, in a headless Chromium page."""
    with notebook_run_in_lab(lab, browser, GOOD_PARTS_NOTEBOOK, "good_parts.ipynb") as page:
        yield page


def test_good_parts_explorer_moves_k_and_the_threshold(good_parts_page, tmp_path):
    page = good_parts_page
    area = explorer(page, "K good parts")
    summary = area.locator(".widget-html", has_text=re.compile(r"box\(es\) at distance"))
    text, drawn = summary.inner_text(), figure(area)
    assert "predicted anomaly" in text and boxes_drawn(text)[0] >= 1  # opens on a box on a defect
    area.screenshot(path=tmp_path / "good_parts_explorer_before.png")
    k_before = int(re.search(r"K = (\d+)", text).group(1))
    press(page, "K good parts", "ArrowRight")  # the next K: other good parts, another threshold
    sync_api.expect(summary).not_to_contain_text(f"K = {k_before}:", timeout=UPDATE_TIMEOUT_MS)
    settle(page)
    after_k = summary.inner_text()
    assert int(re.search(r"K = (\d+)", after_k).group(1)) > k_before and figure(area) != drawn
    drawn = figure(area)
    press(page, "threshold", "ArrowRight", times=10)  # 1.00 -> 1.50 times the calibrated threshold
    sync_api.expect(summary).to_contain_text("> 1.50", timeout=UPDATE_TIMEOUT_MS)
    settle(page)
    area.screenshot(path=tmp_path / "good_parts_explorer_after.png")
    after = boxes_drawn(summary.inner_text())
    before = boxes_drawn(after_k)
    assert figure(area) != drawn
    assert sum(area_of(b) for b in after[1]) <= sum(area_of(b) for b in before[1])  # a higher bar
