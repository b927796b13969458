"""The Gradio app: a header, then one tab per step, each built by its own module."""

from __future__ import annotations

import gradio as gr

from ..paths import ASSETS_DIR
from . import chat_tab, dataset_tab, export_tab, train_tab
from .context import SessionStates, StudioContext
from .page_head import head_scripts_middleware


def _header(ctx: StudioContext) -> str:
    hw = ctx.hardware
    if hw is not None and hw.device == "cuda":
        where = f"GPU: **{hw.name}** ({hw.memory_gb:.0f} GB)" + (f" × {hw.gpu_count}" if hw.gpu_count > 1 else "")
    else:
        where = ("**CPU only**: training works, just slower. The embedded SmolLM2-135M model and the "
                 "`quick-cpu` preset are preselected.")
    lines = ["# QLoRA Studio", "Fine-tune a language model with QLoRA, watch it learn, and compare it with the base. "
             + where]
    if ctx.settings.demo:
        lines.append("> **Demo mode:** training is disabled here. Duplicate this Space to train your own adapter; "
                     "chat and compare still work.")
    return "\n\n".join(lines)


def build_app(ctx: StudioContext | None = None) -> gr.Blocks:
    ctx = ctx or StudioContext.create()
    with gr.Blocks(title="QLoRA Studio", fill_width=True) as demo:
        session = SessionStates.create()
        gr.Markdown(_header(ctx), elem_id="studio-header")
        with gr.Tabs():
            with gr.Tab("Dataset", id="dataset"):
                dataset_tab.build_tab(ctx, session)
            with gr.Tab("Train", id="train"):
                train_tab.build_tab(ctx, session)
            with gr.Tab("Chat", id="chat"):
                chat_tab.build_tab(ctx, session)
            with gr.Tab("Export", id="export"):
                export_tab.build_tab(ctx, session)

        def page_closed(request: gr.Request):
            train_tab.stop_following(ctx, request.session_hash)

        demo.unload(page_closed)
    demo.studio_context = ctx  # tests and launchers reach the shared context through the app
    return demo


def launch(ctx: StudioContext | None = None, **kwargs) -> None:
    ctx = ctx or StudioContext.create()
    demo = build_app(ctx)
    css_path = ASSETS_DIR / "studio.css"
    demo.queue(default_concurrency_limit=4)
    _calm_queue(demo)
    demo.launch(
        auth=ctx.settings.auth,
        max_file_size=f"{ctx.settings.max_upload_mb}mb",
        allowed_paths=[str(ctx.runs_root)],
        css=css_path.read_text() if css_path.exists() else None,
        app_kwargs={"middleware": [head_scripts_middleware()]},
        **kwargs,
    )


# Gradio's queue loops poll every 1 ms (events) and 10 ms (progress) when idle on Linux, its
# values for Windows are 50 ms and 100 ms. 1100 wake-ups a second cost a training run on a
# 2-core CPU far more than their ~8% of a core, since each one preempts a thread that its
# OpenMP partner then waits for. The slower pace adds at most 100 ms before an event starts;
# progress updates (gr.Progress, which no handler here uses) go out every half second.
QUEUE_IDLE_SLEEP_S = 0.1
PROGRESS_IDLE_SLEEP_S = 0.5


def _calm_queue(demo: gr.Blocks) -> None:
    queue = getattr(demo, "_queue", None)
    for name, value in (("sleep_when_free", QUEUE_IDLE_SLEEP_S),
                        ("progress_update_sleep_when_free", PROGRESS_IDLE_SLEEP_S)):
        if hasattr(queue, name):
            setattr(queue, name, max(getattr(queue, name), value))
