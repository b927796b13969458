"""The live view of a run: an incremental reader of its folder, and what the tab draws from it.

A "watch" is a plain dict kept in each browser session's gr.State: the run folder, how far
metrics.jsonl has been read, the rows so far, and what was last shown. Polling it reads only
new bytes, so a tick on an unchanged run costs three stat() calls and no redraw.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

from gradio.components.plot import PlotData

from ..runs import read_metrics, read_status

LOG_LINES = 30
STATUS_KEYS = ("state", "reason")
STEP_KEYS = ("step", "max_steps")
COLORS = ("#f97316", "#2563eb", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#db2777")


# -- the watch -----------------------------------------------------------------------------

def new_watch(run_dir: str | Path) -> dict:
    return {"run": str(run_dir), "ino": None, "offset": 0, "rows": [], "status": {}, "log_size": -1}


def poll(watch: dict) -> set[str]:
    """Read what is new in the run folder into `watch`; return which parts changed."""
    run = Path(watch["run"])
    changed: set[str] = set()
    try:
        stat = (run / "metrics.jsonl").stat()
        ino, size = stat.st_ino, stat.st_size
    except OSError:
        ino, size = None, 0
    if ino != watch["ino"] or size < watch["offset"]:
        # A resume rewrites metrics.jsonl (rows after the checkpoint are dropped): read it afresh.
        if watch["rows"]:
            changed.add("metrics")
        watch.update(ino=ino, offset=0, rows=[])
    if size > watch["offset"]:
        rows, watch["offset"] = read_metrics(run, watch["offset"])
        if rows:
            watch["rows"].extend(rows)
            changed.add("metrics")
    status = read_status(run)
    for part, keys in (("status", STATUS_KEYS), ("step", STEP_KEYS)):
        if any(status.get(k) != watch["status"].get(k) for k in keys):
            changed.add(part)
    watch["status"] = status
    try:
        log_size = (run / "train.log").stat().st_size
    except OSError:
        log_size = _size(run / "console.log")
    if log_size != watch["log_size"]:
        watch["log_size"] = log_size
        changed.add("log")
    return changed


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def train_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("type") == "train" and r.get("loss") is not None]


def eval_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("type") == "eval" and r.get("eval_loss") is not None]


# -- log tail ------------------------------------------------------------------------------------

def log_tail(run_dir: str | Path, lines: int = LOG_LINES) -> str:
    """The last lines of train.log (console.log when the process died before logging began)."""
    run = Path(run_dir)
    for name in ("train.log", "console.log"):
        path = run / name
        if _size(path) == 0:
            continue
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - 64 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])
    return ""


# -- figures -------------------------------------------------------------------------------------

def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Debiased exponential moving average (as TensorBoard draws it); smoother for longer runs."""
    if weight is None:
        weight = 0.6 if len(values) <= 25 else min(0.95, 1 - 10 / len(values))
    out, last, n = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):  # a nan/inf step leaves a gap, not a line lost from there on
            out.append(math.nan)
            continue
        n += 1
        last = weight * last + (1 - weight) * value
        out.append(last / (1 - weight**n))
    return out


def loss_figure(rows: list[dict], run_name: str = "") -> PlotData:
    """Train loss (raw and smoothed) and eval loss by step. (The learning rate is in the progress
    line: a panel of its own cost the browser a quarter of each redraw while following a run.)"""
    train, evals = train_rows(rows), eval_rows(rows)
    steps = [r["step"] for r in train]
    losses = [r["loss"] for r in train]
    marker_mode = "lines+markers" if len(train) <= 60 else "lines"
    data = [
        _scatter(steps, losses, "train loss", mode=marker_mode, opacity=0.35,
                 line={"color": COLORS[0], "width": 1}, marker={"size": 4}),
        _scatter(steps, smooth(losses), "train loss (smoothed)", line={"color": COLORS[0], "width": 2.5}),
        _scatter([r["step"] for r in evals], [r["eval_loss"] for r in evals], "eval loss", mode="lines+markers",
                 line={"color": COLORS[1], "dash": "dot"}, marker={"size": 9, "symbol": "diamond"}),
    ]
    axes = {"xaxis": {"title": {"text": "step"}}, "yaxis": {"title": {"text": "loss"}}}
    return _plot(data, axes, run_name or "none", empty=not train and not evals)


def overlay_figure(series: list[tuple[str, list[dict]]]) -> PlotData:
    """Several runs' loss curves in one chart: smoothed train loss solid, eval loss dotted."""
    data = []
    for i, (name, rows) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        train, evals = train_rows(rows), eval_rows(rows)
        data.append(_scatter([r["step"] for r in train], smooth([r["loss"] for r in train]), f"{name} · train",
                             legendgroup=name, line={"color": color, "width": 2}))
        if evals:
            data.append(_scatter([r["step"] for r in evals], [r["eval_loss"] for r in evals], f"{name} · eval",
                                 mode="lines+markers", legendgroup=name, line={"color": color, "dash": "dot"},
                                 marker={"symbol": "diamond", "size": 8}))
    axes = {"xaxis": {"title": {"text": "step"}}, "yaxis": {"title": {"text": "loss (train smoothed)"}}}
    return _plot(data, axes, "runs", empty=not series, empty_text="Pick runs to compare")


def traces(figure: PlotData) -> list[dict]:
    """The traces of a figure made here, as plotly JSON (name, x, y, ...)."""
    return json.loads(figure.plot)["data"]


def _scatter(x: list, y: list, name: str, mode: str = "lines", **style) -> dict:
    # A diverged run logs nan/inf, which JSON cannot carry: plotly draws null as a gap.
    y = [v if isinstance(v, (int, float)) and math.isfinite(v) else None for v in y]
    return {"type": "scatter", "x": x, "y": y, "name": name, "mode": mode, **style}


GRID = {"showgrid": True, "gridcolor": "#e5e7eb", "zeroline": False, "showline": True, "linecolor": "#cbd5e1"}


def _plot(data: list[dict], axes: dict, uirevision: str, empty: bool,
          empty_text: str = "Waiting for the first logged step…") -> PlotData:
    # Drawn on every logged step while a page watches a run, so kept cheap (bench/bench_ui.py):
    # plotly JSON written directly (building a plotly Figure and serialising it took ~40 ms of
    # the server's CPU per draw), no template (plotly.py adds its default one, 7 KB the browser
    # merges on every draw), no title (Gradio forces a 100 px top margin for one; the run's name
    # is in the status line), and the legend inside the plot so the margins never grow.
    # uirevision keeps the user's zoom across updates.
    layout = {"height": 430, "plot_bgcolor": "white", "paper_bgcolor": "white", "font": {"color": "#334155"},
              "margin": {"l": 60, "r": 20, "t": 20, "b": 40}, "hovermode": "x unified", "uirevision": uirevision,
              "legend": {"x": 0.99, "xanchor": "right", "y": 0.99, "bgcolor": "rgba(255,255,255,0.75)"},
              **{name: {**GRID, **axis} for name, axis in axes.items()}}
    if empty:
        layout["annotations"] = [{"text": empty_text, "showarrow": False, "xref": "paper", "yref": "paper",
                                  "x": 0.5, "y": 0.6, "font": {"size": 14, "color": "#64748b"}}]
    return PlotData(type="plotly", plot=json.dumps({"data": data, "layout": layout}, allow_nan=False))


# -- progress and status -----------------------------------------------------------------

def _duration(seconds) -> str:
    if seconds is None:
        return "–"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def progress_html(rows: list[dict], status: dict) -> str:
    train = train_rows(rows)
    last = train[-1] if train else {}
    step = max(int(status.get("step") or 0), int(last.get("step") or 0))
    total = int(status.get("max_steps") or last.get("max_steps") or 0)
    pct = min(100.0, 100.0 * step / total) if total else 0.0
    state = status.get("state", "")
    recent = [r["tokens_per_s"] for r in train[-5:] if r.get("tokens_per_s")]
    tps = f"{sum(recent) / len(recent):,.0f}" if recent else "–"
    eta = _duration(last.get("eta_s")) if state == "running" else ("done" if state == "completed" else "–")
    color = {"failed": "#dc2626", "stopped": "#ca8a04", "completed": "#16a34a"}.get(state, "#f97316")
    lr = last.get("learning_rate")
    items = [("step", f"{step}/{total or '?'}"), ("epoch", f"{last.get('epoch', 0):.2f}" if last else "–"),
             ("elapsed", _duration(last.get("elapsed_s"))), ("ETA", eta), ("tokens/s", tps),
             ("learning rate", f"{lr:.2e}" if isinstance(lr, (int, float)) else "–")]
    cells = "".join(f"<span><b>{k}</b> {html.escape(str(v))}</span>" for k, v in items)
    return (f'<div class="qs-progress" data-step="{step}" data-total="{total}">'
            f'<div style="background:#e5e7eb;border-radius:6px;height:12px;overflow:hidden">'
            f'<div style="width:{pct:.1f}%;height:100%;background:{color}"></div></div>'
            f'<div style="display:flex;flex-wrap:wrap;gap:1.4em;margin-top:6px;font-size:.92em">{cells}</div></div>')


FAILURE_TIPS = ("If it ran out of memory: lower train.batch_size (raise train.grad_accum to keep the effective "
                "batch) or data.max_length, turn on train.gradient_checkpointing, or store the base in 4 bit "
                "(quant.type=nf4).")


def status_html(status: dict, run_name: str) -> str:
    state = status.get("state") or "unknown"
    reason = status.get("reason") or ""
    icon, color = {"running": ("●", "#f97316"), "completed": ("✓", "#16a34a"), "stopped": ("■", "#ca8a04"),
                   "failed": ("✗", "#dc2626")}.get(state, ("?", "#64748b"))
    body = f'<b style="color:{color}">{icon} {html.escape(state)}</b> · <code>{html.escape(run_name)}</code>'
    if reason:
        body += f" — {html.escape(reason)}"
    if state == "failed":
        low = reason.lower()
        if low.startswith("out of memory"):
            tips = reason.split(":", 1)[1].strip()
            body += "<br>The run ran out of memory. Try: " + html.escape(tips) + "."
        elif "out of memory" in low or "killed" in low:
            body += "<br>" + html.escape(FAILURE_TIPS)
    if state in ("stopped", "failed"):
        body += "<br><small>Resume continues from the last checkpoint.</small>"
    return f'<div class="qs-status" data-state="{html.escape(state)}">{body}</div>'


def empty_status_html() -> str:
    return '<div class="qs-status" data-state="">No run selected. Start one, or pick one from the history.</div>'


def run_name_of(watch: dict | None) -> str:
    return os.path.basename(watch["run"]) if watch and watch.get("run") else ""
