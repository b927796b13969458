"""The model card (README.md) and loss curve that travel with every export.

Everything here is read from the exported folder's own files (config.yaml, run.json,
metrics.jsonl), so a card can be rebuilt from a bundle as well as from a run folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import StudioConfig, get_value, iter_fields
from .templates import TEMPLATE_LABELS

CARD_TAGS = ["qlora", "lora", "peft", "trl", "sft"]
LOSS_CURVE = "loss_curve.png"


@dataclass
class RunFacts:
    """What a card says about a run, gathered once from its files."""

    name: str
    config: StudioConfig
    info: dict                       # run.json
    metrics: list = field(default_factory=list)
    state: str = ""                  # completed / stopped (from status.json when the source is a run folder)

    @property
    def base_model(self) -> str:
        return (self.info.get("model") or {}).get("display_name") or self.config.model.name

    @property
    def license(self) -> str:
        return (self.info.get("model") or {}).get("license") or ""

    @property
    def train_rows(self) -> list[dict]:
        return [r for r in self.metrics if r.get("type") == "train" and r.get("loss") is not None]

    @property
    def eval_rows(self) -> list[dict]:
        return [r for r in self.metrics if r.get("type") == "eval" and r.get("eval_loss") is not None]

    @property
    def duration_s(self) -> float | None:
        rows = [r for r in self.metrics if r.get("elapsed_s") is not None]
        return float(rows[-1]["elapsed_s"]) if rows else None


def read_metrics_file(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut off by a crash says nothing
    return rows


def is_hub_id(name: str) -> bool:
    """A Hub repo id ('org/name'), which is what model-card metadata may reference."""
    return (name.count("/") == 1 and not name.startswith((".", "/", "~")) and " " not in name
            and not Path(name).expanduser().exists())


def _fmt_loss(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h or m:
        return (f"{h} h {m} min" if h else f"{m} min {s} s") + f" ({seconds} s)"
    return f"{s} s"


def _hardware(info: dict) -> str:
    hw = info.get("hardware") or {}
    if not hw:
        return "n/a"
    device = hw.get("device", "?")
    if device == "cuda":
        count = hw.get("gpu_count") or 1
        text = f"{count} x {hw.get('name', 'GPU')} ({hw.get('memory_gb', '?')} GiB each)"
    else:
        text = f"CPU ({hw.get('name', '?')}, {hw.get('memory_gb', '?')} GiB RAM)"
    dtype = info.get("compute_dtype")
    return text + (f", compute dtype {dtype}" if dtype else "")


def _quantization(cfg: StudioConfig) -> str:
    q = cfg.quant
    if q.type == "none":
        return f"none (16/32-bit base), compute dtype {q.compute_dtype}"
    if q.type == "int8":
        return "8-bit LLM.int8 (bitsandbytes)"
    dq = ", double quantization" if q.double_quant else ""
    return f"4-bit {q.type.upper()} (bitsandbytes){dq}, compute dtype {q.compute_dtype}"


def _dataset_line(cfg: StudioConfig, data: dict) -> str:
    if not data:
        return f"`{cfg.data.source}`"
    text = f"`{cfg.data.source}`: {data.get('rows_used', '?')} of {data.get('rows_total', '?')} rows used"
    if "rows_train" in data:
        text += f" ({data['rows_train']} train, {data.get('rows_eval', 0)} eval)"
    if data.get("tokens_total"):
        text += f", {data['tokens_total']:,} tokens ({data.get('tokens_trained', 0):,} in the loss)"
    return text


def front_matter(facts: RunFacts, kind: str) -> str:
    meta: dict = {}
    if is_hub_id(facts.base_model):
        meta["base_model"] = facts.base_model
    meta["library_name"] = "peft" if kind == "adapter" else "transformers"
    if facts.license:
        meta["license"] = facts.license
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = CARD_TAGS + (["merged"] if kind == "merged" else [])
    if is_hub_id(facts.config.data.source):
        meta["datasets"] = [facts.config.data.source]
    import yaml
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


# The chat call both usage snippets end with.
_GENERATE = (
    'messages = [{"role": "user", "content": "Hello! Who are you?"}]\n'
    "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",\n"
    "                                       return_dict=True)\n"
    "output = model.generate(**inputs, max_new_tokens=40)\n"
    "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))\n"
    "```\n")


def usage_snippet(facts: RunFacts, kind: str) -> str:
    if kind == "merged":
        return (
            "```python\n"
            "import torch\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'model_dir = "."  # this folder, or the Hub repo id it was pushed to\n'
            "tokenizer = AutoTokenizer.from_pretrained(model_dir)  # carries the chat template used in training\n"
            "model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)\n\n" + _GENERATE)
    return (
        "```python\n"
        "import torch\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'base_model = "{facts.base_model}"\n'
        'adapter = "."  # this folder, or the Hub repo id it was pushed to\n'
        "tokenizer = AutoTokenizer.from_pretrained(adapter)  # carries the chat template used in training\n"
        "model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16)\n"
        "model = PeftModel.from_pretrained(model, adapter)\n\n" + _GENERATE)


def _quantized_snippet(cfg: StudioConfig) -> str:
    q = cfg.quant
    if q.type in ("none", "int8"):
        return ""
    dtype = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}[q.compute_dtype]
    return (
        "To put the adapter on a 4-bit base, as during training (and in the studio's chat), load the base "
        "with a quantization config:\n\n"
        "```python\n"
        "from transformers import BitsAndBytesConfig\n\n"
        f"bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"{q.type}\",\n"
        f"                         bnb_4bit_use_double_quant={q.double_quant}, bnb_4bit_compute_dtype={dtype})\n"
        f"model = AutoModelForCausalLM.from_pretrained(base_model, quantization_config=bnb, dtype={dtype})\n"
        "model = PeftModel.from_pretrained(model, adapter)\n"
        "```\n")


def hyperparameter_table(cfg: StudioConfig) -> str:
    lines = ["| Setting | Value |", "|---|---|"]
    for dotted, _f, _t in iter_fields():
        if dotted in ("run_name", "output_dir"):
            continue
        value = get_value(cfg, dotted)
        if isinstance(value, (list, dict)) or value == "":
            value = json.dumps(value)
        lines.append(f"| `{dotted}` | `{value}` |")
    return "\n".join(lines) + "\n"


def render_card(facts: RunFacts, *, kind: str = "adapter", merge_report: dict | None = None,
                has_loss_curve: bool = True) -> str:
    """README.md for an exported adapter bundle (kind='adapter') or merged model (kind='merged')."""
    cfg = facts.config
    info = facts.info
    data = info.get("data") or {}
    train, evals = facts.train_rows, facts.eval_rows
    base = facts.base_model
    what = "LoRA adapter" if kind == "adapter" else "merged model (LoRA adapter folded into a 16-bit base)"
    template = cfg.data.template
    template_text = f"`{template}` ({TEMPLATE_LABELS.get(template, template)})"
    max_steps = (train[-1].get("max_steps") if train else None) or info.get("max_steps")
    steps = f"{train[-1]['step']}" + (f" of {max_steps}" if max_steps else "") if train else "n/a"
    rows = [
        ("Base model", f"`{base}`"),
        ("Base model license", facts.license or "unknown: check the base model's card"),
        ("Dataset", _dataset_line(cfg, data)),
        ("Format", f"`{data.get('format', cfg.data.format)}`" + (f" ({data['reason']})" if data.get("reason") else "")),
        ("Chat template", template_text),
        ("Loss on", "assistant/completion tokens only" if cfg.train.completion_only_loss else "every token"),
        ("Quantization during training", _quantization(cfg)),
        ("LoRA", f"r={cfg.lora.r}, alpha={cfg.lora.alpha:g}, dropout={cfg.lora.dropout:g}, "
                 f"targets {', '.join(cfg.lora.target_modules)}"
                 + (", rsLoRA" if cfg.lora.use_rslora else "") + (", DoRA" if cfg.lora.use_dora else "")),
        ("Trainable parameters", f"{info['trainable_params']:,} of {info['total_params']:,}"
         if info.get("trainable_params") and info.get("total_params") else "n/a"),
        ("Steps", steps + (f" (run {facts.state})" if facts.state and facts.state != "completed" else "")),
        ("Final train loss", _fmt_loss(train[-1]["loss"]) if train else "n/a"),
        ("Final eval loss", _fmt_loss(evals[-1]["eval_loss"]) if evals else "n/a (no eval set)"),
        ("Hardware", _hardware(info)),
        ("Training time", _fmt_duration(facts.duration_s)),
    ]
    if merge_report:
        rows.append(("Merge check", f"largest logit difference, merged vs base+adapter (unmerged), both "
                                    f"{merge_report['dtype']}: {merge_report['max_abs_logit_diff']:.4g} (largest logit "
                                    f"{merge_report['max_abs_logit']:.4g}; same top token at "
                                    f"{merge_report['top1_agreement']:.0%} of {merge_report['tokens']} positions, "
                                    f"{merge_report['prompts']} prompts)"))
    out = [front_matter(facts, kind), f"# {facts.name}\n",
           f"A {what} for [{base}]({'https://huggingface.co/' + base if is_hub_id(base) else base}), "
           f"fine-tuned with QLoRA (TRL `SFTTrainer` + PEFT) in QLoRA Studio.\n",
           "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"]
    if has_loss_curve:
        out.append(f"## Loss curve\n\n![Training and evaluation loss]({LOSS_CURVE})\n")
    out.append("## How to use\n")
    if kind == "adapter":
        out.append(f"With plain `transformers` + `peft` (the adapter goes on top of `{base}`):\n")
        out.append(usage_snippet(facts, kind))
        quant = _quantized_snippet(cfg)
        if quant:
            out.append(quant)
    else:
        out.append("A plain `transformers` checkpoint; no `peft` needed:\n")
        out.append(usage_snippet(facts, kind))
        if cfg.quant.type in ("nf4", "fp4"):
            out.append("The adapter was trained on a 4-bit base but is merged here into the original 16-bit "
                       "weights, so answers can differ slightly from the 4-bit model used during training.\n")
        if merge_report and merge_report.get("dtype") == "bf16":
            out.append("bf16 keeps about 3 significant digits: rounding the merged weights to it moves logits by "
                       "about as much as running the unmerged model in bf16 instead of fp32 does, which is "
                       "typically the order of the merge check above. For a closer merge, export in fp16 "
                       "(`--dtype fp16`) where the model's activations fit its range.\n")
    if cfg.data.system_prompt:
        out.append(f"Conversations without a system message were trained with this system prompt:\n\n"
                   f"> {cfg.data.system_prompt}\n")
    out.append("## Training data\n")
    out.append(_data_section(cfg, data))
    out.append("## Hyperparameters\n\nThe full training config is in `config.yaml` "
               "(`qlora-studio train config.yaml` repeats the run).\n\n" + hyperparameter_table(cfg))
    versions = info.get("versions") or {}
    if versions:
        out.append("## Software\n\n" + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + "\n")
    out.append("## License\n\n" + (f"This {'adapter' if kind == 'adapter' else 'model'} is derived from `{base}`, "
                                   f"released under `{facts.license}`; its terms apply."
                                   if facts.license else
                                   f"The license of `{base}` applies; check its model card.") + "\n")
    return "\n".join(out)


def _data_section(cfg: StudioConfig, data: dict) -> str:
    lines = [f"- Source: {_dataset_line(cfg, data)}"]
    if data:
        lines.append(f"- Format: `{data.get('format', '?')}`, template `{data.get('template', cfg.data.template)}`, "
                     f"max length {data.get('max_length', cfg.data.max_length)} tokens")
        dropped = data.get("rows_dropped") or len(data.get("dropped") or [])
        if dropped:
            why = ", ".join(f"{n} {k}" for k, n in (data.get("dropped_by_reason") or {}).items())
            lines.append(f"- Dropped rows: {dropped}" + (f" ({why})" if why else ""))
        if data.get("truncated"):
            lines.append(f"- Rows longer than max length (truncated): {data['truncated']}")
        if data.get("system_prompt_added"):
            lines.append(f"- System prompt added to {data['system_prompt_added']} conversations")
    if cfg.data.eval_source:
        lines.append(f"- Evaluation data: `{cfg.data.eval_source}`")
    else:
        lines.append(f"- Evaluation split: {cfg.data.eval_fraction:g} of the rows")
    return "\n".join(lines) + "\n"


def plot_loss_curve(metrics: list[dict], path: Path, title: str = "") -> bool:
    """Train and eval loss against step as a PNG; False (and no file) when nothing was logged."""
    train = [(r["step"], r["loss"]) for r in metrics if r.get("type") == "train" and r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in metrics if r.get("type") == "eval" and r.get("eval_loss") is not None]
    if not train and not evals:
        return False
    # The object API with the Agg canvas: no pyplot global state, safe from any thread of the app.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train), label="train loss", color="#1f77b4", linewidth=1.5)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", color="#d62728", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True
