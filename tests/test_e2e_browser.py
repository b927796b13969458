"""End to end in a real browser: what a new user does, from picking data to downloading the adapter.

Playwright drives Debian's headless `chromium` (Playwright's own browser download cannot
work offline) against `python app.py` started by the `running_app` fixture. One test, in the
order a user goes: Dataset → Train → Chat → Export, with a screenshot of each tab saved to
assets/screenshots/ for the README.

Elements are found the way a user finds them: by tab name, label and button text. The few
CSS hooks used are ones the tab modules render on purpose (`.qs-status[data-state]`,
`.qs-progress[data-total]`, `.qs-row`, the chatbots' elem_ids); the loss chart is found by
its trace name, not its position.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml
from playwright.sync_api import expect, sync_playwright

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "assets" / "screenshots"

# A short run already changes the greedy answer (measured with 12 steps of quick-cpu: base
# "2 + 2 is 4." vs adapted "(smiling mischievously) Ah, aye, matey! Two and two is …"), and
# should take about a minute on an idle 2-core CI machine. The timeouts are generous for a
# loaded machine (12 steps took 6-13 minutes here while others ran tests) yet bounded.
TRAIN_STEPS = 12
MAX_NEW_TOKENS = 32
QUESTION = "What is 2 + 2?"
UI_TIMEOUT_MS = 60_000
TRAIN_TIMEOUT_S = 1200
CHAT_TIMEOUT_MS = 300_000
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]
expect.set_options(timeout=UI_TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium")
    if executable is None:  # CI installs it; a missing browser must fail, not pass unnoticed as a skip
        pytest.fail("Debian's chromium is not installed (`apt-get install chromium`); the browser test needs "
                    "`chromium` on PATH, since Playwright's own browser download cannot work offline.")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, running_app):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.uncaught_errors = []  # exceptions thrown by the page's own scripts
    page.on("pageerror", lambda error: page.uncaught_errors.append(str(error)))
    yield page
    context.close()


def visible_panel(page):
    """The open tab's panel (Gradio keeps visited tabs in the DOM, hidden)."""
    return page.locator("[role=tabpanel]:visible")


def open_tab(page, name: str):
    page.get_by_role("tab", name=name, exact=True).click()
    expect(page.get_by_role("tab", name=name, exact=True)).to_have_attribute("aria-selected", "true")
    return visible_panel(page)


def pick(page, scope, label: str, option: str | re.Pattern) -> None:
    """Choose an option of a Gradio dropdown (an input with role combobox) as a user does."""
    scope.get_by_role("combobox", name=label, exact=True).click()
    page.get_by_role("option", name=option).click()


def visible_traces(page) -> list[dict]:
    """Every trace of the plotly charts in the open tab, read from plotly's own data: name, type, points, sum of y."""
    return page.evaluate("""() => {
        const out = [];
        for (const plot of document.querySelectorAll('[role=tabpanel] .js-plotly-plot')) {
            if (!plot.offsetParent) continue;  // a hidden tab's chart
            for (const t of plot.data || []) {
                const ys = Array.from(t.y || []);
                out.push({name: t.name || '', type: t.type || 'scatter', points: (t.x || []).length,
                          ysum: ys.reduce((a, b) => a + (Number(b) || 0), 0)});
            }
        }
        return out;
    }""")


def loss_points(page) -> int:
    """Points on the live chart's 'train loss' trace; -1 while the chart is not drawn."""
    return next((t["points"] for t in visible_traces(page) if t["name"] == "train loss"), -1)


def chart_sizes(page) -> list[tuple[int, int]]:
    """(drawn width, element width) of each chart in the open tab."""
    return [tuple(size) for size in page.evaluate("""() =>
        [...document.querySelectorAll('[role=tabpanel] .js-plotly-plot')].filter(p => p.offsetParent)
            .map(p => [Math.round(p._fullLayout.width), p.clientWidth])""")]


def chart_follows_the_window(page) -> None:
    """assets/plot_resize.js skips Plotly's redundant resize pass on updates; real resizes still redraw."""
    assert page.evaluate("() => window.Plotly.Plots.resize.qlorastudio === true")
    viewport = page.viewport_size
    before = chart_sizes(page)
    assert before and all(drawn == width for drawn, width in before), before
    page.set_viewport_size({**viewport, "width": viewport["width"] - 300})
    try:
        after = wait_until(lambda: (sizes := chart_sizes(page)) != before and all(d == w for d, w in sizes) and sizes,
                           time.monotonic() + 10, "the charts to redraw at the narrower width")
        assert all(width < old for (width, _), (old, _) in zip(after, before)), (before, after)
    finally:
        page.set_viewport_size(viewport)
    wait_until(lambda: chart_sizes(page) == before, time.monotonic() + 10, "the charts to widen again")


def wait_until(condition, deadline: float, what: str, poll_s: float = 0.5):
    """Poll `condition` until it returns something truthy (returned) or the monotonic `deadline` passes."""
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


def shoot(page, name: str, element=None) -> Path:
    """Save a screenshot for the README; `element` is scrolled to the top of the view first."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    if element is not None:
        element.evaluate("e => e.scrollIntoView({block: 'start'})")
    else:
        page.evaluate("() => window.scrollTo(0, 0)")
    page.wait_for_timeout(300)  # let plotly finish its relayout after the scroll
    page.screenshot(path=str(path))
    return path


# -- the user's journey, one step per tab -----------------------------------------------------------

def choose_dataset(page) -> None:
    panel = open_tab(page, "Dataset")
    pick(page, panel, "Sample", "Pirate persona chat (messages)")
    panel.get_by_role("button", name="Load and check").click()
    rows = panel.locator(".qs-row")
    rows.first.wait_for()
    assert rows.count() >= 1
    assert "Fair winds, matey!" in rows.first.inner_text(), "the preview should show the persona's rendered rows"
    chosen = panel.get_by_text("The Train tab will use").inner_text()
    assert "sample:persona" in chosen and "messages" in chosen, chosen
    usable = int(re.search(r"\(([\d,]+) usable rows", chosen).group(1).replace(",", ""))
    # The token-length histogram is drawn (plotly renders after the data arrives) and counts every usable row.
    bars = wait_until(lambda: [t for t in visible_traces(page) if t["type"] == "bar" and t["points"]],
                      time.monotonic() + UI_TIMEOUT_MS / 1000, "the token-length histogram")
    assert round(bars[0]["ysum"]) == usable, (bars, usable)
    shoot(page, "dataset")


def train(page) -> str:
    """Quick CPU preset, a few steps, Train; watch the chart grow until the run completes. -> run name."""
    panel = open_tab(page, "Train")
    pick(page, panel, "Preset", "quick-cpu")
    max_steps = panel.get_by_label("Max steps", exact=True)
    expect(max_steps).to_have_value("40")  # the preset's value, before the user shortens the run
    expect(panel.get_by_label("Batch size", exact=True)).to_have_value("8")
    # A textbox's accessible name is its label followed by its info text.
    expect(panel.get_by_role("textbox", name=re.compile(r"^Data source\b"))).to_have_value("sample:persona")
    max_steps.fill(str(TRAIN_STEPS))
    max_steps.press("Tab")
    # The server has seen the new value once the equivalent command names it.
    panel.get_by_text("Config as YAML and command").click()
    # Its label also wraps a Copy button, which takes the label for itself: reach the box through the label.
    command = panel.get_by_text("Equivalent command", exact=True).locator("xpath=ancestor::label[1]//textarea")
    expect(command).to_have_value(
        re.compile(rf"presets/quick-cpu\.yaml.*train\.max_steps={TRAIN_STEPS}\b"))
    expect(panel.get_by_text("Config is valid")).to_be_visible()

    panel.get_by_role("button", name="Train", exact=True).click()
    started = panel.locator(".qs-msg")
    expect(started).to_contain_text("Started", timeout=UI_TIMEOUT_MS)
    run_name = started.locator("code").inner_text()

    status = panel.locator(".qs-status")
    expect(status).to_have_attribute("data-state", "running", timeout=UI_TIMEOUT_MS)
    expect(panel.locator(".qs-progress")).to_have_attribute("data-total", str(TRAIN_STEPS))
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    first = wait_until(lambda: max(loss_points(page), 0), deadline, "the first point on the loss chart")
    later = wait_until(lambda: (n := loss_points(page)) > first and n, deadline,
                       f"the loss chart to grow past {first} points")
    assert later > first
    wait_until(lambda: status.get_attribute("data-state") in ("completed", "failed", "stopped"), deadline,
               f"the run to finish within {TRAIN_TIMEOUT_S}s")
    assert status.get_attribute("data-state") == "completed", status.inner_text()
    expect(status).to_contain_text(f"finished {TRAIN_STEPS} steps")
    assert loss_points(page) == TRAIN_STEPS
    expect(panel.locator(".qs-progress")).to_have_attribute("data-step", str(TRAIN_STEPS))
    chart_follows_the_window(page)
    shoot(page, "train", page.get_by_text("Live run", exact=True))
    return run_name


def compare_in_chat(page, run_name: str) -> tuple[str, str]:
    panel = open_tab(page, "Chat")
    panel.get_by_role("button", name="Refresh").click()
    pick(page, panel, "Run", re.compile(re.escape(run_name)))
    expect(panel.get_by_text(re.compile(rf"Adapter {re.escape(run_name)} on base"))).to_be_visible()
    panel.get_by_text("Generation settings (the same for both sides)").click()
    tokens = panel.get_by_label("number input for Max new tokens")
    tokens.fill(str(MAX_NEW_TOKENS))
    tokens.press("Enter")
    panel.get_by_label("Greedy (deterministic; ignores sampling settings)").check()
    panel.get_by_label("Message", exact=True).fill(QUESTION)
    panel.get_by_role("button", name="Send", exact=True).click()
    expect(panel.get_by_text(re.compile(r"^Done\."))).to_be_visible(timeout=CHAT_TIMEOUT_MS)

    base, adapted = page.locator("#chat-base"), page.locator("#chat-adapted")
    answers = []
    for chat in (base, adapted):
        expect(chat).to_contain_text(QUESTION)
        bot = chat.locator("[data-testid=bot]")
        expect(bot).to_have_count(1)
        answers.append(bot.inner_text().strip())
    base_box, adapted_box = base.bounding_box(), adapted.bounding_box()
    assert base_box["x"] + base_box["width"] <= adapted_box["x"] + 1, "the two answers should be side by side"
    assert abs(base_box["y"] - adapted_box["y"]) < 5
    shoot(page, "chat")
    return answers[0], answers[1]


def export_zip(page, running_app, run_name: str) -> zipfile.ZipFile:
    panel = open_tab(page, "Export")
    panel.get_by_role("button", name="Refresh").click()
    expect(panel.get_by_role("combobox", name="Run", exact=True)).to_have_value(re.compile(re.escape(run_name)))
    panel.get_by_role("button", name="Build adapter zip").click()
    expect(panel.get_by_text("Adapter bundle ready")).to_be_visible(timeout=UI_TIMEOUT_MS * 2)
    link = panel.locator("a[download$='-adapter.zip']")
    expect(link).to_have_count(1)
    href = link.get_attribute("href")
    shoot(page, "export")
    # Browsers cannot save downloads here: fetch the same URL the link points at.
    url = httpx.URL(running_app.url).join(href)
    response = httpx.get(url, timeout=60, follow_redirects=True)
    assert response.status_code == 200, f"GET {url} -> {response.status_code}"
    return zipfile.ZipFile(io.BytesIO(response.content))


def check_bundle(bundle: zipfile.ZipFile, run_name: str) -> None:
    from safetensors.torch import load as load_safetensors

    files = {Path(name).name: name for name in bundle.namelist() if not name.endswith("/")}
    for needed in ("adapter_model.safetensors", "adapter_config.json", "README.md", "config.yaml",
                   "metrics.jsonl"):
        assert needed in files, f"{needed} missing from the zip: {sorted(files)}"
    card = bundle.read(files["README.md"]).decode()
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["library_name"] == "peft" and "SmolLM2" in front_matter["base_model"], front_matter
    assert f"# {run_name}" in card and "sample:persona" in card
    # The loss curve the card shows is a real PNG in the bundle.
    curves = [n for n in files if n.endswith(".png") and f"]({n})" in card]
    assert curves, f"the card embeds no loss-curve PNG from the zip: {sorted(files)}"
    assert bundle.read(files[curves[0]]).startswith(b"\x89PNG\r\n\x1a\n")

    weights = load_safetensors(bundle.read(files["adapter_model.safetensors"]))
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and any("lora_A" in k for k in weights), sorted(weights)[:5]
    assert any(bool(w.abs().sum() > 0) for w in lora_b), "lora_B is still all zeros: the adapter did not train"
    adapter_config = json.loads(bundle.read(files["adapter_config.json"]))
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 16
    config = yaml.safe_load(bundle.read(files["config.yaml"]))
    assert config["train"]["max_steps"] == TRAIN_STEPS and config["data"]["source"] == "sample:persona"
    rows = [json.loads(line) for line in bundle.read(files["metrics.jsonl"]).decode().splitlines() if line.strip()]
    assert max(r["step"] for r in rows if r["type"] == "train") == TRAIN_STEPS


def test_new_user_trains_compares_and_exports(page, running_app, tmp_path):
    started = time.monotonic()
    try:
        page.goto(running_app.url)
        page.get_by_role("heading", name="QLoRA Studio").wait_for()
        choose_dataset(page)
        run_name = train(page)
        base, adapted = compare_in_chat(page, run_name)
        assert base and adapted, (base, adapted)
        assert base != adapted, f"base and adapted answers are identical after training: {base!r}"
        bundle = export_zip(page, running_app, run_name)
        check_bundle(bundle, run_name)
        assert not page.uncaught_errors, f"uncaught errors in the page: {page.uncaught_errors}"
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        print(f"\nfailure screenshot: {tmp_path / 'failure.png'}\n--- app log (tail) ---\n"
              f"{running_app.read_log()[-4000:]}")
        raise
    print(f"\nend to end in {time.monotonic() - started:.0f}s; base: {base!r}; adapted: {adapted!r}")


# Counts the frames the browser is asked for; installed before any page script, so it sits
# under the app's frame pacing and sees only the frames that reach the browser.
COUNT_FRAMES = """(() => {
    window.__frames = 0;
    window.__callers = {};
    const native = window.requestAnimationFrame.bind(window);
    window.requestAnimationFrame = (cb) => {
        window.__frames++;
        const caller = (new Error().stack.split('\\n').slice(2, 5).join(' < ') || '?').replace(/https?:[^ )]*\\//g, '');
        window.__callers[caller] = (window.__callers[caller] || 0) + 1;
        return native(cb);
    };
})()"""


def test_an_idle_page_costs_the_machine_almost_nothing(page, running_app):
    """While the page sits untouched (as it does during a long CPU training), it sends no requests
    and draws only a few frames a second: Gradio's own never-ending animation loops are paced."""
    page.add_init_script(COUNT_FRAMES)
    page.goto(running_app.url)
    page.get_by_role("heading", name="QLoRA Studio").wait_for()
    open_tab(page, "Train")
    page.mouse.move(0, 0)
    page.wait_for_timeout(3000)  # past the pacing's grace after the last input
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    frames_before = page.evaluate("window.__frames = 0, window.__callers = {}, 0")
    page.wait_for_timeout(5000)
    frames = page.evaluate("window.__frames") - frames_before
    callers = page.evaluate("window.__callers")
    assert requests == [], f"an idle page should not poll the server: {requests}"
    # Unpaced, each of Gradio's leftover loops asks for 60 frames a second (300 here); paced, all
    # of them share 1 frame a second (5 here).
    assert frames <= 40, f"{frames} animation frames in 5 idle seconds, asked for by {callers}"
    assert not page.uncaught_errors, page.uncaught_errors
