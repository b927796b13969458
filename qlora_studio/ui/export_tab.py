"""Export tab: download the adapter bundle, merge into a 16-bit model, push to the Hub, import a bundle.

Handlers are plain functions over plain values (tested without a browser); `build_tab` only
lays out components and wires them. Exports are written under `<runs root>/_exports/<run>/`
(served by the app, since the runs root is an allowed path); imports are unpacked under
`<runs root>/_imported/` and handed to the Chat tab through `session.run`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import gradio as gr

from ..export import (MANIFEST, ExportError, HubError, adapter_source, check_push, export_adapter, export_merged,
                      import_bundle, push_to_hub)
from ..export_hub import hub_offline
from ..runs import list_runs

EXPORTS_DIR = "_exports"
IMPORTS_DIR = "_imported"
PUSH_KINDS = ("Adapter", "Merged model")


# --- plain handlers -----------------------------------------------------------------------

def run_choices(runs_root: Path, current: str | None = None) -> list[tuple[str, str]]:
    """(label, run folder) for every run, newest first, plus the session's pick if it lies elsewhere.

    Runs without an adapter yet are listed too (the Train tab may have just started one): picking
    one says why it cannot be exported, instead of the run silently missing from the list.
    """
    choices = []
    for r in list_runs(runs_root):
        loss = f", loss {r.train_loss:.3f}" if r.train_loss is not None else ""
        note = "" if r.has_adapter else ", no adapter yet"
        choices.append((f"{r.name} ({r.state}, step {r.step}{loss}{note})", r.path))
    if current and current not in [c[1] for c in choices] and Path(current).is_dir():
        choices.insert(0, (f"{Path(current).name} (selected)", current))
    return choices


def exports_root(runs_root: Path, run_path: str) -> Path:
    return Path(runs_root) / EXPORTS_DIR / Path(run_path).name


def _need_run(run_path: str | None) -> str:
    if not run_path:
        raise ExportError("Pick a run first (train one in the Train tab, or import a bundle below).")
    return run_path


def describe_run(run_path: str | None) -> str:
    if not run_path:
        return "No run selected."
    try:
        facts = adapter_source(run_path).facts()
    except ExportError as e:
        return f"**Cannot export:** {html.escape(str(e))}"
    train, evals = facts.train_rows, facts.eval_rows
    parts = [f"**{html.escape(facts.name)}** on `{facts.base_model}`"]
    if facts.state:
        parts.append(f"state: {facts.state}")
    if train:
        parts.append(f"step {train[-1]['step']}, train loss {train[-1]['loss']:.4f}")
    if evals:
        parts.append(f"eval loss {evals[-1]['eval_loss']:.4f}")
    return " · ".join(parts)


def build_adapter_zip(run_path: str | None, runs_root: Path) -> tuple[str | None, str, str]:
    """-> (zip path for download, model card markdown, status)."""
    try:
        run_path = _need_run(run_path)
        out = exports_root(runs_root, run_path) / f"{Path(run_path).name}-adapter"
        result = export_adapter(run_path, out, overwrite=True, make_zip=True)
    except ExportError as e:
        return None, "", f"**Export failed:** {html.escape(str(e))}"
    card = (result.path / "README.md").read_text(encoding="utf-8")
    size = result.zip_path.stat().st_size / 2**20
    return (str(result.zip_path), _card_body(card),
            f"Adapter bundle ready ({size:.1f} MiB, {len(result.manifest['files']) + 1} files); model card below.")


def _card_body(card: str) -> str:
    """The card without its YAML front matter, which Markdown would show as text."""
    if card.startswith("---"):
        end = card.find("\n---", 3)
        if end != -1:
            return card[end + 4:].lstrip()
    return card


def merge_run(run_path: str | None, runs_root: Path, dtype: str | None = None):
    """Generator: a note that work has started, then the merge report."""
    try:
        run_path = _need_run(run_path)
    except ExportError as e:
        yield f"**Merge failed:** {html.escape(str(e))}"
        return
    yield "Merging the adapter into a 16-bit copy of the base and checking the logits…"
    out = exports_root(runs_root, run_path) / f"{Path(run_path).name}-merged"
    try:
        result = export_merged(run_path, out, overwrite=True, dtype=dtype or None)
    except ExportError as e:
        yield f"**Merge failed:** {html.escape(str(e))}"
        return
    except Exception as e:  # out of memory, a broken base download...: say so, keep the app alive
        yield f"**Merge failed:** {type(e).__name__}: {html.escape(str(e))}. Nothing was written."
        return
    yield merge_report_markdown(result.manifest["merge"], result.path)


def merge_report_markdown(report: dict, path: Path) -> str:
    return (f"Merged model saved to `{path}` ({report['dtype']}, safetensors, tokenizer and chat template).\n\n"
            f"| Check | Value |\n|---|---|\n"
            f"| Largest logit difference, merged vs base+adapter | **{report['max_abs_logit_diff']:.4g}** |\n"
            f"| Largest logit | {report['max_abs_logit']:.4g} |\n"
            f"| Top-1 token agreement | {report['top1_agreement']:.1%} |\n"
            f"| Prompts / tokens compared | {report['prompts']} / {report['tokens']} |\n")


def push_export(run_path: str | None, kind: str, repo: str, private: bool, token: str, runs_root: Path) -> str:
    """Export (or reuse the merged export) and push it. The token is used, never returned or stored."""
    if hub_offline():
        return ("**Push unavailable:** offline mode is on (HF_HUB_OFFLINE), so nothing can reach the Hub. "
                "Download the zip instead.")
    try:
        run_path = _need_run(run_path)
        if not (repo or "").strip():
            raise HubError("Type a repo name, e.g. my-pirate-adapter or user/my-pirate-adapter.")
        check_push(repo, token or None)
        root = exports_root(runs_root, run_path)
        if kind == PUSH_KINDS[1]:
            folder = root / f"{Path(run_path).name}-merged"
            if not (folder / MANIFEST).exists():
                raise ExportError("Merge the model first (the Merge button above), then push it.")
        else:
            folder = export_adapter(run_path, root / f"{Path(run_path).name}-adapter", overwrite=True).path
        result = push_to_hub(folder, repo, token=token or None, private=bool(private))
    except (ExportError, HubError) as e:
        return f"**Push failed:** {html.escape(str(e))}"
    return (f"Pushed {result.files} files to [{result.repo_id}]({result.url})"
            + (" (private)." if result.private else "."))


def import_upload(upload: str | None, runs_root: Path, current: str | None) -> tuple[str | None, str]:
    """Unpack and check an uploaded bundle; -> (new session.run value, what was found)."""
    if not upload:
        return current, "Upload an adapter bundle (.zip) exported by QLoRA Studio or any peft LoRA adapter."
    try:
        folder = import_bundle(upload, Path(runs_root) / IMPORTS_DIR)
    except ExportError as e:
        return current, f"**Import failed:** {html.escape(str(e))}"
    return str(folder), describe_import(folder)


def describe_import(folder: Path) -> str:
    adapter_config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    manifest = {}
    if (folder / MANIFEST).exists():
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    base = manifest.get("base_model") or adapter_config.get("base_model_name_or_path") or "unknown"
    targets = adapter_config.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else targets
    rows = [("Folder", f"`{folder}`"), ("Base model", f"`{base}`"),
            ("LoRA", f"r={adapter_config.get('r')}, alpha={adapter_config.get('lora_alpha')}, targets {targets}"),
            ("Training config", "yes (config.yaml)" if (folder / "config.yaml").exists() else
             "no: chat uses the base model's defaults"),
            ("Model card", "yes" if (folder / "README.md").exists() else "no"),
            ("Files", ", ".join(sorted(p.name for p in folder.iterdir() if p.is_file())))]
    return ("Imported. It is now the selected adapter: open the **Chat** tab to talk to it.\n\n"
            "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows))


# --- layout -------------------------------------------------------------------------------

def build_tab(ctx, session) -> None:
    runs_root = Path(ctx.runs_root)
    gr.Markdown("Take the adapter with you: a zip with the weights, the training config, metrics, a loss curve and a "
                "model card; or merge it into a 16-bit copy of the base model; or push either to the Hugging Face Hub.")
    with gr.Row():
        initial = run_choices(runs_root)
        run = gr.Dropdown(initial, value=initial[0][1] if initial else None, label="Run", scale=4,
                          allow_custom_value=False, info="Refresh after a training finishes.")
        refresh = gr.Button("↻ Refresh", size="sm", scale=0, min_width=100)
    summary = gr.Markdown(describe_run(initial[0][1]) if initial else "No run selected.")

    with gr.Accordion("Adapter bundle", open=True):
        zip_btn = gr.Button("Build adapter zip", variant="primary")
        zip_status = gr.Markdown()
        zip_file = gr.File(label="Adapter bundle (zip)", interactive=False)
        with gr.Accordion("Model card (README.md)", open=False):
            card = gr.Markdown()

    with gr.Accordion("Merged model", open=False):
        gr.Markdown("Folds the adapter into the base model's original 16-bit weights (not the 4-bit copy used "
                    "for training) and saves a plain `transformers` model; then reloads it and reports how far its "
                    "logits are from base + adapter on a few prompts.")
        with gr.Row():
            merge_dtype = gr.Radio([("bf16 (safe range)", "bf16"), ("fp16 (finer, may overflow)", "fp16")],
                                   value="bf16" if getattr(ctx, "hardware", None) is None or ctx.hardware.bf16
                                   or ctx.hardware.device == "cpu" else "fp16", label="16-bit type")
            merge_btn = gr.Button("Merge into a 16-bit model")
        merge_status = gr.Markdown()

    with gr.Accordion("Push to the Hugging Face Hub", open=False):
        with gr.Row():
            push_kind = gr.Radio(list(PUSH_KINDS), value=PUSH_KINDS[0], label="What")
            repo = gr.Textbox(label="Repo name", placeholder="my-adapter or user/my-adapter")
            private = gr.Checkbox(value=True, label="Private")
        token = gr.Textbox(label="Hugging Face token (write)", type="password",
                           placeholder="leave empty to use HF_TOKEN from the server's environment",
                           info="Used for this push only; never stored, logged or shown.")
        push_btn = gr.Button("Push")
        push_status = gr.Markdown()

    with gr.Accordion("Import a bundle", open=False):
        upload = gr.File(label="Adapter bundle (.zip)", file_types=[".zip"], type="filepath")
        import_status = gr.Markdown()

    def refresh_choices(current):
        choices = run_choices(runs_root, current)
        values = [c[1] for c in choices]
        value = current if current in values else (values[0] if values else None)
        return gr.update(choices=choices, value=value)

    # The run may have finished since it was picked: its summary is re-read, not only the list.
    refresh.click(refresh_choices, session.run, run, api_name="export_refresh").then(describe_run, run, summary)
    session.run.change(refresh_choices, session.run, run)
    run.change(describe_run, run, summary)
    run.input(lambda r: r, run, session.run)  # the pick is shared with the Chat tab
    zip_btn.click(lambda r: build_adapter_zip(r, runs_root), run, [zip_file, card, zip_status],
                  api_name="export_zip")
    # One merge at a time: it holds a full 16-bit copy of the base in memory.
    def merge(run_path, dtype):
        yield from merge_run(run_path, runs_root, dtype)

    merge_btn.click(merge, [run, merge_dtype], merge_status, concurrency_limit=1, concurrency_id="export-merge",
                    api_name="export_merge")
    push_btn.click(lambda r, k, n, p, t: push_export(r, k, n, p, t, runs_root), [run, push_kind, repo, private, token],
                   push_status, api_name="export_push")
    upload.upload(lambda u, cur: import_upload(u, runs_root, cur), [upload, session.run],
                  [session.run, import_status], api_name="export_import")
