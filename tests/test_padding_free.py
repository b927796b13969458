"""Padding-free batches must train on exactly what separate rows would: same per-example loss."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from qlora_studio.config import DataConfig
from qlora_studio.data import prepare_training_data


def _labelled_rows(tokenizer, count):
    data = prepare_training_data(DataConfig(source="sample:persona", eval_fraction=0), tokenizer, seed=0,
                                 completion_only_loss=True)
    rows = [data.train[i] for i in range(count)]
    return [{"input_ids": r["input_ids"],
             "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])]} for r in rows]


def _loss_sums(logits, labels, bounds):
    per_token = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="none")
    return [per_token[start:end - 1].sum().item() for start, end in zip(bounds[:-1], bounds[1:])]


def test_padding_free_batch_gives_the_same_per_example_loss(embedded_path, embedded_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(embedded_path, dtype=torch.float32).eval()
    rows = _labelled_rows(embedded_tokenizer, 5)
    assert len({len(r["input_ids"]) for r in rows}) > 1  # varied lengths: padding would matter
    with torch.no_grad():
        alone = [_loss_sums(model(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).logits.float(),
                            torch.tensor([r["labels"]]), [0, len(r["input_ids"])])[0] for r in rows]
        batch = DataCollatorForLanguageModeling(pad_token_id=embedded_tokenizer.pad_token_id, padding_free=True)(rows)
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
        # As in training (TRL sets use_cache=False): with a cache, transformers skips packed-sequence masking.
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    bounds = [0]
    for r in rows:
        bounds.append(bounds[-1] + len(r["input_ids"]))
    packed = _loss_sums(logits.float(), batch["labels"], bounds)
    assert packed == pytest.approx(alone, rel=1e-4)


def test_fast_preset_trains_to_the_eval_loss_of_the_plain_recipe(tmp_path):
    """The quick preset's speed settings (padding-free batches, no gradient checkpointing, no LoRA
    dropout) against the same run without them, on the same rows, steps and held-out split."""
    from pathlib import Path

    from qlora_studio.config import StudioConfig
    from qlora_studio.runs import read_metrics
    from qlora_studio.train import run_training

    preset = Path(__file__).resolve().parent.parent / "presets" / "quick-cpu.yaml"
    fast = StudioConfig.load(preset).with_overrides([
        f"output_dir={tmp_path}", "run_name=fast", "train.max_steps=12", "train.batch_size=4",
        "train.eval_steps=12", "data.eval_fraction=0.1", "train.save_steps=100"])
    assert fast.train.padding_free and not fast.train.gradient_checkpointing and fast.lora.dropout == 0
    plain = fast.with_overrides(["run_name=plain", "train.padding_free=false", "train.gradient_checkpointing=true",
                                 "lora.dropout=0.05"])

    def final_eval_loss(config):
        rows, _ = read_metrics(run_training(config))
        return [r["eval_loss"] for r in rows if r["type"] == "eval" and r["step"] == 12][-1]

    fast_loss, plain_loss = final_eval_loss(fast), final_eval_loss(plain)
    assert fast_loss <= 1.02 * plain_loss, (fast_loss, plain_loss)
