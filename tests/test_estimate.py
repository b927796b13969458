"""Trainable-parameter counts and memory estimates, against peft and known model sizes."""

import json
from pathlib import Path

import pytest
import torch

from qlora_studio.config import LoraSettings, StudioConfig
from qlora_studio.estimate import (GIB, EstimateError, _llama_layout, _meta_shape, count_parameters,
                                   estimate_memory, hardware_problems, load_model_config, memory_advice, model_shape,
                                   unknown_targets)
from qlora_studio.models import Hardware

REPO = Path(__file__).resolve().parent.parent
LLAMA_7B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}
T4 = Hardware("cuda", "Tesla T4", bf16=False, fp16=True, memory_gb=14.7, gpu_count=1)
CPU = Hardware("cpu", "test cpu", bf16=False, fp16=False, memory_gb=8.0)


@pytest.fixture(scope="module")
def embedded_config(embedded_path):
    return json.loads((embedded_path / "config.json").read_text())


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj"], ["down_proj"]])
def test_trainable_params_of_the_embedded_model_equal_peft(embedded_config, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**embedded_config))
    peft_targets = "all-linear" if targets == ["all-linear"] else targets
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=peft_targets,
                                                  task_type="CAUSAL_LM"))
    trainable, total = peft_model.get_nb_trainable_parameters()
    counted = count_parameters(model_shape(embedded_config), LoraSettings(r=16, target_modules=targets))
    assert (counted.trainable, counted.total) == (trainable, total)
    if targets == ["all-linear"]:
        assert counted.trainable == 4_884_480  # 30 layers x 16 x (q,k,v,o,gate,up,down in+out)
        assert 3.4 < counted.percent < 3.6


def test_formula_layout_matches_a_model_built_on_the_meta_device(embedded_config):
    qwen2 = {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True}
    for cfg in (embedded_config, qwen2):
        formula, measured = _llama_layout(cfg), _meta_shape(cfg)
        assert formula.linears == measured.linears
        assert formula.total_params == measured.total_params
        assert formula.bias_params == measured.bias_params
    assert _llama_layout(embedded_config).total_params == 134_515_008  # SmolLM2-135M, tied embeddings
    assert _llama_layout(qwen2).bias_params == 3 * (256 + 128 + 128)  # Qwen2 biases q, k and v


def test_other_architectures_are_sized_on_the_meta_device():
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 50257}
    shape = model_shape(gpt2)
    assert shape.module_names() == ["c_attn", "c_proj", "c_fc"]
    # GPT-2's Conv1D layers: c_attn 64->192, attn c_proj 64->64, c_fc 64->256, mlp c_proj 256->64
    assert count_parameters(shape, LoraSettings(r=4, target_modules=["all-linear"])).trainable == \
        2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    with pytest.raises(EstimateError, match="model_type"):
        model_shape({"hidden_size": 8})


def test_7b_llama_figures():
    shape = model_shape(LLAMA_7B)
    assert 6.7e9 < shape.total_params < 6.8e9
    params = count_parameters(shape, LoraSettings(r=16, target_modules=["all-linear"]))
    assert params.trainable == 39_976_960  # ~40M: 32 x 16 x (4x(4096+4096) + 2x(4096+11008) + (11008+4096))
    t4 = StudioConfig.load(REPO / "presets" / "7b-t4-16gb.yaml")
    estimate = estimate_memory(shape, t4, T4)
    assert 3.5e9 < estimate.weights < 4.0e9  # nf4 + double quant, 16-bit embeddings and head
    assert estimate.compute_dtype == "fp16"
    assert estimate.fits and estimate.level == "ok", estimate.to_dict()
    assert estimate.optimizer == 2 * params.trainable  # paged 8-bit AdamW: two 1-byte moments


def test_7b_unquantized_fp16_does_not_fit_a_16gb_card_and_says_what_helps():
    config = StudioConfig.load(REPO / "presets" / "7b-t4-16gb.yaml").with_overrides(["quant.type=none"])
    estimate = estimate_memory(model_shape(LLAMA_7B), config, T4)
    assert estimate.weights > 12.5e9  # 6.7B x 2 bytes
    assert not estimate.fits and estimate.level == "too_big"
    assert any("quant.type=nf4" in tip for tip in memory_advice(estimate, config))


def test_activations_grow_with_batch_and_length_and_checkpointing_saves_them():
    shape = model_shape(LLAMA_7B)
    base = StudioConfig.load(REPO / "presets" / "7b-t4-16gb.yaml")

    def acts(*overrides):
        return estimate_memory(shape, base.with_overrides(list(overrides)), T4).activations

    assert acts("train.batch_size=4") == pytest.approx(2 * acts("train.batch_size=2"), rel=0.01)
    assert acts("data.max_length=2048") == pytest.approx(2 * acts("data.max_length=1024"), rel=0.01)
    without = acts("train.gradient_checkpointing=false")
    assert without > 5 * acts()
    estimate = estimate_memory(shape, base.with_overrides(["train.gradient_checkpointing=false"]), T4)
    assert not estimate.fits
    assert memory_advice(estimate, base.with_overrides(["train.gradient_checkpointing=false"]))[0] == \
        "turn on train.gradient_checkpointing"


def test_weight_bytes_by_quantization(embedded_config):
    shape = model_shape(embedded_config)
    config = StudioConfig().with_overrides(["quant.compute_dtype=fp32"])
    linear = shape.linear_params
    plain = (shape.embed_params + shape.other_params) * 4  # fp32 compute keeps the rest in fp32
    weights = {q: estimate_memory(shape, config.with_overrides([f"quant.type={q}"]), CPU).weights
               for q in ("none", "nf4")}
    assert weights["none"] == linear * 4 + plain
    assert weights["nf4"] == pytest.approx(linear * (0.5 + (1 + 4 / 256) / 64) + plain, abs=1)
    no_dq = estimate_memory(shape, config.with_overrides(["quant.double_quant=false"]), CPU).weights
    assert no_dq - weights["nf4"] == pytest.approx(linear * (4 / 64 - (1 + 4 / 256) / 64), abs=2)


def test_cpu_memory_is_the_budget_and_small_runs_fit(embedded_config):
    config = StudioConfig.load(REPO / "presets" / "quick-cpu.yaml")
    estimate = estimate_memory(model_shape(embedded_config), config, CPU)
    assert estimate.device == "cpu" and estimate.available == 8 * GIB
    assert estimate.fits and estimate.total < 5 * GIB
    tiny = Hardware("cpu", "tiny", False, False, memory_gb=1.0)
    assert not estimate_memory(model_shape(embedded_config), config, tiny).fits


def test_unknown_targets_and_hardware_rules(embedded_config):
    shape = model_shape(embedded_config)
    assert unknown_targets(shape, ["q_proj", "c_attn"]) == ["c_attn"]
    assert unknown_targets(shape, ["all-linear"]) == []
    fields = {e.field for e in hardware_problems(StudioConfig().with_overrides(
        ["quant.type=int8", "train.optimizer=paged_adamw_8bit", "quant.compute_dtype=fp16"]), CPU)}
    assert fields == {"quant.type", "train.optimizer", "quant.compute_dtype"}
    assert hardware_problems(StudioConfig().with_overrides(["quant.compute_dtype=bf16"]), T4)[0].field == \
        "quant.compute_dtype"
    assert hardware_problems(StudioConfig(), CPU) == []


def test_model_configs_come_from_folders_and_fail_clearly_offline(tmp_path, embedded_path, monkeypatch):
    assert load_model_config("embedded")["hidden_size"] == 576
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_7B))
    assert load_model_config(str(tmp_path))["num_hidden_layers"] == 32
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EstimateError, match="not in the local Hugging Face cache"):
        load_model_config("no-such-org/no-such-model-xyz")
    with pytest.raises(EstimateError, match="has no config.json"):
        load_model_config(str(tmp_path / "missing"))
