"""Side-by-side chat: one loaded base model, its answer with the adapter off and on, streamed together.

The base weights are loaded once. Both sides run in one batched `generate` where PEFT's
mixed-adapter batches allow it (`adapter_names=["__base__", <adapter>]`: the "__base__" row
skips every LoRA layer, so it is the true base model); otherwise the base side runs under
`disable_adapter()` and then the adapted side, one after the other.

    pool = ModelPool()
    info = resolve_adapter("runs/my-run")           # run folder, adapter folder/zip, Hub adapter id
    for step in stream_compare(pool, info, base_messages, adapted_messages, "model", GenerationSettings()):
        print(step.base, step.adapted)
"""

from __future__ import annotations

import csv
import gc
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from .chat_engine import BASE, ADAPTED, Generation
from .chat_sources import AdapterInfo, ChatError, PoolBusy, resolve_adapter, same_model
from .config import ConfigError, QuantConfig
from .templates import TEMPLATE_LABELS, render_chat

__all__ = ["AdapterInfo", "ChatError", "PoolBusy", "resolve_adapter", "same_model", "CHAT_TEMPLATES",
           "TEMPLATE_CHOICES", "build_messages", "render_prompt", "GenerationSettings", "ModelPool", "LoadedPair",
           "CompareStep", "stream_compare", "compare", "batch_compare", "eval_split_prompts", "write_csv"]

CHAT_TEMPLATES = (*TEMPLATE_LABELS, "plain")
TEMPLATE_CHOICES = [(label, name) for name, label in TEMPLATE_LABELS.items()] + [("Plain text (no template)", "plain")]


# -- prompts ----------------------------------------------------------------------

def build_messages(history: list[dict], user_text: str, system: str = "") -> list[dict]:
    """System prompt (if any) + one side's own history + the new user turn."""
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages += [{"role": m["role"], "content": m["content"]} for m in history]
    messages.append({"role": "user", "content": user_text})
    return messages


def render_prompt(tokenizer, messages: list[dict], template: str) -> str:
    """The exact string a side is given: the chat template with the assistant turn opened, or for
    'plain' just the texts, so a model without chat training simply continues them."""
    if template == "plain":
        return "\n\n".join(m["content"] for m in messages)
    if template not in CHAT_TEMPLATES:
        raise ChatError(f"template {template!r} is not one of {', '.join(CHAT_TEMPLATES)}")
    return render_chat(tokenizer, messages, template, add_generation_prompt=True)


# -- generation settings ----------------------------------------------------------

@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int = 0
    greedy: bool = False
    min_new_tokens: int = 0   # benchmarks set it to max_new_tokens to force equal lengths

    _BOUNDS = {"max_new_tokens": (1, 4096), "temperature": (0.0, 5.0), "top_p": (0.0, 1.0), "top_k": (0, 1000),
               "repetition_penalty": (0.5, 3.0), "seed": (0, 2**32 - 1), "min_new_tokens": (0, 4096)}

    def __post_init__(self):
        for name, (low, high) in self._BOUNDS.items():
            value = getattr(self, name)
            if value is None or isinstance(value, bool) or not low <= value <= high:
                raise ChatError(f"{name} must be between {low} and {high}, got {value!r}")
        for name in ("max_new_tokens", "top_k", "seed", "min_new_tokens"):
            setattr(self, name, int(getattr(self, name)))
        if not self.greedy and self.temperature == 0:
            raise ChatError("temperature 0 means greedy decoding: tick 'greedy' or raise the temperature")
        if self.min_new_tokens > self.max_new_tokens:
            raise ChatError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.greedy:
            # Explicit neutral values: a model's generation_config may ship sampling defaults.
            return {**kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {**kwargs, "do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k}

    def to_dict(self) -> dict:
        return asdict(self)


# -- loading ----------------------------------------------------------------------

@dataclass
class LoadedPair:
    """A base model wrapped with one LoRA adapter, plus what chat needs to use it."""
    model: object           # peft.PeftModel
    tokenizer: object
    info: AdapterInfo
    adapter_name: str
    base_key: tuple
    device: str
    dtype: str
    mixed_batch: bool       # both sides in one batched generate (else: base, then adapted)
    load_seconds: float
    notes: list = field(default_factory=list)
    stamp: tuple = ()        # the adapter files it was loaded from (see _adapter_stamp)

    def describe(self) -> str:
        mode = "one batched generate" if self.mixed_batch else "base then adapted (adapter disabled for base)"
        return (f"base **{self.info.base_display}** + adapter **{self.info.label}** on {self.device} "
                f"({self.info.quant.type}, {self.dtype}; {mode})")


def chat_compute_dtype(setting: str, hw) -> str:
    """The dtype the adapter was trained with, when this machine has it (else what 'auto' picks)."""
    from .models import resolve_compute_dtype

    try:
        return resolve_compute_dtype(setting, hw)
    except ConfigError:
        return resolve_compute_dtype("auto", hw)


def _supports_mixed_batch(model) -> bool:
    return not any(getattr(cfg, "use_dora", False) for cfg in model.peft_config.values())


@dataclass
class LoadPlan:
    """Where the base comes from and how it will be loaded, decided before loading anything."""
    path: str
    quant: QuantConfig
    dtype: str
    hw: object
    notes: list

    @property
    def base_key(self) -> tuple:
        return (self.path, self.quant.type, self.quant.double_quant, self.dtype, self.hw.device)


def plan_load(info: AdapterInfo, device: str = "auto") -> LoadPlan:
    from .models import ModelError, detect_hardware, resolve_model

    hw = detect_hardware(device)
    quant, notes = info.quant, list(info.notes)
    if quant.type == "int8" and hw.device == "cpu":
        quant = QuantConfig(type="none", double_quant=quant.double_quant, compute_dtype=quant.compute_dtype)
        notes.append("8-bit bases need a CUDA GPU; the base is loaded unquantized on this CPU")
    try:
        resolved = resolve_model(info.base_model, info.revision)
    except ModelError as e:
        raise ChatError(f"The adapter's base model cannot be loaded: {e}") from None
    return LoadPlan(resolved.path, quant, chat_compute_dtype(info.compute_dtype, hw), hw, notes)


def load_pair(info: AdapterInfo, device: str = "auto", previous: LoadedPair | None = None,
              adapter_name: str = "adapter", plan: LoadPlan | None = None) -> LoadedPair:
    """Load the adapter's base (or reuse `previous`'s, when it is the same base) and attach the adapter."""
    from peft import PeftModel

    from .models import load_base_model, load_tokenizer

    started = time.monotonic()
    plan = plan or plan_load(info, device)
    adapter_files = Path(info.adapter_path)
    tokenizer_dir = str(adapter_files) if (adapter_files / "tokenizer_config.json").exists() else plan.path
    tokenizer = load_tokenizer(tokenizer_dir, info.trust_remote_code)
    tokenizer.padding_side = "left"  # rows of different lengths end where generation starts
    try:
        if previous is not None and previous.base_key == plan.base_key:
            model = previous.model
            model.load_adapter(str(adapter_files), adapter_name=adapter_name, is_trainable=False)
            model.set_adapter(adapter_name)
            model.delete_adapter(previous.adapter_name)
        else:
            base = load_base_model(plan.path, plan.quant, plan.dtype, plan.hw,
                                   trust_remote_code=info.trust_remote_code)
            model = PeftModel.from_pretrained(base, str(adapter_files), adapter_name=adapter_name,
                                              is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ChatError(f"The adapter {info.label} does not fit the base model {info.base_model}: it was trained "
                        f"on {info.recorded_base or 'an unrecorded base'} ({detail}). Pick the base it was trained "
                        "on.") from None
    model.eval()
    return LoadedPair(model=model, tokenizer=tokenizer, info=info, adapter_name=adapter_name, base_key=plan.base_key,
                      device=plan.hw.device, dtype=plan.dtype, mixed_batch=_supports_mixed_batch(model),
                      load_seconds=time.monotonic() - started, notes=plan.notes)


def _adapter_stamp(info: AdapterInfo) -> tuple:
    """Identifies the adapter's files as they are now: a run that saved a newer adapter reloads."""
    folder = Path(info.adapter_path).resolve()
    stamps = [(p.name, p.stat().st_mtime_ns) for p in sorted(folder.glob("adapter_*")) if p.is_file()]
    return (str(folder), tuple(stamps), info.base_model, info.revision, info.quant)


class ModelPool:
    """The machine-wide loaded model: one (base, adapter) pair at a time, used by one session at a time.

    Loading and generating hold the lock; a second session gets PoolBusy at once instead of
    queueing silently. The generation thread releases the lock itself, so a browser that goes
    away mid-answer cannot keep the model locked.
    """

    def __init__(self, device: str = "auto"):
        self.device = device
        self._lock = threading.Lock()
        self._pair: LoadedPair | None = None
        self._stop: threading.Event | None = None
        self._owner: str | None = None
        self._loads = 0

    @property
    def loaded(self) -> LoadedPair | None:
        return self._pair

    def describe(self) -> str:
        pair = self._pair
        return f"Loaded: {pair.describe()}" if pair else "No model loaded yet: the first message loads it."

    def acquire(self, owner: str | None = None, wait_s: float = 0.0) -> threading.Event:
        """Take the model for one generation; returns the event that stops it."""
        acquired = self._lock.acquire(timeout=wait_s) if wait_s > 0 else self._lock.acquire(blocking=False)
        if not acquired:
            raise PoolBusy("The model is busy answering another session; try again in a moment.")
        self._stop, self._owner = threading.Event(), owner
        return self._stop

    def release(self) -> None:
        self._stop, self._owner = None, None
        self._lock.release()

    def stop(self, owner: str | None = None) -> bool:
        """Stop the running generation (only the caller's own, when an owner is given)."""
        event = self._stop
        if event is None or (owner is not None and self._owner not in (None, owner)):
            return False
        event.set()
        return True

    def pair_for(self, info: AdapterInfo) -> LoadedPair:
        """The loaded pair for this adapter, loading it if needed. Call with the pool acquired."""
        pair = self._pair
        if not self.needs_load(info):
            pair.info = info  # same weights; the template/system defaults may come from a fresher read
            return pair
        plan = plan_load(info, self.device)
        previous = pair if pair is not None and pair.base_key == plan.base_key else None
        # Let go of an unrelated base before the next one loads (never two in memory), and of a
        # reused one too: if attaching the new adapter fails, it may be left half-changed.
        self._pair = pair = None
        gc.collect()
        self._loads += 1
        self._pair = load_pair(info, previous=previous, adapter_name=f"adapter{self._loads}", plan=plan)
        self._pair.stamp = _adapter_stamp(info)
        return self._pair

    def needs_load(self, info: AdapterInfo) -> bool:
        pair = self._pair
        return pair is None or pair.stamp != _adapter_stamp(info)

    def unload(self) -> None:
        with self._lock:
            self._pair = None


# -- streaming --------------------------------------------------------------------

@dataclass
class CompareStep:
    base: str
    adapted: str
    base_prompt: str
    adapted_prompt: str
    done: bool = False
    status: str = ""
    stats: dict = field(default_factory=dict)


def stream_compare(pool: ModelPool, info: AdapterInfo, base_messages: list[dict], adapted_messages: list[dict],
                   template: str, settings: GenerationSettings, *, owner: str | None = None,
                   wait_s: float = 0.0) -> Iterator[CompareStep]:
    """Stream both answers as they grow. Each side gets its own messages (its own history).

    The pool is never held across a yield by this generator: once generation starts, its
    thread owns the pool and releases it, so a consumer that is dropped mid-answer (a closed
    tab, a cancelled event) cannot leave the model locked.
    """
    if pool.needs_load(info):
        yield CompareStep("", "", "", "", status=f"Loading {info.base_display} with the adapter {info.label}…")
    stop = pool.acquire(owner, wait_s)
    try:
        pair = pool.pair_for(info)
        prompts = [render_prompt(pair.tokenizer, base_messages, template),
                   render_prompt(pair.tokenizer, adapted_messages, template)]
        generation = Generation(pair, prompts, [BASE, ADAPTED], settings, stop, plain=template == "plain",
                                on_finish=pool.release)
    except BaseException:
        pool.release()
        raise
    generation.start()
    try:
        for texts, done, stats in generation.stream():
            yield CompareStep(texts[BASE], texts[ADAPTED], prompts[BASE], prompts[ADAPTED], done=done,
                              stats=stats, status="Stopped." if done and stats["stopped"] else "")
    except ChatError:
        raise
    except Exception as e:
        raise ChatError(f"Generation failed: {type(e).__name__}: {e}") from e
    finally:
        stop.set()  # the consumer left early (Stop, closed tab): end the generation too


def compare(pool: ModelPool, info: AdapterInfo, prompt: str, *, system: str = "", template: str | None = None,
            settings: GenerationSettings | None = None, wait_s: float = 600.0) -> CompareStep:
    """One prompt, both answers (the CLI's call)."""
    messages = build_messages([], prompt, system)
    last = None
    for last in stream_compare(pool, info, messages, messages, template or info.template,
                               settings or GenerationSettings(), wait_s=wait_s):
        pass
    return last


# -- batch compare ----------------------------------------------------------------

def batch_compare(pool: ModelPool, info: AdapterInfo, prompts: list[str], *, system: str = "",
                  template: str | None = None, settings: GenerationSettings | None = None,
                  references: list[str] | None = None, prerendered: bool = False, batch_size: int = 4,
                  owner: str | None = None, wait_s: float = 0.0) -> Iterator[list[dict]]:
    """Rows {prompt, base, adapted[, reference]} for many prompts, yielded as each batch finishes.

    `prerendered` prompts are exact model inputs (the eval split, rendered as in training) and get
    no template; otherwise each prompt is one user turn under `template` with `system`.
    """
    # Prerendered prompts are kept byte for byte (their trailing newline is part of the template).
    keep = [i for i, p in enumerate(prompts) if p.strip()]
    prompts = [prompts[i] if prerendered else prompts[i].strip() for i in keep]
    references = [references[i] for i in keep] if references is not None else None
    if not prompts:
        raise ChatError("No prompts: paste one prompt per line, or load the run's eval split.")
    template = template or info.template
    settings = settings or GenerationSettings()
    rows: list[dict] = []
    for start in range(0, len(prompts), max(1, batch_size)):
        chunk = prompts[start:start + batch_size]
        # The pool is taken per batch and never held across a yield (see stream_compare).
        stop = pool.acquire(owner, wait_s)
        try:
            pair = pool.pair_for(info)
            rendered = chunk if prerendered else [
                render_prompt(pair.tokenizer, build_messages([], p, system), template) for p in chunk]
            generation = Generation(pair, rendered * 2, [BASE] * len(chunk) + [ADAPTED] * len(chunk), settings,
                                    stop, plain=prerendered or template == "plain")
            texts = generation.run_to_end()
        finally:
            pool.release()
        for i, prompt in enumerate(chunk):
            row = {"prompt": prompt, "base": texts[i], "adapted": texts[len(chunk) + i]}
            if references is not None:
                row["reference"] = references[start + i]
            rows.append(row)
        yield list(rows)
        if stop.is_set():
            break


def eval_split_prompts(info: AdapterInfo, tokenizer=None, limit: int = 50) -> tuple[list[str], list[str]]:
    """The run's held-out rows as (exact rendered prompts, reference answers), rendered as in training.

    The prompt is every token before the first one trained on, so it carries the training
    template and system prompt; the reference is the first trained span.
    """
    if info.config is None:
        raise ChatError("Only a run folder knows its dataset; this adapter came without one, so paste prompts.")
    from .data import DataError, prepare_training_data
    from .models import load_tokenizer, resolve_model

    if tokenizer is None:
        adapter = Path(info.adapter_path)
        path = str(adapter) if (adapter / "tokenizer_config.json").exists() else \
            resolve_model(info.base_model, info.revision).path
        tokenizer = load_tokenizer(path, info.trust_remote_code)
    try:
        data = prepare_training_data(info.config.data, tokenizer, seed=info.config.train.seed,
                                     completion_only_loss=True)
    except DataError as e:
        raise ChatError(f"The run's dataset cannot be read: {e}") from None
    if data.eval is None or len(data.eval) == 0:
        raise ChatError(f"The run has no eval split ({data.report.split}); paste prompts instead.")
    prompts, references = [], []
    for ids, mask in zip(data.eval["input_ids"], data.eval["assistant_masks"]):
        if 1 not in mask or mask.index(1) == 0:
            continue  # plain text rows have no prompt to answer
        first = mask.index(1)
        end = mask.index(0, first) if 0 in mask[first:] else len(mask)
        prompts.append(tokenizer.decode(ids[:first], skip_special_tokens=False))
        references.append(tokenizer.decode(ids[first:end], skip_special_tokens=True).strip())
        if len(prompts) >= limit:
            break
    if not prompts:
        raise ChatError("The run's eval rows are plain text without prompt/answer turns; paste prompts instead.")
    return prompts, references


def write_csv(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    columns = list(dict.fromkeys(k for row in rows for k in row)) or ["prompt", "base", "adapted"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path
