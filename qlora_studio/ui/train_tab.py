"""The Train tab: the config form, pre-flight checks, the one trainer, the live view, run history.

Handlers are plain functions over plain values (form values in `train_form.FIELDS` order, a
watch dict, run names), so tests call them without a browser; `build_tab` only lays out the
components and wires them. Training runs as its own process through ctx.trainer (the same
`qlora-studio train` command); this tab only reads the run folder, so closing the page never
touches a run and reopening it reattaches to whatever is running.
"""

from __future__ import annotations

import asyncio
import copy
import html
import time
from collections.abc import Sequence
from pathlib import Path

import gradio as gr

from ..config import ConfigError, StudioConfig
from ..estimate import (estimate_memory, format_bytes, format_count, hardware_problems, load_model_config,
                        memory_advice, model_shape, scale_problems, unknown_targets)
from ..paths import PRESETS_DIR
from ..runs import list_runs, read_json, read_metrics, read_status, write_json_atomic
from ..supervisor import TrainerBusy
from . import train_form as form
from .train_live import (LOG_LINES, empty_status_html, log_tail, loss_figure, new_watch, overlay_figure, poll, progress_html,
                         run_name_of, status_html)

HISTORY_COLUMNS = ["name", "model", "dataset", "preset", "status", "steps", "train loss", "eval loss", "duration"]
DEFAULT_PRESET = "quick-cpu"
LAUNCH_FILE = "launch.json"  # written next to a run this tab starts: {"preset": ...}; runs.summarize_run reads it
DEMO_MESSAGE = ("Training is turned off in this public demo. Duplicate the Space (⋮ menu → <b>Duplicate this "
                "Space</b>) to train on your own hardware, or run QLoRA Studio locally.")


def _hardware(ctx):
    if ctx.hardware is not None:
        return ctx.hardware
    from ..models import detect_hardware
    return detect_hardware()


def _message(kind: str, text: str) -> str:
    """A short notice under the buttons; kind is ok | warn | error. `text` is trusted HTML."""
    color = {"ok": "#16a34a", "warn": "#b45309", "error": "#dc2626"}[kind]
    return f'<div class="qs-msg qs-{kind}" style="color:{color}">{text}</div>'


def _problem_html(error: ConfigError) -> str:
    return f"<b>{html.escape(error.field)}</b>: {html.escape(error.reason)}"


# -- model-dependent helpers -------------------------------------------------------------------

def _shape_of(config: StudioConfig):
    return model_shape(load_model_config(config.model.name, config.model.revision))


def module_choices(model_name: str, revision: str = "", selected: Sequence[str] = ()) -> list[str]:
    """'all-linear' plus the model's linear layer names (q_proj, ...), keeping what is selected."""
    names = ["all-linear"]
    try:
        names += model_shape(load_model_config(model_name or "", revision or "")).module_names()
    except Exception:  # unknown or unreachable model: the checklist still offers all-linear
        pass
    return names + [s for s in selected or () if s not in names]


def _modules_update(values: list) -> list:
    """Form values with target_modules as an update that also sets the model's choices."""
    i = form.FIELD_NAMES.index("lora.target_modules")
    selected = values[i]
    choices = module_choices(values[form.FIELD_NAMES.index("model.name")],
                             values[form.FIELD_NAMES.index("model.revision")], selected)
    values = list(values)
    values[i] = gr.update(choices=choices, value=selected)
    return values


# -- checks before launch ---------------------------------------------------------------------------

def check_config(ctx, values: Sequence, gpus: int = 1,
                 fsdp: bool = False) -> tuple[StudioConfig | None, list[ConfigError], object]:
    """(config or None, problems naming fields, MemoryEstimate or an explanation string).

    `gpus`, `fsdp`: the launch on several GPUs picked next to the form (shown with 2+ GPUs only).
    """
    try:
        config = form.form_to_config(values)
    except ConfigError as e:
        return None, [e], ""
    hw = _hardware(ctx)
    gpus = int(gpus or 1)
    problems = hardware_problems(config, hw)
    if gpus != 1 or fsdp:
        problems += scale_problems(config, hw, gpus, bool(fsdp))
    try:
        shape = _shape_of(config)
    except Exception as e:  # an estimate is advice: its absence never blocks a run
        return config, problems, f"No estimate for {config.model.name}: {e}"
    missing = unknown_targets(shape, config.lora.target_modules)
    if missing:
        problems.append(ConfigError("lora.target_modules", f"{', '.join(missing)} not in this model; its linear "
                                    f"layers are {', '.join(shape.module_names())}"))
    return config, problems, estimate_memory(shape, config, hw, gpus=gpus, fsdp=bool(fsdp) and gpus > 1)


def validation_html(problems: list[ConfigError]) -> str:
    if not problems:
        return '<div class="qs-validation qs-ok" style="color:#16a34a">✓ Config is valid.</div>'
    items = "".join(f"<li>{_problem_html(p)}</li>" for p in problems)
    return f'<div class="qs-validation qs-error" style="color:#dc2626"><ul style="margin:0">{items}</ul></div>'


def estimate_html(estimate, config: StudioConfig | None, hw, gpus: int = 1) -> str:
    if config is None:
        return ""
    if isinstance(estimate, str):
        return f'<div class="qs-estimate"><i>{html.escape(estimate)}</i></div>'
    p = estimate.params
    where = (f"{hw.name} ({format_bytes(estimate.available)})" if estimate.device == "cuda"
             else f"CPU RAM ({format_bytes(estimate.available)})")
    if estimate.device == "cuda" and int(gpus or 1) > 1:
        where = f"each of {int(gpus)} × {where}"
    rows = "".join(f"<tr><td>{k}</td><td style='text-align:right'>{format_bytes(v)}</td></tr>"
                   for k, v in estimate.breakdown())
    verdict_color = {"ok": "#16a34a", "tight": "#b45309", "too_big": "#dc2626"}[estimate.level]
    verdict = {"ok": "fits", "tight": "fits, but tight", "too_big": "will not fit"}[estimate.level]
    out = (f'<div class="qs-estimate" data-level="{estimate.level}" data-trainable="{p.trainable}">'
           f"<b>Trainable parameters:</b> {format_count(p.trainable)} of {format_count(p.total)} "
           f"({p.percent:.2f}%)<br>"
           f"<b>Memory estimate:</b> <span style='color:{verdict_color}'><b>{format_bytes(estimate.total)}</b> "
           f"of {where} — {verdict}</span>"
           f"<details><summary>breakdown ({estimate.compute_dtype} compute)</summary>"
           f"<table style='font-size:.9em'>{rows}</table></details>")
    if estimate.level != "ok":
        tips = memory_advice(estimate, config)
        if tips:
            out += "<b>To shrink it:</b> " + html.escape("; ".join(tips)) + "."
    for note in estimate.notes:
        out += f"<br><small>{html.escape(note)}</small>"
    return out + "</div>"


def preview(ctx, values: Sequence, preset: str | None, gpus: int = 1, fsdp: bool = False):
    """On every form change: (validation html, estimate html, YAML, command)."""
    config, problems, estimate = check_config(ctx, values, gpus, fsdp)
    if config is None:
        return validation_html(problems), "", gr.skip(), gr.skip()
    return (validation_html(problems), estimate_html(estimate, config, _hardware(ctx), gpus),
            form.config_yaml(config, preset), form.with_scale(form.train_command(config, preset), gpus, fsdp))


# -- presets, data, loading configs ---------------------------------------------------------------

def config_values(ctx, config: StudioConfig) -> list:
    """Form values for a config, writing runs where this app keeps them."""
    return form.set_value(form.config_to_form(config), "output_dir", str(ctx.runs_root))


def initial_values(ctx) -> tuple[list, str | None]:
    presets = form.list_presets()
    preset = DEFAULT_PRESET if DEFAULT_PRESET in presets else None
    config = form.load_preset(preset) if preset else StudioConfig()
    return config_values(ctx, config), preset


def on_preset(ctx, name: str, data: dict | None, presets_dir: Path = PRESETS_DIR) -> list:
    """A preset into the form; the dataset chosen in the Dataset tab stays."""
    if not name:
        return [gr.skip()] * len(form.FIELDS)
    values = config_values(ctx, form.load_preset(name, presets_dir))
    return _modules_update(form.apply_data(values, data))


def on_data_change(data: dict | None) -> list:
    """The Dataset tab picked data: show it in the form's data fields."""
    if not data:
        return [gr.skip()] * len(form.DATA_FIELDS)
    out = []
    for spec in form.DATA_FIELDS:
        key = spec.name.split(".", 1)[1]
        out.append(form.form_value(spec, data[key]) if data.get(key) is not None else gr.skip())
    return out


def on_save_preset(name: str, values: Sequence, presets_dir: Path = PRESETS_DIR):
    """(message html, preset dropdown update)."""
    try:
        config = form.form_to_config(values)
        path = form.save_preset(name, config, presets_dir)
    except ConfigError as e:
        return _message("error", "Not saved: " + _problem_html(e)), gr.skip()
    except (ValueError, OSError) as e:
        return _message("error", html.escape(str(e))), gr.skip()
    return (_message("ok", f"Saved <code>presets/{html.escape(path.name)}</code>"),
            gr.update(choices=form.list_presets(presets_dir), value=path.stem))


def _run_dir(ctx, name: str | None) -> Path | None:
    """A run folder under the runs root by its name; None for anything else."""
    name = (name or "").strip()
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        return None
    path = ctx.runs_root / name
    return path if (path / "status.json").exists() or (path / "config.yaml").exists() else None


def load_run_config(ctx, name: str) -> list:
    """A past run's config into the form, as a starting point for a new run."""
    run_dir = _run_dir(ctx, name)
    if run_dir is None:
        raise gr.Error("Pick a run in the history first.")
    config = StudioConfig.load(run_dir)
    requested = read_json(run_dir / "run.json").get("requested_compute_dtype")
    overrides = ["run_name="]  # a new run needs a new folder
    if requested:  # the saved config holds the dtype 'auto' resolved to on that machine
        overrides.append(f"quant.compute_dtype={requested}")
    return _modules_update(config_values(ctx, config.with_overrides(overrides)))


# -- train / stop / resume ------------------------------------------------------------------------------

def start_training(ctx, values: Sequence, preset: str | None = None, gpus: int = 1, fsdp: bool = False):
    """Train click: (message html, watch or skip, session run or skip)."""
    if ctx.settings.demo:
        return _message("warn", DEMO_MESSAGE), gr.skip(), gr.skip()
    config, problems, estimate = check_config(ctx, values, gpus, fsdp)
    if problems:
        return _message("error", "Not started: " + "; ".join(_problem_html(p) for p in problems)), gr.skip(), gr.skip()
    gpus = int(gpus or 1)
    try:
        # Several GPUs: the same command through accelerate launch, one process per GPU.
        scale = {"gpus": gpus, "fsdp": bool(fsdp)} if gpus > 1 else {}
        run_dir = ctx.trainer.start(config, **scale)
    except TrainerBusy as e:
        return _message("warn", html.escape(str(e))), gr.skip(), gr.skip()
    write_json_atomic(run_dir / LAUNCH_FILE, {"preset": preset or ""})
    text = f"Started <code>{html.escape(run_dir.name)}</code>. It keeps running if you close this page."
    if not isinstance(estimate, str) and not estimate.fits:
        text += (f" Warning: the estimate ({format_bytes(estimate.total)}) exceeds the "
                 f"{format_bytes(estimate.available)} available; it may run out of memory.")
    kind = "ok" if isinstance(estimate, str) or estimate.fits else "warn"
    return _message(kind, text), new_watch(run_dir), str(run_dir)


def stop_training(ctx, watch: dict | None) -> str:
    """Stop click: asks the watched run (or whatever is running) to save its adapter and stop."""
    target = watch["run"] if watch and watch.get("run") else None
    if target is None or read_status(target).get("state") != "running":
        active = ctx.trainer.active()
        target = active["run_dir"] if active else None
    if target is None:
        return _message("warn", "Nothing is training.")
    return _message("ok", html.escape(ctx.trainer.stop(target)))


def resume_training(ctx, name: str):
    """Resume click on a stopped or failed run: (message html, watch or skip, session run or skip)."""
    if ctx.settings.demo:
        return _message("warn", DEMO_MESSAGE), gr.skip(), gr.skip()
    run_dir = _run_dir(ctx, name)
    if run_dir is None:
        return _message("warn", "Pick a stopped or failed run in the history first."), gr.skip(), gr.skip()
    state = read_status(run_dir).get("state")
    if state not in ("stopped", "failed"):
        return (_message("warn", f"<code>{html.escape(run_dir.name)}</code> is {html.escape(str(state))}; only a "
                         "stopped or failed run can be resumed."), gr.skip(), gr.skip())
    try:
        ctx.trainer.resume(run_dir)
    except TrainerBusy as e:
        return _message("warn", html.escape(str(e))), gr.skip(), gr.skip()
    return (_message("ok", f"Resuming <code>{html.escape(run_dir.name)}</code> from its last checkpoint."),
            new_watch(run_dir), str(run_dir))


# -- live view ---------------------------------------------------------------------------------------------

def render(watch: dict) -> tuple:
    """Everything the live view shows for a watch: (figure, progress, status, log)."""
    name = run_name_of(watch)
    watch.update(drawn=len(watch["rows"]), drawn_at=time.monotonic())
    return (loss_figure(watch["rows"], name), progress_html(watch["rows"], watch["status"]),
            status_html(watch["status"], name), log_tail(watch["run"]))


def tick(ctx, watch: dict | None):
    """One look at the run folder: (watch, figure, progress, status, log, history table, run dropdown, session run).

    Unchanged parts come back as gr.skip(), so an idle run costs no redraw. A session that
    watches nothing (a fresh page) attaches to the machine's running training, if any.
    """
    skip = gr.skip()
    attached = False
    if not watch or not watch.get("run"):
        active = ctx.trainer.active()
        if not active:
            return (skip,) * 8
        watch, attached = new_watch(active["run_dir"]), True
    previous_state = (watch["status"].get("state"), watch["status"].get("reason"))
    changed = poll(watch)
    state_changed = attached or (watch["status"].get("state"), watch["status"].get("reason")) != previous_state
    # The chart may lag the progress line by up to chart_every_s(ctx); it always catches up when
    # the run's state changes (so a finished run shows every point).
    now = time.monotonic()
    unshown = "metrics" in changed or watch.get("drawn") != len(watch["rows"])
    chart_due = attached or state_changed or now - watch.get("drawn_at", 0.0) >= chart_every_s(ctx)
    draw = attached or (unshown and chart_due)
    if not changed and not draw:
        return (skip,) * 8
    name = run_name_of(watch)
    figure = skip
    if draw:
        figure = loss_figure(watch["rows"], name)
        watch.update(drawn=len(watch["rows"]), drawn_at=now)
    progress = progress_html(watch["rows"], watch["status"]) if changed & {"metrics", "status", "step"} or attached else skip
    status = status_html(watch["status"], name) if "status" in changed or attached else skip
    log = log_tail(watch["run"]) if "log" in changed or attached else skip
    if state_changed:
        table, names = history(ctx)
        dropdown = gr.update(choices=names, value=name)
    else:
        table = dropdown = skip
    return watch, figure, progress, status, log, table, dropdown, (watch["run"] if attached else skip)


# Seconds between the server's looks at the run folder for one page. Looking is a few stat()
# calls; the page hears only of changes, at most one update per look, because each update costs
# the browser a Gradio event and a chart redraw. On a machine without a GPU that CPU comes out of
# the training run, and costs it about three times its own share: each time the browser runs, it
# stalls one of the two OpenMP threads that the other then waits for (bench/bench_ui.py: updates
# every 2 s took 14% of a 2-core run's tokens/s). There the page shows new steps every 5 s.
POLL_RUNNING_S = 1.0
POLL_RUNNING_CPU_S = 5.0
POLL_IDLE_S = 5.0


# A chart redraw in sight costs the browser several times a progress update (bench/bench_ui.py),
# so on a machine without a GPU the chart is redrawn at most every CHART_EVERY_CPU_S.
CHART_EVERY_CPU_S = 10.0


def _on_gpu(ctx) -> bool:
    hw = getattr(ctx, "hardware", None)
    return hw is not None and hw.device == "cuda"


def running_poll_s(ctx) -> float:
    return POLL_RUNNING_S if _on_gpu(ctx) else POLL_RUNNING_CPU_S


def chart_every_s(ctx) -> float:
    return 0.0 if _on_gpu(ctx) else CHART_EVERY_CPU_S


async def follow(ctx, watch: dict | None, session: str):
    """The live view's stream for one browser session: yields tick()'s outputs (less the watch)
    whenever something changed, and nothing otherwise.

    A page starts one at load and a new one whenever it shows another run; the newest stream of a
    session ends the older one, and closing the page ends it (stop_following). Unlike a timer, an
    unchanged run costs the browser nothing.
    """
    token = object()
    ctx.followers[session] = token
    watch = copy.deepcopy(watch) if watch and watch.get("run") else None
    first = True
    try:
        while ctx.followers.get(session) is token:
            out = await asyncio.to_thread(tick, ctx, watch)  # file reads stay off the server's event loop
            if not gr_is_skip(out[0]):
                watch = out[0]
            # The first yield, even of nothing, ends the outputs' "pending" state in the page, where
            # Gradio animates a (hidden) progress timer every frame for as long as it lasts.
            if first or not all(gr_is_skip(o) for o in out[1:]):
                yield out[1:]
            first = False
            running = bool(watch) and watch["status"].get("state") == "running"
            await asyncio.sleep(running_poll_s(ctx) if running else POLL_IDLE_S)
    finally:
        if ctx.followers.get(session) is token:
            del ctx.followers[session]


def stop_following(ctx, session: str) -> None:
    """The page closed: its stream ends at its next look."""
    ctx.followers.pop(session, None)


def gr_is_skip(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1


def select_run(ctx, name: str):
    """Pick a run to show: (watch, session run, figure, progress, status, log)."""
    run_dir = _run_dir(ctx, name)
    if run_dir is None:
        return (None, gr.skip(), loss_figure([], ""), "", empty_status_html(), "")
    watch = new_watch(run_dir)
    poll(watch)
    return (watch, str(run_dir), *render(watch))


# -- history ----------------------------------------------------------------------------------------------

def _fmt_loss(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""


def _fmt_duration(seconds) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m {seconds % 60:02d}s"


def history(ctx):
    """(table rows as a DataFrame with HISTORY_COLUMNS, run names), newest first."""
    import pandas as pd

    rows, names = [], []
    for run in list_runs(ctx.runs_root):
        rows.append([run.name, run.model, run.dataset, run.preset, run.state, f"{run.step}/{run.max_steps or '?'}",
                     _fmt_loss(run.train_loss), _fmt_loss(run.eval_loss), _fmt_duration(run.duration_s)])
        names.append(run.name)
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS), names


def refresh_history(ctx, selected: str | None, compared: Sequence[str] | None):
    """(table, run dropdown update, compare checklist update)."""
    table, names = history(ctx)
    keep = [n for n in compared or () if n in names]
    return (table, gr.update(choices=names, value=selected if selected in names else None),
            gr.update(choices=names, value=keep))


def on_load(ctx):
    """A page opened after runs were added: fresh table and choices, selections left to follow()."""
    table, names = history(ctx)
    return table, gr.update(choices=names), gr.update(choices=names)


def compare_runs(ctx, names: Sequence[str] | None):
    series = []
    for name in names or ():
        run_dir = _run_dir(ctx, name)
        if run_dir is not None:
            series.append((name, read_metrics(run_dir)[0]))
    return overlay_figure(series)


def name_from_table(table, evt: gr.SelectData) -> str:
    """A click on a history row selects that run."""
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    try:
        return str(table.iloc[row]["name"]) if hasattr(table, "iloc") else str(table[row][0])
    except (IndexError, KeyError, TypeError):
        return gr.skip()


# -- layout and wiring ------------------------------------------------------------------------------------

def _component(spec: form.FieldSpec, value, model_name: str):
    common = {"label": spec.label, "info": spec.info, "value": value}
    if spec.kind == "bool":
        return gr.Checkbox(**common)
    if spec.kind == "choice":
        return gr.Dropdown(choices=list(spec.choices), **common)
    if spec.kind in ("int", "float"):
        step = 1 if spec.kind == "int" else _float_step(value)
        return gr.Number(precision=0 if spec.kind == "int" else None, minimum=spec.minimum, maximum=spec.maximum,
                         step=step, min_width=180, **common)
    if spec.kind == "modules":
        return gr.CheckboxGroup(choices=module_choices(model_name, "", value), **common)
    if spec.name == "output_dir":
        common["info"] = "Runs started here go to the app's runs folder. `output_dir`"
        return gr.Textbox(interactive=False, max_lines=1, **common)
    placeholder = "prompt: question, completion: answer" if spec.kind == "mapping" else None
    return gr.Textbox(max_lines=1, placeholder=placeholder, **common)


def _float_step(value) -> float:
    """A spinner step one decade below the value (2e-4 steps by 1e-5), so arrows make sense."""
    import math
    if not value:
        return 0.01
    return 10 ** (math.floor(math.log10(abs(float(value)))) - 1)


def _form_layout(values: list) -> dict:
    """Build the components grouped by section, advanced ones in a closed accordion; name -> component."""
    comps: dict = {}
    by_name = dict(zip(form.FIELD_NAMES, values))
    groups: dict[str, list] = {}
    for spec in form.FIELDS:
        if not spec.advanced:
            groups.setdefault(form.SECTION_TITLES[spec.section], []).append(spec)
    advanced = [s for s in form.FIELDS if s.advanced]

    def place(specs):
        for start in range(0, len(specs), 3):
            with gr.Row(equal_height=False):
                for spec in specs[start:start + 3]:
                    comps[spec.name] = _component(spec, by_name[spec.name], by_name["model.name"])

    for title, specs in groups.items():
        with gr.Accordion(title, open=True):
            place(specs)
    with gr.Accordion("Advanced", open=False):
        place(advanced)
    return comps


def scale_controls_visible(hw) -> bool:
    """'GPUs to use' and FSDP are offered only where more than one GPU is visible."""
    return hw.device == "cuda" and hw.gpu_count > 1


def _scale_controls(hw):
    """(GPUs to use, FSDP): hidden, at 1 GPU and off, on a machine with fewer than two GPUs."""
    with gr.Row(visible=scale_controls_visible(hw), equal_height=True):
        gpus = gr.Dropdown(choices=list(range(1, max(hw.gpu_count, 1) + 1)), value=1, label="GPUs to use",
                           info="One training process per GPU (DDP, through accelerate launch): each GPU holds "
                                "the 4-bit model and trains on its own batches, so the effective batch grows "
                                "and an epoch takes fewer steps.")
        fsdp = gr.Checkbox(value=False, label="FSDP: shard the model across the GPUs",
                           info="For a model that does not fit on one GPU next to its training state: FSDP + "
                                "QLoRA splits the 4-bit base, adapter and optimizer over the GPUs. Needs bf16.")
    return gpus, fsdp


def build_tab(ctx, session) -> None:
    """The Train tab's components and events; call inside `with gr.Tab("Train"):`."""
    values, preset = initial_values(ctx)
    hw = _hardware(ctx)
    first = preview(ctx, values, preset)
    table0, names0 = history(ctx)
    watch = gr.State(None)

    gr.Markdown(f"Hardware: **{html.escape(hw.name)}** ({hw.device}, {hw.memory_gb:g} GiB"
                f"{', bf16' if hw.bf16 else ''}). One training runs at a time on this machine.")
    with gr.Row(equal_height=True):
        preset_dd = gr.Dropdown(choices=form.list_presets(), value=preset, label="Preset", scale=2,
                                info="Loads a preset into the form (the dataset picked in the Dataset tab stays).")
        preset_name = gr.Textbox(label="Save the form as preset", placeholder="my-preset", scale=2, max_lines=1)
        save_btn = gr.Button("Save preset", scale=1)
    save_msg = gr.HTML()
    validation = gr.HTML(first[0])
    with gr.Row():
        with gr.Column(scale=3):
            comps = _form_layout(values)
        with gr.Column(scale=2):
            gpus_dd, fsdp_cb = _scale_controls(hw)
            estimate = gr.HTML(first[1])
            with gr.Row():
                train_btn = gr.Button("Train", variant="primary")
                stop_btn = gr.Button("Stop", variant="stop")
            train_msg = gr.HTML()
            with gr.Accordion("Config as YAML and command", open=False):
                command = gr.Textbox(first[3], label="Equivalent command", buttons=["copy"])
                yaml_code = gr.Code(first[2], language="yaml", label="config.yaml")
    inputs = [comps[name] for name in form.FIELD_NAMES]
    data_inputs = [comps[spec.name] for spec in form.DATA_FIELDS]

    gr.Markdown("### Live run")
    status = gr.HTML(empty_status_html())
    progress = gr.HTML()
    plot = gr.Plot(loss_figure([], ""), label="Loss")
    log = gr.Textbox(label="train.log (last lines)", lines=10, max_lines=LOG_LINES, interactive=False, autoscroll=True)

    gr.Markdown("### Runs")
    with gr.Row(equal_height=True):
        run_dd = gr.Dropdown(choices=names0, value=None, label="Run", allow_custom_value=True, scale=3,
                             info="Shows the run above and hands it to the Chat and Export tabs.")
        resume_btn = gr.Button("Resume", scale=1)
        load_btn = gr.Button("Load config into form", scale=1)
        refresh_btn = gr.Button("Refresh", scale=1)
    table = gr.Dataframe(table0, headers=HISTORY_COLUMNS, interactive=False, wrap=True, label="History")
    compare = gr.CheckboxGroup(choices=names0, label="Compare loss curves")
    overlay = gr.Plot(overlay_figure([]), label="Compared runs")

    # -- events
    scale = [gpus_dd, fsdp_cb]  # after the form's values: (..., gpus, fsdp)
    gr.on([c.change for c in inputs + scale] + [preset_dd.change], lambda p, *v: preview(ctx, v[:-2], p, *v[-2:]),
          inputs=[preset_dd, *inputs, *scale], outputs=[validation, estimate, yaml_code, command],
          trigger_mode="always_last", show_progress="hidden", concurrency_limit=4, api_name="train_preview")
    preset_dd.input(lambda name, data: on_preset(ctx, name, data), inputs=[preset_dd, session.data], outputs=inputs,
                    api_name="train_load_preset")
    gr.on([comps["model.name"].blur, comps["model.name"].submit, comps["model.revision"].blur],
          lambda n, r, sel: gr.update(choices=module_choices(n, r, sel)),
          inputs=[comps["model.name"], comps["model.revision"], comps["lora.target_modules"]],
          outputs=comps["lora.target_modules"], api_visibility="undocumented")
    session.data.change(on_data_change, inputs=session.data, outputs=data_inputs, api_visibility="undocumented")
    save_btn.click(lambda name, *v: on_save_preset(name, v), inputs=[preset_name, *inputs],
                   outputs=[save_msg, preset_dd], api_name="train_save_preset")

    train_btn.click(lambda p, *v: start_training(ctx, v[:-2], p, *v[-2:]), inputs=[preset_dd, *inputs, *scale],
                    outputs=[train_msg, watch, session.run], api_name="train_start")
    stop_btn.click(lambda w: stop_training(ctx, w), inputs=watch, outputs=train_msg, api_name="train_stop")
    resume_btn.click(lambda n: resume_training(ctx, n), inputs=run_dd, outputs=[train_msg, watch, session.run],
                     api_name="train_resume")

    async def follow_session(w, request: gr.Request):
        async for out in follow(ctx, w, request.session_hash):
            yield out

    live = {"fn": follow_session, "inputs": watch,
            "outputs": [plot, progress, status, log, table, run_dd, session.run],
            "show_progress": "hidden", "concurrency_limit": None, "api_visibility": "undocumented"}
    watch.change(**live)  # started, resumed or picked a run: follow that one

    shown = [watch, session.run, plot, progress, status, log]
    run_dd.input(lambda n: select_run(ctx, n), inputs=run_dd, outputs=shown, api_name="train_select_run")
    table.select(name_from_table, inputs=table, outputs=run_dd, api_visibility="undocumented").then(
        lambda n: select_run(ctx, n), inputs=run_dd, outputs=shown, api_visibility="undocumented")
    load_btn.click(lambda n: load_run_config(ctx, n), inputs=run_dd, outputs=inputs, api_name="train_load_run_config")
    compare.change(lambda names: compare_runs(ctx, names), inputs=compare, outputs=overlay, api_name="train_compare")
    refresh_btn.click(lambda s, c: refresh_history(ctx, s, c), inputs=[run_dd, compare],
                      outputs=[table, run_dd, compare], api_name="train_history")
    # A page opened after runs were added must not show the table as it was at start-up.
    gr.on(None, lambda: on_load(ctx), inputs=[], outputs=[table, run_dd, compare],
          api_visibility="undocumented").then(**live)  # and follow whatever runs on the machine
