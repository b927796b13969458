"""The Train tab's hyperparameter form, generated from StudioConfig's field declarations.

`FIELDS` lists every leaf field of the config in `iter_fields()` order; the form's components
are built from it and kept in the same order, so `form_to_config(values)` and
`config_to_form(config)` are generic: adding a field to config.py adds it to the form, the
YAML preview, the command line and the round-trip test with no code here.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, DataConfig, StudioConfig, get_value, iter_fields
from ..paths import PRESETS_DIR

SECTION_TITLES = {"run": "Run", "model": "Model & quantization", "quant": "Model & quantization",
                  "data": "Data", "lora": "LoRA", "train": "Training"}
SECTION_LABELS = {"run": "Run", "model": "Model", "quant": "Quant", "data": "Data", "lora": "LoRA", "train": "Train"}
AMBIGUOUS_LEAVES = {"name", "type", "revision", "source", "format", "split", "template", "r", "alpha", "dropout",
                    "bias"}
USER_PRESET_MARK = "# saved from the QLoRA Studio Train tab"
PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class FieldSpec:
    name: str          # dotted, e.g. train.batch_size
    kind: str          # int | float | bool | choice | text | modules | mapping
    help: str
    choices: tuple | None
    minimum: float | None
    maximum: float | None
    bounds: str        # "≥ 1", "> 0 and < 1", ...
    advanced: bool

    @property
    def section(self) -> str:
        return self.name.split(".")[0] if "." in self.name else "run"

    @property
    def label(self) -> str:
        leaf = self.name.rsplit(".", 1)[-1]
        if leaf in AMBIGUOUS_LEAVES:  # "Type" alone says nothing; "Quant type" does
            return f"{SECTION_LABELS[self.section]} {leaf.replace('_', ' ')}"
        return leaf.replace("_", " ").capitalize()

    @property
    def info(self) -> str:
        extra = f" Range: {self.bounds}." if self.bounds else ""
        return f"{self.help}{extra} `{self.name}`"


def _spec(name: str, f, ftype) -> FieldSpec:
    m = f.metadata
    if ftype is bool:
        kind = "bool"
    elif ftype is int:
        kind = "int"
    elif ftype is float:
        kind = "float"
    elif ftype is list:
        kind = "modules"
    elif ftype is dict:
        kind = "mapping"
    elif m.get("choices"):
        kind = "choice"
    else:
        kind = "text"
    parts = [f"{op} {m[key]:g}" for key, op in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))
             if m.get(key) is not None]
    low = m.get("ge") if m.get("ge") is not None else m.get("gt")
    high = m.get("le") if m.get("le") is not None else m.get("lt")
    return FieldSpec(name=name, kind=kind, help=m.get("help", ""), choices=m.get("choices"), minimum=low,
                     maximum=high, bounds=" and ".join(parts), advanced=bool(m.get("advanced")))


FIELDS: tuple[FieldSpec, ...] = tuple(_spec(*item) for item in iter_fields())
FIELD_NAMES: tuple[str, ...] = tuple(s.name for s in FIELDS)
DATA_FIELDS = tuple(s for s in FIELDS if s.section == "data")


# -- values <-> config ---------------------------------------------------------------------

def parse_mapping(name: str, text: Any) -> dict:
    """'prompt: question, completion: answer' (or a YAML/JSON mapping) -> dict."""
    if isinstance(text, dict):
        return text
    text = (text or "").strip()
    if not text:
        return {}
    try:
        data = yaml.safe_load(text if text.startswith("{") else "{" + text + "}")
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict) or not all(isinstance(v, (str, int, float)) for v in data.values()):
        raise ConfigError(name, f"expected pairs like 'prompt: question, completion: answer', got {text!r}")
    return {str(k): str(v) for k, v in data.items()}


def format_mapping(mapping: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in (mapping or {}).items())


def form_value(spec: FieldSpec, value: Any) -> Any:
    if spec.kind == "mapping":
        return format_mapping(value)
    if spec.kind == "modules":
        return list(value)
    return value


def _config_value(spec: FieldSpec, value: Any) -> Any:
    if spec.kind == "mapping":
        return parse_mapping(spec.name, value)
    if spec.kind == "modules":
        return list(value or [])
    if spec.kind == "text":
        return "" if value is None else value
    if spec.kind == "float" and value is not None:
        return float(value)
    return value  # None in a number box reaches the config, which names the field as empty


def config_to_form(config: StudioConfig) -> list:
    """Form values in FIELDS order."""
    return [form_value(spec, get_value(config, spec.name)) for spec in FIELDS]


def form_to_dict(values: Sequence) -> dict:
    if len(values) != len(FIELDS):
        raise ValueError(f"expected {len(FIELDS)} form values, got {len(values)}")
    nested: dict = {}
    for spec, value in zip(FIELDS, values):
        node = nested
        *sections, leaf = spec.name.split(".")
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = _config_value(spec, value)
    return nested


def form_to_config(values: Sequence) -> StudioConfig:
    """Build and validate the config; raises ConfigError naming the field."""
    return StudioConfig.from_dict(form_to_dict(values))


def apply_data(values: Sequence, data: dict | None) -> list:
    """The Dataset tab's choice (session.data, a DataConfig dict) written over the form's data.* values."""
    values = list(values)
    if not data:
        return values
    known = {f for f in DataConfig.__dataclass_fields__}
    for i, spec in enumerate(FIELDS):
        key = spec.name.split(".", 1)[1] if spec.section == "data" else None
        if key in known and key in data and data[key] is not None:
            values[i] = form_value(spec, data[key])
    return values


def data_values(values: Sequence) -> list:
    """Just the data.* values, in DATA_FIELDS order."""
    return [v for spec, v in zip(FIELDS, values) if spec.section == "data"]


def set_value(values: Sequence, name: str, value: Any) -> list:
    values = list(values)
    values[FIELD_NAMES.index(name)] = value
    return values


# -- presets ---------------------------------------------------------------------------------

def list_presets(presets_dir: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in Path(presets_dir).glob("*.yaml"))


def load_preset(name: str, presets_dir: Path = PRESETS_DIR) -> StudioConfig:
    path = Path(presets_dir) / f"{name}.yaml"
    if not path.exists():
        raise ConfigError("preset", f"no preset named {name!r}; presets: {', '.join(list_presets(presets_dir))}")
    return StudioConfig.load(path)


def is_user_preset(path: Path) -> bool:
    try:
        head = path.read_text(encoding="utf-8").splitlines()[:3]
    except OSError:
        return False
    return USER_PRESET_MARK in head


def save_preset(name: str, config: StudioConfig, presets_dir: Path = PRESETS_DIR) -> Path:
    """Write presets/<name>.yaml; shipped presets are never overwritten. Raises ValueError."""
    name = (name or "").strip()
    name = name.removesuffix(".yaml")
    if not PRESET_NAME.match(name):
        raise ValueError(f"Preset name {name!r} is not allowed: use letters, digits, '-', '_' or '.', "
                         "starting with a letter or digit (at most 63 characters).")
    path = Path(presets_dir) / f"{name}.yaml"
    if path.exists() and not is_user_preset(path):
        raise ValueError(f"{name} is a shipped preset and cannot be overwritten; pick another name.")
    # A preset is reusable: it names no run and writes where the CLI user runs it.
    config = config.with_overrides(["run_name=", "output_dir=runs"])
    path.parent.mkdir(parents=True, exist_ok=True)
    config.save(path, header=f"# qlora-studio train presets/{name}.yaml\n{USER_PRESET_MARK}")
    return path


# -- YAML and command preview -------------------------------------------------------------

def _yaml_scalar(value: Any) -> str:
    # A bare scalar dumps as "4\n...\n" (YAML's document end marker): keep the value only.
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def overrides(config: StudioConfig, base: StudioConfig) -> list[str]:
    """`key=value` for every field where config differs from base, in field order."""
    out = []
    for spec in FIELDS:
        value = get_value(config, spec.name)
        if value != get_value(base, spec.name):
            out.append(f"{spec.name}={'' if value == '' else _yaml_scalar(value)}")
    return out


def _display_path(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def train_command(config: StudioConfig, preset: str | None, presets_dir: Path = PRESETS_DIR) -> str:
    """The `qlora-studio train` command that runs this config."""
    config = config.with_overrides([f"output_dir={_display_path(config.output_dir)}"])
    if not (preset and (Path(presets_dir) / f"{preset}.yaml").exists()):
        return "qlora-studio train config.yaml    # config.yaml: the YAML above"
    sets = " ".join(f"--set {shlex.quote(item)}" for item in overrides(config, load_preset(preset, presets_dir)))
    return f"qlora-studio train presets/{preset}.yaml" + (f" {sets}" if sets else "")


def with_scale(command: str, gpus: int = 1, fsdp: bool = False) -> str:
    """The train command with the launch on several GPUs added (`--gpus N [--fsdp]`), before any comment."""
    gpus = int(gpus or 1)
    if gpus <= 1 and not fsdp:
        return command
    flags = f" --gpus {gpus}" + (" --fsdp" if fsdp else "")
    body, sep, comment = command.partition("    #")
    return body.rstrip() + flags + (f"    #{comment}" if sep else "")


def config_yaml(config: StudioConfig, preset: str | None) -> str:
    header = "# qlora-studio train config.yaml" + (f"   (from preset {preset})" if preset else "")
    return config.to_yaml(header=header)
