"""UI overhead and metrics-to-screen latency: a run launched from the app in a real browser vs the CLI.

    python bench/bench_ui.py [--device cpu|cuda] [--preset quick-cpu] [--steps 20] [--repeats 1]

1. Starts `python app.py` on a free port, opens it in Debian's headless chromium (Playwright),
   picks the preset on the Train tab, sets the step count, clicks Train and scrolls the live view
   into sight, with the page left open (the live chart, progress and log follow the run) until the
   run completes.
2. Meanwhile the page records when each step's point first appears on the loss chart (a
   MutationObserver, so recording adds no polling). Every metrics.jsonl row carries the
   wall-clock time it was written (`wall_time`), so the difference is the time from the line
   being written to the chart showing it.
3. Stops the app, then trains the same saved config.yaml with the CLI, nothing else running.
   tokens/s of each come from their run.json (the trainer's own count over its training time).
4. With --repeats N, pairs alternate which runs first (app, CLI, CLI, app, ...) and the ratio is
   the median of the pairs' ratios (the ratio of the totals is printed too): on a shared 2-core VM
   one run's tokens/s drifts by up to a third over minutes (bench/RESULTS.md).

Appends a row to "UI overhead" and one to "Metrics to screen" in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import alternate, append_result, command_line  # noqa: E402

REPO = BENCH.parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Runs in the page: the first time (ms since the epoch) each step of the 'train loss' trace is drawn.
# A MutationObserver looks only when the page changes, so the recorder adds no work of its own
# between updates (a user's browser runs no recorder).
RECORDER = """() => {
    window.__seen = {};
    const look = () => {
        for (const plot of document.querySelectorAll('.js-plotly-plot')) {
            for (const trace of plot.data || []) {
                if (trace.name !== 'train loss') continue;
                for (const x of trace.x || []) {
                    if (!(x in window.__seen)) window.__seen[x] = Date.now();
                }
            }
        }
    };
    new MutationObserver(look).observe(document.body, {childList: true, subtree: true});
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "QLORA_STUDIO_RUNS": str(work / "runs"),
           "QLORA_STUDIO_UPLOADS": str(work / "uploads")}
    log = open(work / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    import urllib.request
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the app exited; see {work / 'app.log'}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the app did not serve within 300 s; see {work / 'app.log'}")


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def train_in_browser(url: str, runs_root: Path, preset: str, steps: int, timeout_s: float) -> tuple[str, dict]:
    """Click a run into being as a user does; return (run name, {step: ms the chart first showed it})."""
    import re

    from playwright.sync_api import expect, sync_playwright

    from qlora_studio.runs import FINAL_STATES, read_status

    executable = shutil.which("chromium")
    if executable is None:
        raise SystemExit("needs Debian's chromium on PATH (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        page.set_default_timeout(120_000)
        page.goto(url)
        page.get_by_role("heading", name="QLoRA Studio").wait_for()
        page.get_by_role("tab", name="Train", exact=True).click()
        panel = page.locator("[role=tabpanel]:visible")
        panel.get_by_role("combobox", name="Preset", exact=True).click()
        page.get_by_role("option", name=preset).click()
        max_steps = panel.get_by_label("Max steps", exact=True)
        max_steps.fill(str(steps))
        max_steps.press("Tab")
        panel.get_by_text("Config as YAML and command").click()
        command = panel.get_by_text("Equivalent command", exact=True).locator("xpath=ancestor::label[1]//textarea")
        import yaml
        preset_steps = yaml.safe_load((REPO / "presets" / f"{preset}.yaml").read_text())["train"]["max_steps"]
        if steps == preset_steps:  # the command lists only what differs from the preset
            expect(command).to_have_value(re.compile(re.escape(preset)))
            expect(command).not_to_have_value(re.compile(r"train\.max_steps="))
        else:
            expect(command).to_have_value(re.compile(rf"train\.max_steps={steps}\b"))
        page.evaluate(RECORDER)
        panel.get_by_role("button", name="Train", exact=True).click()
        started = panel.locator(".qs-msg")
        expect(started).to_contain_text("Started")
        run_name = started.locator("code").inner_text()
        # Watch as a user does: the live view (progress, status, loss chart) scrolled into sight,
        # so the browser paints every update (an off-screen chart is laid out but not painted).
        page.get_by_text("Live run", exact=True).evaluate("e => e.scrollIntoView({block: 'start'})")
        # Wait on the run folder, not the page: asking the browser every second would add work
        # to the run that a user's browser does not do.
        deadline = time.monotonic() + timeout_s
        while read_status(runs_root / run_name).get("state") not in FINAL_STATES:
            if time.monotonic() > deadline:
                raise SystemExit(f"the run did not finish within {timeout_s} s")
            time.sleep(2)
        status = panel.locator(".qs-status")
        expect(status).to_have_attribute("data-state", re.compile("|".join(FINAL_STATES)))
        if status.get_attribute("data-state") != "completed":
            raise SystemExit(f"the app's run ended {status.get_attribute('data-state')}: {status.inner_text()}")
        page.wait_for_timeout(2000)  # the last point may land a tick after the status
        seen = page.evaluate("() => window.__seen")
        browser.close()
    return run_name, {int(float(k)): v for k, v in seen.items()}


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["type"] == "train"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--preset", default="quick-cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=1,
                   help="app/CLI pairs, alternating which runs first; the ratio is their median")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    p.add_argument("--no-record", action="store_true", help="print only; don't append to RESULTS.md")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-ui-"))
    app_tps, cli_tps, latencies, app_s, cli_s = [], [], [], [], []
    config = None  # every app run saves the same config.yaml (only its name differs)

    def cli_run(repeat: int) -> dict:
        name = f"cli-{repeat}"
        cmd = [sys.executable, "-m", "qlora_studio.cli", "train", str(config),
               "--set", f"output_dir={work / 'cli'}", "--set", f"run_name={name}"]
        print("cli:", " ".join(cmd), flush=True)
        with open(work / f"{name}.log", "w") as log:
            subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
        return json.loads((work / "cli" / name / "run.json").read_text())

    def app_run() -> dict:
        nonlocal config
        proc, url = start_app(work)
        try:
            run_name, seen = train_in_browser(url, work / "runs", args.preset, args.steps, args.timeout)
        finally:
            stop_app(proc)
        run = work / "runs" / run_name
        rows = train_rows(run)
        missing = [r["step"] for r in rows if r["step"] not in seen]
        if missing:
            raise SystemExit(f"the chart never showed steps {missing}")
        latencies.extend(seen[r["step"]] / 1000 - r["wall_time"] for r in rows)
        config = run / "config.yaml"
        return json.loads((run / "run.json").read_text())

    for repeat in range(args.repeats):
        # Repeat 0 starts with the app: its run writes the config.yaml the CLI trains.
        app_info, cli_info = alternate(repeat, app_run, lambda: cli_run(repeat))
        app_tps.append(app_info["tokens_per_s"])
        cli_tps.append(cli_info["tokens_per_s"])
        app_s.append(app_info["train_seconds"])
        cli_s.append(cli_info["train_seconds"])
        print(f"repeat {repeat + 1}: app {app_tps[-1]} tok/s, CLI {cli_tps[-1]} tok/s", flush=True)

    # Same config, so the same tokens: a ratio of times is the ratio of throughputs.
    pair_ratios = [round(c / a, 3) for c, a in zip(cli_s, app_s)]
    summary = {
        "app_tokens_per_s": app_tps, "cli_tokens_per_s": cli_tps, "pair_ratios": pair_ratios,
        "ratio": round(statistics.median(pair_ratios), 3), "ratio_of_totals": round(sum(cli_s) / sum(app_s), 3),
        "app_train_s": app_s, "cli_train_s": cli_s,
        "latency_median_s": round(statistics.median(latencies), 3),
        "latency_p90_s": round(percentile(latencies, 0.9), 3), "latency_max_s": round(max(latencies), 3),
        "points": len(latencies), "work": str(work),
    }
    print(json.dumps(summary, indent=2))
    if args.no_record:
        return
    setup = f"{args.preset}, {args.steps} steps x {args.repeats}, live view in sight"
    print(append_result(
        "UI overhead: run launched from the app (browser open) vs the CLI", args.device,
        ["setup", "app tok/s", "CLI tok/s", "app train s", "CLI train s", "ratio (≥0.95)"],
        [setup, " / ".join(map(str, app_tps)), " / ".join(map(str, cli_tps)), round(sum(app_s), 1),
         round(sum(cli_s), 1), f"{summary['ratio']}" + (
             f" (median of {', '.join(map(str, pair_ratios))}; totals {summary['ratio_of_totals']})"
             if args.repeats > 1 else "")], command_line()))
    print(append_result(
        "Metrics to screen: metrics.jsonl line written to point on the chart", args.device,
        ["setup", "points", "median s", "p90 s", "max s", "page poll"],
        [setup, len(latencies), summary["latency_median_s"], summary["latency_p90_s"], summary["latency_max_s"],
         _page_poll(args.device)], command_line()))


def _page_poll(device: str) -> str:
    from qlora_studio.ui import train_tab

    if device == "cuda":
        return f"on change, looked at every {train_tab.POLL_RUNNING_S:g} s"
    return (f"on change, looked at every {train_tab.POLL_RUNNING_CPU_S:g} s, "
            f"chart at most every {train_tab.CHART_EVERY_CPU_S:g} s")


if __name__ == "__main__":
    main()
