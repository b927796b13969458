"""StudioConfig: the one typed configuration of a fine-tuning run.

Each field is declared once, here, with its default, help text and bounds. The Train
tab builds its form from these declarations, presets are this config as YAML, a run
saves it next to its artifacts, and the CLI applies `--set section.field=value` to it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is wrong; `field` is the dotted name the user typed or saw."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


def option(default: Any, help: str, *, choices: tuple | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None,
           advanced: bool = False, factory: Any = None):
    """A config field with the metadata the form, the validator and the docs read."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "advanced": advanced}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


EMBEDDED_MODEL = "embedded"
QUANT_TYPES = ("nf4", "fp4", "int8", "none")
DTYPES = ("auto", "bf16", "fp16", "fp32")
DATA_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text")
TEMPLATES = ("model", "chatml", "llama2", "alpaca", "zephyr")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adafactor", "sgd")


@dataclass
class ModelConfig:
    name: str = option(EMBEDDED_MODEL, "Base model: 'embedded' (SmolLM2-135M-Instruct, shipped offline), a Hub id such as "
                       "'Qwen/Qwen2.5-0.5B-Instruct' (needs the network or the Hub cache), or a local folder with config.json.")
    revision: str = option("", "Hub revision (branch, tag or commit) when `name` is a Hub id; empty means the default branch.",
                           advanced=True)
    trust_remote_code: bool = option(False, "Run Python code shipped with the model repository. Warning: that code runs "
                                     "with your permissions; tick only for models you trust.", advanced=True)
    allow_pickle_weights: bool = option(False, "Also load .bin/.pt (pickle) weights. Pickle files can run code when "
                                        "loaded; by default only safetensors are accepted.", advanced=True)


@dataclass
class QuantConfig:
    type: str = option("nf4", "How the frozen base weights are stored: 4-bit NormalFloat (QLoRA), 4-bit float, 8-bit, or "
                       "unquantized.", choices=QUANT_TYPES)
    double_quant: bool = option(True, "Quantize the 4-bit quantization constants too (saves ~0.4 bit per weight).")
    compute_dtype: str = option("auto", "Dtype of the matrix math. 'auto' picks bf16 where the hardware has it "
                                "(Ampere+ GPUs, CPUs with AMX/AVX512-BF16), else fp16 on GPUs and fp32 on CPUs.",
                                choices=DTYPES)


@dataclass
class DataConfig:
    source: str = option("sample:persona", "Training data: a file (JSONL, JSON, CSV, TSV, Parquet, TXT), a sample "
                         "('sample:persona', 'sample:instructions', 'sample:dialogue') or a Hub dataset id.")
    format: str = option("auto", "Row format; 'auto' detects it from the columns.", choices=DATA_FORMATS)
    mapping: dict = option(None, "Column mapping, format field -> your column, e.g. {prompt: question, completion: answer}.",
                           factory=dict)
    hub_config: str = option("", "Hub dataset configuration name.", advanced=True)
    split: str = option("train", "Hub dataset split to train on.", advanced=True)
    system_prompt: str = option("", "System prompt added to conversations that have none.")
    template: str = option("model", "Chat template used to render conversations: the model's own or a named one.",
                           choices=TEMPLATES)
    max_length: int = option(512, "Longest training sequence in tokens; longer rows are truncated (and reported).", ge=16)
    eval_fraction: float = option(0.1, "Share of rows held out for evaluation (0 disables evaluation).", ge=0.0, lt=0.9)
    eval_source: str = option("", "Held-out data instead of eval_fraction: a separate file, or 'split:NAME' for another "
                              "split of a Hub dataset (e.g. split:test).", advanced=True)
    bad_rows: str = option("drop", "What to do with invalid rows: drop them (and record why) or stop.",
                           choices=("drop", "stop"))


@dataclass
class LoraSettings:
    r: int = option(16, "LoRA rank: size of the low-rank update. 8-64 is typical.", ge=1)
    alpha: float = option(32, "LoRA scaling numerator; the update is scaled by alpha/r (usually 2*r).", gt=0)
    dropout: float = option(0.05, "Dropout on the LoRA input. 0 is faster; 0.05-0.1 regularizes small datasets.", ge=0.0, lt=1.0)
    target_modules: list = option(None, "Layers that get adapters: ['all-linear'] or names such as q_proj, v_proj.",
                                  factory=lambda: ["all-linear"])
    bias: str = option("none", "Which biases to train.", choices=("none", "all", "lora_only"), advanced=True)
    use_rslora: bool = option(False, "Rank-stabilized LoRA: scale by alpha/sqrt(r), better for large ranks.", advanced=True)
    use_dora: bool = option(False, "Weight-decomposed LoRA (DoRA): often better quality, slower.", advanced=True)


@dataclass
class TrainSettings:
    learning_rate: float = option(2e-4, "Peak learning rate. 1e-4 to 3e-4 suits LoRA.", gt=0, lt=1)
    epochs: float = option(1.0, "Passes over the training data (ignored when max_steps > 0).", gt=0)
    max_steps: int = option(0, "Stop after this many optimizer steps; 0 means train for `epochs`.", ge=0)
    batch_size: int = option(4, "Rows per device per forward pass.", ge=1)
    grad_accum: int = option(1, "Forward passes accumulated per optimizer step (effective batch = batch_size x this).", ge=1)
    warmup_ratio: float = option(0.03, "Share of steps spent ramping the learning rate up.", ge=0, lt=1)
    scheduler: str = option("cosine", "Learning-rate schedule after warmup.", choices=SCHEDULERS)
    optimizer: str = option("adamw_torch", "Optimizer. paged_adamw_8bit (bitsandbytes) saves memory on GPUs.",
                            choices=OPTIMIZERS)
    weight_decay: float = option(0.0, "Decoupled weight decay.", ge=0)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables).", ge=0, advanced=True)
    seed: int = option(42, "Random seed for data order, split and LoRA init.", ge=0)
    logging_steps: int = option(1, "Log train loss every N optimizer steps.", ge=1)
    eval_steps: int = option(0, "Evaluate every N steps; 0 evaluates once per epoch and at the end.", ge=0)
    save_steps: int = option(50, "Write a resumable checkpoint every N steps.", ge=1)
    save_total_limit: int = option(2, "Checkpoints kept on disk (older ones are deleted).", ge=1, advanced=True)
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass: less memory, ~30% slower.")
    padding_free: bool = option(False, "Concatenate a batch's rows into one sequence instead of padding them to the "
                                "longest; attention stays within each row. Same rows per step, no wasted compute.")
    packing: bool = option(False, "Pack several rows into each max_length sequence (fewer, fuller steps per epoch; "
                           "attention kept within each row).")
    completion_only_loss: bool = option(True, "Train only on assistant/completion tokens; prompts are masked from the loss.")


@dataclass
class StudioConfig:
    run_name: str = option("", "Name of the run folder; empty generates one from the time, model and data.")
    output_dir: str = option("runs", "Folder holding run folders.")
    model: ModelConfig = option(None, "Base model.", factory=ModelConfig)
    quant: QuantConfig = option(None, "Quantization of the frozen base.", factory=QuantConfig)
    data: DataConfig = option(None, "Training data.", factory=DataConfig)
    lora: LoraSettings = option(None, "LoRA adapter.", factory=LoraSettings)
    train: TrainSettings = option(None, "Optimization.", factory=TrainSettings)

    def __post_init__(self):
        validate(self)

    # -- serialization -------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "StudioConfig":
        return _build(cls, data or {}, prefix="")

    def to_yaml(self, header: str = "") -> str:
        body = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        return (header.rstrip() + "\n" if header else "") + body

    @classmethod
    def from_yaml(cls, text: str) -> "StudioConfig":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError("<yaml>", f"not valid YAML: {e}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError("<yaml>", "the top level must be a mapping of sections")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> "StudioConfig":
        p = Path(path)
        if p.is_dir():
            p = p / "config.yaml"
        if not p.exists():
            raise ConfigError("<file>", f"no config file at {p}")
        return cls.from_yaml(p.read_text(encoding="utf-8"))

    def save(self, path: str | Path, header: str = "") -> None:
        Path(path).write_text(self.to_yaml(header), encoding="utf-8")

    def with_overrides(self, assignments: list[str]) -> "StudioConfig":
        """Apply `section.field=value` strings (values parsed as YAML scalars/lists)."""
        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(item, "expected key=value, e.g. train.max_steps=5")
            parts = key.strip().split(".")
            node = data
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(key, f"unknown section '{part}'; sections: {', '.join(_section_names())}")
                node = node[part]
            if parts[-1] not in node:
                raise ConfigError(key, f"unknown field; known here: {', '.join(node)}")
            try:
                node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                node[parts[-1]] = raw
        return StudioConfig.from_dict(data)


def _section_names() -> list[str]:
    return [f.name for f in fields(StudioConfig) if dataclasses.is_dataclass(_field_type(StudioConfig, f.name))]


def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ConfigError(prefix + unknown[0], f"unknown key; known keys: {', '.join(known)}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        ftype = hints[name]
        dotted = prefix + name
        if dataclasses.is_dataclass(ftype):
            kwargs[name] = _build(ftype, value if value is not None else {}, dotted + ".")
        else:
            kwargs[name] = _coerce(dotted, value, ftype, known[name])
    return cls(**kwargs)


def _coerce(dotted: str, value: Any, ftype: Any, f: dataclasses.Field) -> Any:
    origin = typing.get_origin(ftype) or ftype
    if value is None:
        if origin in (list, dict):
            return f.default_factory()
        raise ConfigError(dotted, "must not be empty")
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(dotted, f"expected true/false, got {value!r}")
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(dotted, f"expected a whole number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(dotted, f"expected a whole number, got {value!r}") from None
        if number != int(number):
            raise ConfigError(dotted, f"expected a whole number, got {value!r}")
        return int(number)
    if origin is float:
        if isinstance(value, bool):
            raise ConfigError(dotted, f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(dotted, f"expected a number, got {value!r}") from None
    if origin is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(dotted, f"expected text, got {value!r}")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(dotted, f"expected a list of names, got {value!r}")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(dotted, f"expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    return value


def iter_fields(section_cls=None, prefix: str = ""):
    """Yield (dotted_name, dataclasses.Field, python type) for every leaf field, in declaration order."""
    cls = section_cls or StudioConfig
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        ftype = hints[f.name]
        if dataclasses.is_dataclass(ftype):
            yield from iter_fields(ftype, prefix + f.name + ".")
        else:
            yield prefix + f.name, f, ftype


def get_value(config: StudioConfig, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(config: StudioConfig) -> None:
    """Check every field against its declared bounds, then the rules that span fields."""
    for dotted, f, _ftype in iter_fields():
        value = get_value(config, dotted)
        m = f.metadata
        if m.get("choices") and value not in m["choices"]:
            raise ConfigError(dotted, f"{value!r} is not one of {', '.join(map(str, m['choices']))}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value:  # NaN
                raise ConfigError(dotted, "must be a number, got NaN")
            if m.get("ge") is not None and value < m["ge"]:
                raise ConfigError(dotted, f"must be >= {m['ge']}, got {value}")
            if m.get("gt") is not None and value <= m["gt"]:
                raise ConfigError(dotted, f"must be > {m['gt']}, got {value}")
            if m.get("le") is not None and value > m["le"]:
                raise ConfigError(dotted, f"must be <= {m['le']}, got {value}")
            if m.get("lt") is not None and value >= m["lt"]:
                raise ConfigError(dotted, f"must be < {m['lt']}, got {value}")
    if not config.model.name.strip():
        raise ConfigError("model.name", "must name a model ('embedded', a Hub id or a folder)")
    if not config.data.source.strip():
        raise ConfigError("data.source", "must name a dataset file, sample or Hub id")
    if not config.lora.target_modules:
        raise ConfigError("lora.target_modules", "list at least one module, or 'all-linear'")
    if "all-linear" in config.lora.target_modules and len(config.lora.target_modules) > 1:
        raise ConfigError("lora.target_modules", "'all-linear' already covers every linear layer; list it alone")
    if config.lora.use_dora and config.quant.type == "int8":
        raise ConfigError("lora.use_dora", "DoRA is not supported on 8-bit quantized layers; use nf4/fp4 or none")
    name = config.run_name
    if name and (name in (".", "..") or "/" in name or "\\" in name):
        raise ConfigError("run_name", f"{name!r} must be a plain folder name (no slashes)")
