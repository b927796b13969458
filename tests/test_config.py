import dataclasses

import pytest
import yaml

from qlora_studio.config import ConfigError, StudioConfig, iter_fields
from qlora_studio.models import Hardware, resolve_compute_dtype
from qlora_studio.paths import PRESETS_DIR, list_presets


def test_defaults_are_valid_and_round_trip_through_yaml():
    config = StudioConfig()
    again = StudioConfig.from_yaml(config.to_yaml())
    assert again == config
    assert yaml.safe_load(config.to_yaml())["lora"]["r"] == 16


def test_every_field_has_help_text_and_a_default():
    seen = list(iter_fields())
    assert len(seen) > 40
    for dotted, field, _ in seen:
        assert field.metadata["help"].strip(), dotted
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        assert has_default, dotted


def test_config_covers_what_the_form_needs():
    names = {dotted for dotted, _, _ in iter_fields()}
    for needed in ["lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "lora.use_rslora", "lora.use_dora",
                   "lora.bias", "quant.type", "quant.double_quant", "quant.compute_dtype", "train.learning_rate",
                   "train.epochs", "train.max_steps", "train.batch_size", "train.grad_accum", "train.warmup_ratio",
                   "train.scheduler", "train.optimizer", "train.weight_decay", "train.seed", "train.logging_steps",
                   "train.eval_steps", "train.save_steps", "train.gradient_checkpointing", "train.packing",
                   "train.completion_only_loss", "data.source", "data.format", "data.mapping", "data.system_prompt",
                   "data.max_length", "data.eval_fraction", "model.name"]:
        assert needed in names


@pytest.mark.parametrize("override, field, words", [
    ("lora.r=0", "lora.r", ">= 1"),
    ("lora.dropout=1.0", "lora.dropout", "< 1.0"),
    ("lora.dropout=-0.1", "lora.dropout", ">= 0.0"),
    ("quant.type=nf8", "quant.type", "not one of"),
    ("quant.compute_dtype=bf32", "quant.compute_dtype", "not one of"),
    ("train.batch_size=two", "train.batch_size", "whole number"),
    ("train.batch_size=2.5", "train.batch_size", "whole number"),
    ("train.learning_rate=abc", "train.learning_rate", "number"),
    ("train.packing=maybe", "train.packing", "true/false"),
    ("train.optimizer=adam", "train.optimizer", "not one of"),
    ("lora.target_modules=all-linear,q_proj", "lora.target_modules", "all-linear"),
    ("run_name=../escape", "run_name", "plain folder name"),
])
def test_invalid_values_name_the_field_and_reason(override, field, words):
    with pytest.raises(ConfigError) as err:
        StudioConfig().with_overrides([override])
    assert err.value.field == field
    assert words in str(err.value)


def test_unknown_keys_fail_loudly():
    with pytest.raises(ConfigError, match="lora.rank: unknown key"):
        StudioConfig.from_dict({"lora": {"rank": 8}})
    with pytest.raises(ConfigError, match="trainer: unknown key"):
        StudioConfig.from_dict({"trainer": {}})
    with pytest.raises(ConfigError, match="train.steps: unknown field"):
        StudioConfig().with_overrides(["train.steps=3"])


def test_overrides_parse_values_by_type():
    config = StudioConfig().with_overrides(["train.max_steps=5", "lora.target_modules=q_proj,v_proj",
                                            "train.packing=true", "data.mapping={prompt: q}"])
    assert config.train.max_steps == 5
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.train.packing is True
    assert config.data.mapping == {"prompt": "q"}


def test_compute_dtype_auto_follows_hardware():
    ampere = Hardware("cuda", "A100", bf16=True, fp16=True, memory_gb=80)
    turing = Hardware("cuda", "Tesla T4", bf16=False, fp16=True, memory_gb=16)
    amx_cpu = Hardware("cpu", "x86_64", bf16=True, fp16=False, memory_gb=24)
    old_cpu = Hardware("cpu", "x86_64", bf16=False, fp16=False, memory_gb=24)
    assert resolve_compute_dtype("auto", ampere) == "bf16"
    assert resolve_compute_dtype("auto", turing) == "fp16"
    assert resolve_compute_dtype("auto", amx_cpu) == "bf16"
    assert resolve_compute_dtype("auto", old_cpu) == "fp32"
    with pytest.raises(ConfigError) as err:
        resolve_compute_dtype("bf16", turing)
    assert err.value.field == "quant.compute_dtype" and "Tesla T4" in str(err.value)


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_validates_and_opens_with_its_command(name):
    path = PRESETS_DIR / f"{name}.yaml"
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith(f"# qlora-studio train presets/{name}.yaml")
    config = StudioConfig.load(path)
    assert StudioConfig.from_yaml(config.to_yaml()) == config


def test_the_presets_the_issue_asks_for_exist():
    presets = {name: StudioConfig.load(PRESETS_DIR / f"{name}.yaml") for name in list_presets()}
    quick = presets["quick-cpu"]
    assert quick.model.name == "embedded" and quick.quant.type == "nf4"
    paper = presets["qlora-paper"]
    assert (paper.lora.r, paper.lora.alpha, paper.lora.dropout) == (64, 16, 0.1)
    assert paper.quant.type == "nf4" and paper.quant.double_quant and paper.quant.compute_dtype == "bf16"
    assert paper.train.learning_rate == 2e-4 and paper.train.optimizer.startswith("paged_adamw")
    assert presets["7b-t4-16gb"].quant.compute_dtype == "fp16"
    assert presets["7b-24gb"].quant.compute_dtype == "bf16"
