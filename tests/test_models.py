import json

import pytest

from qlora_studio.config import QuantConfig
from qlora_studio.models import (ModelError, detect_hardware, load_base_model, quantization_config,
                                 resolve_compute_dtype, resolve_model)


def test_embedded_model_is_a_plain_reusable_checkpoint(embedded_path):
    config = json.loads((embedded_path / "config.json").read_text())
    # A leftover GGUF quantization_config would make bitsandbytes loading fail later.
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (embedded_path / "model.safetensors").exists()
    assert (embedded_path / "tokenizer.json").exists()
    resolved = resolve_model("embedded")
    assert resolved.path == str(embedded_path)
    assert resolved.display_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # The name written into adapter configs resolves back to the same local copy.
    assert resolve_model(resolved.display_name).path == str(embedded_path)


def test_embedded_model_loads_in_real_4bit(embedded_path):
    import bitsandbytes as bnb
    import torch

    hw = detect_hardware()
    dtype = resolve_compute_dtype("auto", hw)
    model = load_base_model(str(embedded_path), QuantConfig(type="nf4", double_quant=True), dtype, hw)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert model.get_memory_footprint() < 200e6  # ~540 MB in fp32
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_quantization_configs():
    four = quantization_config(QuantConfig(type="fp4", double_quant=False), "fp16")
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "fp4" and not four.bnb_4bit_use_double_quant
    eight = quantization_config(QuantConfig(type="int8"), "bf16")
    assert eight.load_in_8bit
    assert quantization_config(QuantConfig(type="none"), "bf16") is None


def test_folder_without_config_json_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_model_without_causal_lm_head_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="without a causal language-model head"):
        resolve_model(str(tmp_path))


def test_hub_id_offline_and_not_cached_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        resolve_model("nobody-here/not-a-cached-model")


def test_nonsense_name_is_refused():
    with pytest.raises(ModelError, match="neither 'embedded', an existing folder, nor a Hub id"):
        resolve_model("just some words")
