"""Dataset tab: pick a source, see the detected format and mapping, and exactly what will be trained.

Handlers are plain functions over plain values (tested without a browser); `build_tab` only
lays out components and wires them. The chosen DataConfig (as a dict) goes into
`session.data`, which the Train tab reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import shutil
from functools import lru_cache
from pathlib import Path

import gradio as gr

from ..config import DATA_FORMATS, TEMPLATES, DataConfig
from ..data import SAMPLES, DataError, confine_path, histogram, inspect_data, open_source, preview_rows
from ..data.formats import FIELDS
from ..data.sources import looks_like_hub_id
from ..templates import TEMPLATE_LABELS

SOURCE_KINDS = ("Sample", "Upload", "Path", "Hub")
SAMPLE_LABELS = {"persona": "Pirate persona chat (messages)", "instructions": "Instructions (Alpaca)",
                 "dialogue": "Dialogue text (plain LM)"}
N_SLOTS = 4              # the most fields a format has (alpaca: instruction, input, output, system)
NO_COLUMN = "(none)"
PAGE_SIZE = 5
UI_SCAN_LIMIT = 200_000  # rows checked per click; bigger files are checked in full by training and the CLI
MASKED_STYLE = "color:#6b7280;background:#f3f4f6"
TRAINED_STYLE = "color:#064e3b;background:#bbf7d0;font-weight:600"


# --- plain handlers -----------------------------------------------------------------------

def resolve_choice(kind: str, sample: str, upload: str | None, path: str, hub_id: str, *, allowed_dirs,
                   uploads_dir: Path | None) -> str:
    """The `data.source` string for what the user picked; typed paths must lie in the allowed folders."""
    if kind == "Sample":
        return f"sample:{sample or 'persona'}"
    if kind == "Upload":
        if not upload:
            raise DataError("Upload a data file first (JSONL, JSON, CSV, TSV, Parquet or TXT).")
        return keep_upload(upload, uploads_dir) if uploads_dir else str(upload)
    if kind == "Path":
        if not (path or "").strip():
            raise DataError("Type the path of a data file on the server.")
        return confine_path(path.strip(), allowed_dirs).location
    if kind == "Hub":
        hub_id = (hub_id or "").strip()
        if not hub_id:
            raise DataError("Type a Hugging Face dataset id, e.g. 'tatsu-lab/alpaca'.")
        source = open_source(hub_id)
        if source.kind != "hub":
            raise DataError(f"'{hub_id}' is a local path, not a Hub dataset id; use the Path option.")
        return hub_id
    raise DataError(f"Unknown source kind {kind!r}")


def keep_upload(upload: str, uploads_dir: Path) -> str:
    """Copy an upload out of Gradio's temp folder, so the training process can still read it later."""
    src = Path(upload)
    digest = hashlib.sha256()
    with open(src, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    uploads_dir.mkdir(parents=True, exist_ok=True)
    target = uploads_dir / f"{digest.hexdigest()[:12]}-{src.name}"
    if not target.exists():
        shutil.copyfile(src, target)
    return str(target)


def data_dict(source: str, fmt: str, slot_fields: list, slot_values: list, template: str, system_prompt: str,
              max_length, eval_fraction, eval_source: str, bad_rows: str, hub_config: str, split: str) -> dict:
    mapping = {f: v for f, v in zip(slot_fields or [], slot_values or []) if v and v != NO_COLUMN}
    data = DataConfig(source=source, format=fmt or "auto", mapping=mapping, template=template or "model",
                      system_prompt=system_prompt or "", max_length=int(max_length or 512),
                      eval_fraction=float(eval_fraction or 0), eval_source=(eval_source or "").strip(),
                      bad_rows=bad_rows or "drop", hub_config=hub_config or "", split=split or "train")
    return dataclasses.asdict(data)


@lru_cache(maxsize=4)
def get_tokenizer(model_name: str):
    """Tokenizers are read-only once loaded, so every session may share one per model."""
    from ..models import load_tokenizer, resolve_model
    return load_tokenizer(resolve_model(model_name or "embedded").path)


def inspect_choice(data: dict, model_name: str, completion_only_loss: bool, *, scan_limit: int | None = UI_SCAN_LIMIT):
    """Inspect the data; returns (inspection, data dict to hand to training with the detected format pinned)."""
    tokenizer = get_tokenizer(model_name)
    result = inspect_data(data, tokenizer, completion_only_loss=completion_only_loss, n_examples=0,
                          scan_limit=scan_limit)
    chosen = dict(data)
    detection = result.detection
    chosen["format"] = detection.format
    chosen["mapping"] = {f: c for f, c in detection.mapping.items() if c in detection.columns}
    return result, chosen


def detection_markdown(result) -> str:
    d = result.detection
    mapping = ", ".join(f"`{f}` ← `{c}`" for f, c in d.mapping.items())
    scanned = f"{result.rows_scanned:,} rows read" + ("" if result.complete else
                                                      f" (stopped after the first {result.rows_scanned:,})")
    return (f"**Format:** `{d.format}` — {html.escape(d.reason, quote=False)}  \n**Columns:** {', '.join(f'`{c}`' for c in d.columns)}"
            f"  \n**Mapping:** {mapping}  \n**Rows:** {scanned}, {result.rows_valid:,} usable, {result.bad.total:,} bad")


def stats_markdown(result) -> str:
    s = result.stats
    if not s.get("count"):
        return "No usable rows to measure."
    line = (f"**Tokens per row:** min {s['min']}, median {s['median']}, mean {s['mean']}, p95 {s['p95']}, max {s['max']}."
            f"  \n**Longer than max length {s['max_length']}:** {s['truncated']} of {s['count']} (truncated, not dropped).")
    if s.get("note"):
        line += f"  \n_{s['note']}; about {s['truncated_estimate']:,} rows in all would be truncated._"
    return line


def histogram_figure(lengths: list, max_length: int, sampled: bool):
    import plotly.graph_objects as go

    h = histogram(lengths, max_length, bins=40)
    edges, counts = h["edges"], h["counts"]
    centers = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    colors = ["#ef4444" if c > max_length else "#10b981" for c in centers]
    fig = go.Figure(go.Bar(x=centers, y=counts, width=[b - a for a, b in zip(edges, edges[1:])], marker_color=colors,
                           hovertemplate="%{x:.0f} tokens: %{y} rows<extra></extra>"))
    fig.add_vline(x=max_length, line_dash="dash", line_color="#ef4444",
                  annotation_text=f"max length {max_length}: {h['over_max']} truncated", annotation_position="top")
    title = "Tokens per row" + (" (random sample)" if sampled else "")
    fig.update_layout(title=title, xaxis_title="tokens", yaxis_title="rows", bargap=0.02, height=320,
                      margin=dict(l=40, r=20, t=50, b=40), showlegend=False)
    return fig


def bad_rows_table(result) -> list[list]:
    return [[b["where"], b["kind"], b["reason"]] for b in result.bad.listed]


def render_preview_html(rows) -> str:
    """Rendered rows, trained tokens highlighted, masked ones greyed; all user text escaped."""
    if not rows:
        return "<p>No rows on this page.</p>"
    parts = [f'<div class="qs-legend"><span style="{TRAINED_STYLE}">counts in the loss</span> '
             f'<span style="{MASKED_STYLE}">masked (context only)</span></div>']
    for row in rows:
        header = f"<b>{html.escape(row.where)}</b>"
        if row.error:
            parts.append(f'<div class="qs-row">{header} — <span style="color:#b91c1c">bad row: '
                         f"{html.escape(row.error)}</span></div>")
            continue
        header += f" · {row.n_tokens} tokens, {row.n_trained} in the loss" + (" · truncated" if row.truncated else "")
        body = "".join(f'<span style="{TRAINED_STYLE if trained else MASKED_STYLE}">{html.escape(text)}</span>'
                       for text, trained in row.segments)
        parts.append(f'<div class="qs-row">{header}<pre style="white-space:pre-wrap;word-break:break-word">'
                     f"{body}</pre></div>")
    return "\n".join(parts)


def preview_page_html(data: dict, model_name: str, completion_only_loss: bool, page: int) -> str:
    rows = preview_rows(data, get_tokenizer(model_name), start=max(0, int(page) - 1) * PAGE_SIZE, count=PAGE_SIZE,
                        completion_only_loss=completion_only_loss)
    return render_preview_html(rows)


def slot_updates(fmt: str, mapping: dict, columns: list) -> tuple[list, list]:
    """(fields shown in the mapping slots, dropdown updates) for a detected format."""
    fields = list(FIELDS.get(fmt, ()))[:N_SLOTS]
    choices = [NO_COLUMN] + list(columns)
    updates = []
    for i in range(N_SLOTS):
        if i < len(fields):
            updates.append(gr.update(visible=True, label=f"{fields[i]} ←", choices=choices,
                                     value=mapping.get(fields[i], NO_COLUMN)))
        else:
            updates.append(gr.update(visible=False, value=NO_COLUMN, choices=[NO_COLUMN]))
    return fields, updates


def split_summary(data: dict, rows_valid: int) -> str:
    if data.get("eval_source"):
        return f"all {rows_valid:,} rows train; eval rows come from `{html.escape(data['eval_source'], quote=False)}`"
    fraction = float(data.get("eval_fraction") or 0)
    if fraction <= 0 or rows_valid < 2:
        return f"all {rows_valid:,} rows train; no eval set"
    n_eval = min(rows_valid - 1, max(1, round(rows_valid * fraction)))
    return (f"{rows_valid - n_eval:,} train / {n_eval:,} eval ({fraction:g} held out at random; the same rows "
            "for the same seed)")


def load_and_check(settings, kind, sample, upload, path, hub_id, hub_config, split, fmt, slot_fields, slot_values,
                   template, system_prompt, max_length, eval_fraction, eval_source, bad_rows, model_name,
                   completion_only_loss) -> dict:
    """The main handler. Returns the tab's outputs by name; on bad input only `message` (and no `data`)."""
    try:
        source = resolve_choice(kind, sample, upload, path, hub_id, allowed_dirs=settings.allowed_data_dirs,
                                uploads_dir=getattr(settings, "uploads_dir", None))
        eval_spec = (eval_source or "").strip()
        if eval_spec and not eval_spec.startswith("split:") and not looks_like_hub_id(eval_spec):
            confine_path(eval_spec, settings.allowed_data_dirs)
        data = data_dict(source, fmt, slot_fields, slot_values, template, system_prompt, max_length, eval_fraction,
                         eval_source, bad_rows, hub_config, split)
        result, chosen = inspect_choice(data, model_name, completion_only_loss)
        preview = preview_page_html(chosen, model_name, completion_only_loss, 1)
    except (DataError, ValueError) as e:
        return {"message": f"⚠️ {html.escape(str(e), quote=False)}"}
    chosen_note = (f"✅ The Train tab will use **{html.escape(chosen['source'], quote=False)}** as "
                   f"`{chosen['format']}` ({result.rows_valid:,} usable rows; bad rows: {chosen['bad_rows']}).  \n"
                   f"**Split:** {split_summary(chosen, result.rows_valid)}")
    return {
        "message": detection_markdown(result) + "\n\n" + chosen_note,
        "result": result,
        "stats": stats_markdown(result),
        "figure": histogram_figure(result.lengths, result.max_length, result.sampled),
        "bad_rows": bad_rows_table(result),
        "preview": preview,
        "pages": max(1, -(-result.rows_scanned // PAGE_SIZE)),
        "data": chosen,
    }


# --- layout ---------------------------------------------------------------------------------

def build_tab(ctx, session) -> None:
    settings = ctx.settings
    gr.Markdown("Pick a dataset, check how it was read, and see **exactly** the text the model will be trained on: "
                "green tokens count in the loss, grey ones are context.")
    slot_state = gr.State([])
    pages_state = gr.State(1)
    with gr.Row():
        with gr.Column(scale=1):
            kind = gr.Radio(list(SOURCE_KINDS), value="Sample", label="Source")
            sample = gr.Dropdown([(SAMPLE_LABELS.get(k, k), k) for k in SAMPLES], value="persona", label="Sample",
                                 visible=True)
            upload = gr.File(label="Upload a data file", file_types=[".jsonl", ".json", ".csv", ".tsv", ".parquet",
                                                                     ".txt"], type="filepath", visible=False)
            path = gr.Textbox(label="Path on the server", visible=False,
                              info="Allowed folders: " + ", ".join(str(d) for d in settings.allowed_data_dirs))
            with gr.Group(visible=False) as hub_group:
                hub_id = gr.Textbox(label="Hugging Face dataset id", placeholder="org/dataset")
                with gr.Row():
                    hub_config = gr.Textbox(label="Config", value="")
                    split = gr.Textbox(label="Split", value="train")
            fmt = gr.Dropdown(list(DATA_FORMATS), value="auto", label="Format",
                              info="'auto' detects it from the columns and says why.")
            slots = [gr.Dropdown([NO_COLUMN], value=NO_COLUMN, label=f"field {i + 1}", visible=False,
                                 allow_custom_value=False) for i in range(N_SLOTS)]
            template = gr.Dropdown([(TEMPLATE_LABELS[t], t) for t in TEMPLATES], value="model", label="Chat template")
            system_prompt = gr.Textbox(label="Default system prompt", info="Added to conversations that have none.")
            max_length = gr.Slider(16, 4096, value=512, step=16, label="Max length (tokens)")
            with gr.Accordion("Split, bad rows, tokenizer", open=False):
                eval_fraction = gr.Slider(0, 0.5, value=0.1, step=0.01, label="Eval fraction")
                eval_source = gr.Textbox(label="Separate eval file (or split:NAME of a Hub dataset)")
                bad_rows = gr.Radio(["drop", "stop"], value="drop", label="Bad rows",
                                    info="drop: skip them (each one is recorded with its reason); stop: refuse to train.")
                model_name = gr.Textbox(value="embedded", label="Tokenizer of model",
                                        info="The model whose tokenizer and template render the rows.")
                completion_only = gr.Checkbox(value=True, label="Completion-only loss (mask prompts)")
            check = gr.Button("Load and check", variant="primary")
        with gr.Column(scale=2):
            detection = gr.Markdown()
            stats = gr.Markdown()
            plot = gr.Plot(label="Token lengths")
            with gr.Row():
                prev_btn = gr.Button("◀ Previous", size="sm")
                page = gr.Number(1, precision=0, minimum=1, label="Preview page", scale=0, min_width=120)
                next_btn = gr.Button("Next ▶", size="sm")
                pages_note = gr.Markdown("")
            preview = gr.HTML()
            bad_table = gr.Dataframe(headers=["where", "kind", "reason"], label="Bad rows", interactive=False,
                                     wrap=True)

    def show_source(k):
        return (gr.update(visible=k == "Sample"), gr.update(visible=k == "Upload"), gr.update(visible=k == "Path"),
                gr.update(visible=k == "Hub"))

    kind.change(show_source, kind, [sample, upload, path, hub_group])

    def reset_mapping():
        return [], *[gr.update(visible=False, value=NO_COLUMN) for _ in range(N_SLOTS)]

    for trigger in (kind.change, sample.change, upload.change, fmt.change):
        trigger(reset_mapping, None, [slot_state, *slots])

    inputs = [kind, sample, upload, path, hub_id, hub_config, split, fmt, slot_state, *slots, template, system_prompt,
              max_length, eval_fraction, eval_source, bad_rows, model_name, completion_only]
    outputs = [detection, stats, plot, bad_table, preview, page, pages_state, pages_note, slot_state, *slots,
               session.data]

    def on_check(*values):
        head, slot_values, tail = values[:9], list(values[9:9 + N_SLOTS]), values[9 + N_SLOTS:]
        out = load_and_check(settings, *head, slot_values, *tail)
        if "data" not in out:  # bad input: show why, leave everything else (and the Train tab's choice) as it was
            return [out["message"], *[gr.update()] * (len(outputs) - 1)]
        d = out["result"].detection
        fields, updates = slot_updates(d.format, d.mapping, d.columns)
        return [out["message"], out["stats"], out["figure"], out["bad_rows"], out["preview"],
                1, out["pages"], f"of {out['pages']:,} pages", fields, *updates, out["data"]]

    check.click(on_check, inputs, outputs)

    def on_page(data, model, completion, number):
        if not data:
            return "<p>Load a dataset first.</p>"
        try:
            return preview_page_html(data, model, completion, number)
        except (DataError, ValueError) as e:
            return f"<p>⚠️ {html.escape(str(e), quote=False)}</p>"

    def turn(number, pages, step):
        return int(min(max(1, (number or 1) + step), pages or 1))

    prev_btn.click(lambda n, p: turn(n, p, -1), [page, pages_state], page)
    next_btn.click(lambda n, p: turn(n, p, +1), [page, pages_state], page)
    page.change(on_page, [session.data, model_name, completion_only, page], preview)


__all__ = ["build_tab", "load_and_check", "resolve_choice", "data_dict", "inspect_choice", "render_preview_html",
           "preview_page_html", "histogram_figure", "keep_upload", "split_summary", "slot_updates"]
