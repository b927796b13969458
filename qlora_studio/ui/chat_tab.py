"""Chat tab: the base model's answer and the adapted model's answer to the same prompt, side by side.

Handlers are plain functions and generators over plain values (tested without a browser);
`build_tab` lays out components and wires them. The loaded model is the app's shared
`ctx.model_pool`; each browser session keeps its own two histories in a gr.State.
"""

from __future__ import annotations

import html
import tempfile
import uuid
from pathlib import Path

import gradio as gr

from ..chat import (TEMPLATE_CHOICES, ChatError, GenerationSettings, ModelPool, batch_compare, build_messages,
                    eval_split_prompts, resolve_adapter, stream_compare, write_csv)
from .export_tab import run_choices

PROMPTS_FROM = ("Pasted prompts", "The run's eval split")
DEFAULTS = GenerationSettings()


# --- plain handlers -----------------------------------------------------------------------

def new_state(owner: str | None = None) -> dict:
    """One session's chat: each side's own history and the last prompt each side received."""
    return {"owner": owner or uuid.uuid4().hex, "base": [], "adapted": [], "raw": ["", ""]}


def _ensure(state: dict | None) -> dict:
    return state if state and "owner" in state else new_state()


def _error(message: str) -> str:
    return f"**{html.escape(message)}**"


def _check_allowed(source: str, allowed_roots: list[Path] | None) -> None:
    """In demo mode a typed folder must lie under the app's own folders (runs, uploads)."""
    if allowed_roots is None or not source:
        return
    path = Path(source).expanduser()
    if not path.exists():
        return  # a Hub id, or a missing path that resolve_adapter reports
    resolved = path.resolve()
    if not any(resolved == root.resolve() or root.resolve() in resolved.parents for root in allowed_roots):
        raise ChatError(f"{source} is outside the folders this app may read; pick a run or upload a .zip")


def choose_adapter(source: str | None, allowed_roots: list[Path] | None = None):
    """A picked adapter -> (adapter source kept by the session, summary, template, system prompt).

    The template and system prompt it was trained with are preselected; on a bad pick the
    previous choices stay and the summary says what is wrong.
    """
    source = (source or "").strip()
    if not source:
        return "", "Pick a run, give an adapter folder or .zip, or a Hub adapter id.", gr.update(), gr.update()
    try:
        _check_allowed(source, allowed_roots)
        info = resolve_adapter(source)
    except ChatError as e:
        return "", _error(str(e)), gr.update(), gr.update()
    label = dict((name, label) for label, name in TEMPLATE_CHOICES).get(info.template, info.template)
    parts = [f"Adapter **{html.escape(info.label)}** on base **{html.escape(info.base_display)}**",
             f"trained with template: {label}" + (f", system prompt: “{html.escape(info.system_prompt)}”"
                                                  if info.system_prompt else "")]
    parts += [html.escape(note) for note in info.notes]
    return source, " · ".join(parts), info.template, info.system_prompt


def settings_from_ui(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, greedy) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                              top_k=int(top_k), repetition_penalty=float(repetition_penalty), seed=int(seed or 0),
                              greedy=bool(greedy))


def _stats_line(stats: dict) -> str:
    if not stats:
        return ""
    mode = "one batched generate" if stats.get("mode") == "mixed-batch" else "base, then adapted"
    first = lambda s: f"{s:.2f} s" if s is not None else "–"  # noqa: E731
    return (f"First token: base {first(stats.get('ttft_base_s'))}, adapted {first(stats.get('ttft_adapted_s'))} · "
            f"{stats.get('base_tokens', 0)} + {stats.get('adapted_tokens', 0)} tokens in "
            f"{stats.get('elapsed_s', 0):.2f} s ({mode})")


def send(pool: ModelPool, source: str, state: dict | None, message: str, system: str, template: str,
         max_new_tokens=DEFAULTS.max_new_tokens, temperature=DEFAULTS.temperature, top_p=DEFAULTS.top_p,
         top_k=DEFAULTS.top_k, repetition_penalty=DEFAULTS.repetition_penalty, seed=DEFAULTS.seed,
         greedy=DEFAULTS.greedy):
    """Stream one turn. Yields (state, base chat, adapted chat, base raw prompt, adapted raw prompt,
    status, message box). Every yield carries the partial answers in the state, so a Stop keeps them."""
    state = _ensure(state)

    def unchanged(status: str, box: str = message):
        return state, state["base"], state["adapted"], state["raw"][0], state["raw"][1], status, box

    message = (message or "").strip()
    if not message:
        yield unchanged("Type a message first.")
        return
    if not source:
        yield unchanged("Pick an adapter first (a run, an adapter folder or .zip, or a Hub id).")
        return
    try:
        settings = settings_from_ui(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, greedy)
        info = resolve_adapter(source)
        base_messages = build_messages(state["base"], message, system or "")
        adapted_messages = build_messages(state["adapted"], message, system or "")
        user = {"role": "user", "content": message}
        # Show the question at once, and store the session's owner id before anything can be stopped.
        pending = [user, {"role": "assistant", "content": ""}]
        yield (state, state["base"] + pending, state["adapted"] + pending, state["raw"][0], state["raw"][1],
               "Waiting for the model…", "")
        for step in stream_compare(pool, info, base_messages, adapted_messages, template or info.template, settings,
                                   owner=state["owner"]):
            turn = {"owner": state["owner"],
                    "base": state["base"] + [user, {"role": "assistant", "content": step.base}],
                    "adapted": state["adapted"] + [user, {"role": "assistant", "content": step.adapted}],
                    "raw": [step.base_prompt or state["raw"][0], step.adapted_prompt or state["raw"][1]]}
            status = step.status or ("Done. " if step.done else "Generating… ") + _stats_line(step.stats)
            if step.done:
                status += f"\n\n{pool.describe()}"
            yield turn, turn["base"], turn["adapted"], turn["raw"][0], turn["raw"][1], status, ""
    except ChatError as e:
        yield unchanged(_error(str(e)))


def stop(pool: ModelPool, state: dict | None) -> str:
    state = _ensure(state)
    return "Stopping…" if pool.stop(state["owner"]) else "Nothing is running."


def clear(state: dict | None):
    """-> (state, base chat, adapted chat, base raw, adapted raw, status): both histories emptied."""
    fresh = new_state(_ensure(state)["owner"])
    return fresh, [], [], "", "", "Cleared: both sides start a new conversation."


def run_batch(pool: ModelPool, source: str, state: dict | None, prompts_text: str, prompts_from: str, system: str,
              template: str, max_new_tokens=DEFAULTS.max_new_tokens, temperature=DEFAULTS.temperature,
              top_p=DEFAULTS.top_p, top_k=DEFAULTS.top_k, repetition_penalty=DEFAULTS.repetition_penalty,
              seed=DEFAULTS.seed, greedy=DEFAULTS.greedy, batch_size: int = 4):
    """Batch compare. Yields (table rows, CSV path or None, status) as each batch of prompts finishes."""
    import pandas as pd

    state = _ensure(state)
    empty = pd.DataFrame(columns=["prompt", "base", "adapted"])
    if not source:
        yield empty, None, "Pick an adapter first."
        return
    try:
        settings = settings_from_ui(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, greedy)
        info = resolve_adapter(source)
        if prompts_from == PROMPTS_FROM[1]:
            yield empty, None, "Reading the run's eval split…"
            prompts, references = eval_split_prompts(info)
            kwargs = {"references": references, "prerendered": True}
        else:
            prompts, kwargs = [p for p in (prompts_text or "").splitlines() if p.strip()], {}
        total = len(prompts)
        rows = []
        yield empty, None, f"Comparing {total} prompts…"
        for rows in batch_compare(pool, info, prompts, system=system or "", template=template or info.template,
                                  settings=settings, batch_size=batch_size, owner=state["owner"], **kwargs):
            yield pd.DataFrame(rows), None, f"{len(rows)} of {total} prompts done…"
    except ChatError as e:
        yield empty, None, _error(str(e))
        return
    path = write_csv(rows, Path(tempfile.mkdtemp(prefix="qlora-chat-")) / "compare.csv")
    yield pd.DataFrame(rows), str(path), f"{len(rows)} of {total} prompts compared. The CSV is ready below."


# --- layout -------------------------------------------------------------------------------

def build_tab(ctx, session) -> None:
    pool: ModelPool = ctx.model_pool
    runs_root = Path(ctx.runs_root)
    allowed = None
    if getattr(ctx.settings, "demo", False):
        allowed = [runs_root, Path(ctx.settings.uploads_dir)]

    gr.Markdown("One prompt, two answers: the **base** model (adapter off) and the **adapted** model (adapter on), "
                "from one loaded copy of the base weights, streamed together with the same settings and seed.")
    source = gr.State("")
    chat_state = gr.State(None)
    with gr.Row():
        initial = run_choices(runs_root)
        run_dd = gr.Dropdown(initial, value=None, label="Run", scale=3, info="Finished runs with an adapter")
        refresh = gr.Button("↻ Refresh", size="sm", scale=0, min_width=100)
        path_box = gr.Textbox(label="…or an adapter folder / .zip path", scale=3, placeholder="runs/my-run/adapter")
        upload = gr.File(label="…or upload an adapter .zip", file_types=[".zip"], type="filepath", scale=2,
                         height=90)
        hub_box = gr.Textbox(label="…or a Hub adapter id (online)", scale=2, placeholder="user/my-adapter")
    summary = gr.Markdown("Pick a run, give an adapter folder or .zip, or a Hub adapter id.")

    with gr.Row():
        system = gr.Textbox(label="System prompt", scale=3, lines=1)
        template = gr.Dropdown(TEMPLATE_CHOICES, value="model", label="Chat template", scale=1,
                               info="Preselected: the template the adapter was trained with")
    with gr.Accordion("Generation settings (the same for both sides)", open=False):
        with gr.Row():
            max_new = gr.Slider(1, 2048, value=DEFAULTS.max_new_tokens, step=1, label="Max new tokens")
            temperature = gr.Slider(0.05, 2.0, value=DEFAULTS.temperature, step=0.05, label="Temperature")
            top_p = gr.Slider(0.05, 1.0, value=DEFAULTS.top_p, step=0.05, label="Top-p")
            top_k = gr.Slider(0, 200, value=DEFAULTS.top_k, step=1, label="Top-k (0 = off)")
        with gr.Row():
            rep = gr.Slider(0.8, 2.0, value=DEFAULTS.repetition_penalty, step=0.05, label="Repetition penalty")
            seed = gr.Number(value=DEFAULTS.seed, precision=0, minimum=0, label="Seed")
            greedy = gr.Checkbox(value=DEFAULTS.greedy, label="Greedy (deterministic; ignores sampling settings)")
    settings = [max_new, temperature, top_p, top_k, rep, seed, greedy]

    with gr.Row(equal_height=True):
        base_chat = gr.Chatbot(label="Base (adapter off)", height=420, elem_id="chat-base")
        adapted_chat = gr.Chatbot(label="Adapted (adapter on)", height=420, elem_id="chat-adapted")
    with gr.Row():
        message = gr.Textbox(label="Message", placeholder="Ask both models…", scale=6, lines=1)
        send_btn = gr.Button("Send", variant="primary", scale=1)
        stop_btn = gr.Button("Stop", variant="stop", scale=1)
        clear_btn = gr.Button("Clear", scale=1)
    status = gr.Markdown(pool.describe() if pool is not None else "")
    with gr.Accordion("Show raw prompt (the exact string each side received)", open=False):
        with gr.Row():
            base_raw = gr.Textbox(label="Base prompt", lines=8, interactive=False, buttons=["copy"])
            adapted_raw = gr.Textbox(label="Adapted prompt", lines=8, interactive=False, buttons=["copy"])

    with gr.Accordion("Batch compare", open=False):
        prompts_from = gr.Radio(list(PROMPTS_FROM), value=PROMPTS_FROM[0], label="Prompts from")
        prompts_box = gr.Textbox(label="Prompts (one per line)", lines=5)
        batch_btn = gr.Button("Compare all")
        batch_status = gr.Markdown()
        table = gr.Dataframe(headers=["prompt", "base", "adapted"], wrap=True, interactive=False, label="Results")
        csv_file = gr.File(label="Download CSV", interactive=False)

    # -- wiring --
    pick_outputs = [source, summary, template, system]
    run_dd.input(lambda s: choose_adapter(s, allowed), run_dd, pick_outputs).then(lambda s: s, run_dd, session.run)
    path_box.submit(lambda s: choose_adapter(s, allowed), path_box, pick_outputs, api_name="chat_choose_path")
    upload.upload(lambda s: choose_adapter(s), upload, pick_outputs)
    hub_box.submit(lambda s: choose_adapter(s, allowed), hub_box, pick_outputs)

    def refresh_runs(current):
        choices = run_choices(runs_root, current)
        return gr.update(choices=choices, value=current if current in [c[1] for c in choices] else None)

    refresh.click(refresh_runs, session.run, run_dd)

    def follow_session_run(current):
        # The Train and Export tabs put the run they show (or an imported bundle) into session.run.
        return (refresh_runs(current), *choose_adapter(current, allowed)) if current else \
            (gr.update(), gr.update(), gr.update(), gr.update(), gr.update())

    session.run.change(follow_session_run, session.run, [run_dd, *pick_outputs])

    def on_send(src, st, msg, sys_prompt, tmpl, *values):
        yield from send(pool, src, st, msg, sys_prompt, tmpl, *values)

    chat_outputs = [chat_state, base_chat, adapted_chat, base_raw, adapted_raw, status, message]
    chat_inputs = [source, chat_state, message, system, template, *settings]
    send_event = send_btn.click(on_send, chat_inputs, chat_outputs, api_name="chat_send")
    submit_event = message.submit(on_send, chat_inputs, chat_outputs)

    def on_batch(src, st, text, origin, sys_prompt, tmpl, *values):
        yield from run_batch(pool, src, st, text, origin, sys_prompt, tmpl, *values)

    batch_event = batch_btn.click(on_batch, [source, chat_state, prompts_box, prompts_from, system, template,
                                             *settings], [table, csv_file, batch_status], api_name="chat_batch")
    stop_btn.click(lambda st: stop(pool, st), chat_state, status, cancels=[send_event, submit_event, batch_event],
                   api_name="chat_stop")
    clear_btn.click(clear, chat_state, [chat_state, base_chat, adapted_chat, base_raw, adapted_raw, status],
                    api_name="chat_clear")
