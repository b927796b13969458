"""Rendering equals apply_chat_template, and the masking shown equals the labels SFTTrainer trains on."""

from __future__ import annotations

import pytest

from qlora_studio.config import DataConfig
from qlora_studio.data import Example, histogram, inspect_data, prepare_training_data, preview_rows, render_example
from qlora_studio.templates import TEMPLATE_LABELS, render_chat, template_source

CONVERSATION = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris, matey."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid, arr."},
]


def chat(messages=CONVERSATION):
    return Example("chat", [dict(m) for m in messages], [m["role"] == "assistant" for m in messages])


def trained_text(tokenizer, rendered) -> str:
    return tokenizer.decode([t for t, m in zip(rendered.input_ids, rendered.mask) if m])


@pytest.mark.parametrize("template", list(TEMPLATE_LABELS))
def test_rendering_equals_apply_chat_template(embedded_tokenizer, template):
    rendered = render_example(chat(), embedded_tokenizer, template)
    expected_ids = embedded_tokenizer.apply_chat_template(
        CONVERSATION, chat_template=template_source(embedded_tokenizer, template), tokenize=True)["input_ids"]
    assert rendered.input_ids == list(expected_ids)
    assert rendered.text == render_chat(embedded_tokenizer, CONVERSATION, template)
    assert "".join(text for text, _ in rendered.segments()) == rendered.text
    trained = trained_text(embedded_tokenizer, rendered)
    assert "Paris, matey." in trained and "Madrid, arr." in trained
    assert "Capital of France" not in trained and "pirate" not in trained and "Spain" not in trained


def test_chatml_mask_is_exactly_the_assistant_turns_with_their_end_token(embedded_tokenizer):
    rendered = render_example(chat(), embedded_tokenizer, "model")
    pieces = [text for text, trained in rendered.segments() if trained]
    assert pieces == ["Paris, matey.<|im_end|>", "Madrid, arr.<|im_end|>"]


def test_model_template_default_system_prompt_is_rendered_and_masked(embedded_tokenizer):
    rendered = render_example(chat(CONVERSATION[1:3]), embedded_tokenizer, "model")
    assert rendered.text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert [t for t, f in rendered.segments() if f] == ["Paris, matey.<|im_end|>"]


def test_full_loss_and_plain_text_train_every_token(embedded_tokenizer):
    rendered = render_example(chat(), embedded_tokenizer, "model", completion_only_loss=False)
    assert rendered.mask == [1] * len(rendered.input_ids)
    text = render_example(Example("text", text="A: hi\nB: hello"), embedded_tokenizer)
    assert text.mask == [1] * len(text.input_ids)
    assert text.input_ids[-1] == embedded_tokenizer.eos_token_id and text.text.endswith(embedded_tokenizer.eos_token)


def test_preview_shows_rows_in_order_with_bad_rows_inline(tmp_path, embedded_tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Q1", "completion": "A1"}\n{"prompt": "Q2"}\n{"prompt": "Q3", "completion": "A3"}\n')
    rows = preview_rows(DataConfig(source=str(path)), embedded_tokenizer, start=1, count=5)
    assert [r.row for r in rows] == [2, 3]
    assert rows[0].error == "line 2: missing column 'completion'"
    assert [t for t, f in rows[1].segments if f] == ["A3<|im_end|>"] and rows[1].n_trained == 3


def test_histogram_counts_and_cutoff():
    lengths = [10, 20, 20, 30, 90, 120, 130]
    h = histogram(lengths, max_length=100, bins=13)
    assert sum(h["counts"]) == len(lengths) and h["total"] == 7
    assert h["over_max"] == 2 and h["max_length"] == 100
    assert h["edges"][0] == 0 and h["edges"][-1] == 130 and len(h["edges"]) == 14
    assert h["counts"][2] == 2  # the two rows of 20 tokens share the [20, 30) bin
    short = histogram([5, 6], max_length=512, bins=8)
    assert short["edges"][-1] == 512 and short["over_max"] == 0  # the cutoff is always on the chart


def test_inspection_token_stats_match_the_prepared_data(embedded_tokenizer):
    result = inspect_data(DataConfig(source="sample:persona", max_length=60), embedded_tokenizer)
    prepared = prepare_training_data(DataConfig(source="sample:persona", max_length=60, eval_fraction=0),
                                     embedded_tokenizer, seed=0, completion_only_loss=True)
    lengths = [len(ids) for ids in prepared.train["input_ids"]]
    assert sorted(result.lengths) == sorted(lengths)
    assert result.stats["truncated"] == prepared.report.truncated == sum(n > 60 for n in lengths) > 0
    assert result.stats["max"] == max(lengths) and result.stats["sampled"] is False


def _tiny_trainer(tokenizer, dataset, max_length, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    args = SFTConfig(output_dir=str(tmp_path), max_length=max_length, per_device_train_batch_size=4, report_to="none",
                     use_cpu=True, bf16=False, dataset_num_proc=None, completion_only_loss=True)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def test_masking_shown_equals_the_labels_sfttrainer_trains_on(tmp_path, embedded_tokenizer):
    max_length = 64
    data = DataConfig(source="sample:persona", max_length=max_length, eval_fraction=0)
    prepared = prepare_training_data(data, embedded_tokenizer, seed=0, completion_only_loss=True)
    previews = preview_rows(data, embedded_tokenizer, start=0, count=prepared.train.num_rows)
    trainer = _tiny_trainer(embedded_tokenizer, prepared.train, max_length, tmp_path)
    trained_rows = trainer.train_dataset
    assert trained_rows.num_rows == prepared.train.num_rows == len(previews)
    truncated = 0
    for i, preview in enumerate(previews):
        ids = prepared.train[i]["input_ids"]
        mask = prepared.train[i]["assistant_masks"]
        # What the Dataset tab shows: token by token, the segments' trained flags.
        assert len(ids) == preview.n_tokens and "".join(t for t, _ in preview.segments) == embedded_tokenizer.decode(ids)
        expected = [t if m else -100 for t, m in zip(ids, mask)][:max_length]
        assert trained_rows[i]["input_ids"] == ids[:max_length]
        assert trained_rows[i]["labels"] == expected, f"row {i}"
        assert preview.n_trained == sum(label != -100 for label in expected)
        truncated += len(ids) > max_length
    assert truncated > 0  # the comparison covered rows the trainer truncated

    batch = trainer.data_collator([trained_rows[i] for i in range(4)])
    for i in range(4):
        ids = prepared.train[i]["input_ids"][:max_length]
        mask = prepared.train[i]["assistant_masks"][:max_length]
        labels = batch["labels"][i].tolist()
        assert labels[: len(ids)] == [t if m else -100 for t, m in zip(ids, mask)]
        assert all(label == -100 for label in labels[len(ids):])  # padding never trains
        decoded = embedded_tokenizer.decode([t for t in labels if t != -100])
        assert decoded.endswith("Fair winds, matey!<|im_end|>") or len(prepared.train[i]["input_ids"]) > max_length
