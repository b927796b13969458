"""Proof that an export behaves like the studio: logits compared on a few chat prompts.

Two checks:
- verify_bundle: the bundle loaded with plain transformers + peft in a fresh Python process
  (which never imports qlora_studio) against the adapter loaded by the Chat tab's own loader
  (chat.load_pair), on the same quantized base.
- merge_and_check: a merged 16-bit model, reloaded from disk, against base + adapter unmerged.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .config import StudioConfig

DEFAULT_PROMPTS = ("Who are you?", "Give me one tip for learning to sail.", "Write two sentences about the sea.")


def conversations(system: str, prompts) -> list[list[dict]]:
    """The prompts as chats, with the run's system prompt where training added one."""
    return [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            for p in prompts]


def _encode(tokenizer, template: str, chats) -> list:
    from .templates import render_chat
    out = []
    for messages in chats:
        text = render_chat(tokenizer, messages, template, add_generation_prompt=True)
        # The template already writes every special token; adding BOS again would change the input.
        out.append(tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"])
    return out


def _logits(model, ids_list) -> list:
    import torch
    device = next(model.parameters()).device
    with torch.inference_mode():
        return [model(input_ids=ids.to(device)).logits[0].float().cpu() for ids in ids_list]


def _max_abs_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _release() -> None:
    """Give freed model memory back before the next load (matters for large models on a GPU)."""
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def _studio_tokenizer(source, config: StudioConfig, base_path: str):
    from .models import load_tokenizer
    own = (source.adapter_dir / "tokenizer_config.json").exists()
    return load_tokenizer(str(source.adapter_dir) if own else base_path, config.model.trust_remote_code)


def load_studio_model(reference: str | Path):
    """The adapter loaded exactly as the Chat tab loads it (chat.resolve_adapter + chat.load_pair).

    Returns (peft model, tokenizer, AdapterInfo, spec): spec is what a plain script passes to
    from_pretrained to load the base the same way (path, dtype, the quantization config the
    loaded model actually carries, device map).
    """
    from .chat import load_pair, resolve_adapter
    from .models import resolve_model

    info = resolve_adapter(str(reference))
    pair = load_pair(info)
    quant = getattr(pair.model.get_base_model().config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = json.loads(quant.to_json_string(use_diff=False))
    spec = {"base": resolve_model(info.base_model, info.revision).path,
            "dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[pair.dtype],
            "quantization_config": quant,
            "device_map": {"": 0} if pair.device == "cuda" else ({"": "cpu"} if quant else None),
            "trust_remote_code": info.trust_remote_code}
    return pair.model, pair.tokenizer, info, spec


# Runs in a fresh interpreter: only transformers + peft, as a user of the bundle would.
_FRESH_SCRIPT = r"""
import json, sys
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

args = json.loads(sys.stdin.read())
kwargs = {"dtype": getattr(torch, args["dtype"]), "trust_remote_code": args["trust_remote_code"]}
if args["quantization_config"]:
    kwargs["quantization_config"] = BitsAndBytesConfig.from_dict(args["quantization_config"])
if args["device_map"]:
    kwargs["device_map"] = args["device_map"]
model = AutoModelForCausalLM.from_pretrained(args["base"], **kwargs)
model = PeftModel.from_pretrained(model, args["adapter"])
model.eval()
tokenizer = AutoTokenizer.from_pretrained(args["adapter"])
tensors = {}
with torch.inference_mode():
    for i, messages in enumerate(args["conversations"]):
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        ids = enc["input_ids"]
        tensors[f"ids_{i}"] = ids[0].contiguous()
        tensors[f"logits_{i}"] = model(input_ids=ids.to(model.device)).logits[0].float().cpu().contiguous()
save_file(tensors, args["out"])
print("FRESH_RESULT " + json.dumps({"qlora_studio_imported": any(m.startswith("qlora_studio") for m in sys.modules)}))
"""


def fresh_process_logits(bundle: str | Path, spec: dict, chats, *, timeout: float = 900) -> tuple[list, list, dict]:
    """Load `bundle` with plain peft in a new Python process; return its token ids, logits and a note."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="qlora-studio-verify-") as tmp:
        out = Path(tmp) / "logits.safetensors"
        payload = {**spec, "adapter": str(bundle), "conversations": chats, "out": str(out)}
        proc = subprocess.run([sys.executable, "-c", _FRESH_SCRIPT], input=json.dumps(payload), text=True,
                              capture_output=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise RuntimeError(f"loading the bundle with plain peft in a fresh process failed "
                               f"(exit {proc.returncode}):\n{tail}")
        tensors = load_file(str(out))
    note = {}
    for line in proc.stdout.splitlines():
        if line.startswith("FRESH_RESULT "):
            note = json.loads(line[len("FRESH_RESULT "):])
    n = len(chats)
    return [tensors[f"ids_{i}"] for i in range(n)], [tensors[f"logits_{i}"] for i in range(n)], note


def verify_bundle(bundle: str | Path, reference: str | Path | None = None, *, prompts=DEFAULT_PROMPTS,
                  timeout: float = 900) -> dict:
    """Compare the bundle in a fresh process with `reference` (a run folder or adapter) loaded in the studio.

    Returns max_abs_logit_diff (fresh vs studio), adapter_effect (studio with vs without the
    adapter: shows the comparison is not between two base models) and same_tokens.
    """
    model, tokenizer, info, spec = load_studio_model(reference or bundle)
    chats = conversations(info.system_prompt, prompts)
    ids = _encode(tokenizer, info.template, chats)
    studio = _logits(model, ids)
    with model.disable_adapter():
        base_only = _logits(model, ids)
    del model
    _release()
    fresh_ids, fresh, note = fresh_process_logits(bundle, spec, chats, timeout=timeout)
    same_tokens = all(a[0].tolist() == b.tolist() for a, b in zip(ids, fresh_ids))
    if not same_tokens:
        raise RuntimeError("the bundle's tokenizer renders the prompts differently from the studio "
                           "(chat template mismatch)")
    return {"max_abs_logit_diff": _max_abs_diff(studio, fresh), "adapter_effect": _max_abs_diff(studio, base_only),
            "same_tokens": same_tokens, "prompts": len(chats), "tokens": sum(int(i.shape[1]) for i in ids),
            "loaded_with": _describe_load(spec),
            "fresh_process_imported_studio": bool(note.get("qlora_studio_imported"))}


def _describe_load(spec: dict) -> str:
    q = spec["quantization_config"] or {}
    base = (f"4-bit {q.get('bnb_4bit_quant_type', '')}".strip() if q.get("load_in_4bit")
            else "8-bit" if q.get("load_in_8bit") else "unquantized")
    return f"{base} base, {spec['dtype']} compute"


# -- merge -------------------------------------------------------------------------------------

MERGE_DTYPES = ("bf16", "fp16")


def merge_dtype(hw, requested: str | None = None) -> str:
    """16-bit: bf16 where it runs (any CPU - slower without AMX - and Ampere+ GPUs), else fp16.

    bf16 keeps the range of the bf16/fp32 weights most models ship with; fp16 has 8x finer steps
    (a closer merge) but activations of some models overflow its range.
    """
    if requested:
        if requested not in MERGE_DTYPES:
            raise ValueError(f"merge dtype must be one of {', '.join(MERGE_DTYPES)}, got {requested!r}")
        if requested == "bf16" and hw.device == "cuda" and not hw.bf16:
            raise ValueError(f"this GPU ({hw.name}) has no bf16; merge in fp16")
        return requested
    return "bf16" if hw.device == "cpu" or hw.bf16 else "fp16"


def merge_and_check(source, into: Path, *, prompts=None, dtype: str | None = None) -> dict:
    """Merge the adapter into the unquantized 16-bit base, save to `into`, reload it and compare logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .models import detect_hardware, resolve_model, torch_dtype
    from .templates import template_source

    config = source.config()
    hw = detect_hardware()
    dtype = merge_dtype(hw, dtype)
    resolved = resolve_model(config.model.name, config.model.revision)
    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": config.model.trust_remote_code}
    if hw.device == "cuda":
        kwargs["device_map"] = {"": 0}
    tokenizer = _studio_tokenizer(source, config, resolved.path)
    # The merged folder carries the template the run trained with, so plain transformers chats alike.
    tokenizer.chat_template = template_source(tokenizer, config.data.template)
    chats = conversations(config.data.system_prompt, prompts or DEFAULT_PROMPTS)
    ids = _encode(tokenizer, config.data.template, chats)

    base = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    model = PeftModel.from_pretrained(base, str(source.adapter_dir))
    model.eval()
    reference = _logits(model, ids)
    merged = model.merge_and_unload()
    merged.save_pretrained(into, safe_serialization=True)
    tokenizer.save_pretrained(into)
    del model, merged, base
    _release()
    # Compare what was written, not what is in memory: the user gets the files.
    reloaded = AutoModelForCausalLM.from_pretrained(into, **kwargs)
    got = _logits(reloaded, ids)
    del reloaded
    _release()
    top1 = [float((a.argmax(-1) == b.argmax(-1)).float().mean()) for a, b in zip(reference, got)]
    return {"max_abs_logit_diff": _max_abs_diff(reference, got),
            "max_abs_logit": max(float(r.abs().max()) for r in reference),
            "top1_agreement": min(top1), "prompts": len(chats), "tokens": sum(int(i.shape[1]) for i in ids),
            "dtype": dtype, "compared": "merged model reloaded from disk vs base + adapter (unmerged), same dtype"}
