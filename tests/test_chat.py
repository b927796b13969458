"""Side-by-side chat on the real embedded model: the base column is the true base model, the
adapted column shows what training taught, both stream, and every side sees the right prompt."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from qlora_studio.chat import (CHAT_TEMPLATES, ChatError, GenerationSettings, ModelPool, PoolBusy, batch_compare,
                               build_messages, compare, eval_split_prompts, render_prompt, resolve_adapter,
                               stream_compare, write_csv)
from qlora_studio.chat_engine import Generation
from qlora_studio.config import StudioConfig
from qlora_studio.models import EMBEDDED_DISPLAY
from qlora_studio.templates import template_source

SIGN_OFF = "Fair winds, matey!"
GREEDY = GenerationSettings(greedy=True, max_new_tokens=24)


# -- helpers shared with test_chat_tab.py -------------------------------------------------

def make_adapter(root: Path, embedded_path: Path, *, dora: bool = False, template: str = "model",
                 system: str = "", base_name: str = EMBEDDED_DISPLAY) -> Path:
    """A run folder with a real (random, non-zero) LoRA adapter on the unquantized embedded model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_path, dtype=torch.float32)
    torch.manual_seed(0)
    # init_lora_weights=False gives B != 0, so the adapter really changes the answers.
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False, use_dora=dora, task_type="CAUSAL_LM"))
    return save_run(root, peft_model, quant="none", template=template, system=system, base_name=base_name)


def save_run(root: Path, peft_model, *, quant: str, template: str = "model", system: str = "",
             base_name: str = EMBEDDED_DISPLAY, model_name: str = "embedded") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(root / "adapter")
    config_path = root / "adapter" / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base_name  # what the trainer records
    config_path.write_text(json.dumps(adapter_config))
    StudioConfig().with_overrides([f"model.name={model_name}", f"quant.type={quant}", f"data.template={template}",
                                   f"data.system_prompt={system}"]).save(root / "config.yaml")
    (root / "status.json").write_text(json.dumps({"state": "completed", "step": 1, "max_steps": 1}))
    return root


def last(steps):
    step = None
    for step in steps:
        pass
    return step


# Logit gap between the top two tokens below which a batched and a one-row run may pick differently:
# bitsandbytes' CPU 4-bit kernels round differently by batch shape (~0.04 logits flipped a greedy
# pick in fp32). A wrong row, adapter or mask moves logits by far more and fails at a clear pick.
NEAR_TIE = 0.25


def assert_greedy_answer(text: str, model, tokenizer, prompt: str, max_new_tokens: int) -> None:
    """`text` is what the model answers on its own (one row, no padding, no PEFT batch machinery),
    token for token up to the first near-tie of its own greedy run."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    tokens = out.sequences[0, ids["input_ids"].shape[1]:].tolist()
    alone = tokenizer.decode(tokens, skip_special_tokens=True)
    if text == alone:
        return
    for k, scores in enumerate(out.scores):
        if not text.startswith(tokenizer.decode(tokens[:k + 1], skip_special_tokens=True)):
            top = torch.topk(scores[0].float(), 2).values
            gap = (top[0] - top[1]).item()
            assert gap < NEAR_TIE, f"differs at token {k} where the one-row pick is clear (gap {gap:.3f}):\n" \
                                   f"{text!r}\n{alone!r}"
            return
    raise AssertionError(f"{text!r} continues past the one-row answer {alone!r}")


def fresh_base(info, pool):
    """The base model loaded anew, exactly as the pool loads it, but never wrapped by PEFT."""
    from qlora_studio.models import detect_hardware, load_base_model, resolve_model

    pair = pool.loaded
    model = load_base_model(resolve_model(info.base_model).path, pair.info.quant, pair.dtype, detect_hardware())
    return model.eval()


# -- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool(trained_run):
    # Chat in fp32 even on a bf16 CPU: these tests compare answers token for token across batch
    # shapes, and bf16 rounds a padded batch differently from a single row (near-ties flip).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("QLORA_STUDIO_CPU_BF16", "0")
        yield ModelPool(device="cpu")


@pytest.fixture(scope="module")
def run_info(trained_run):
    return resolve_adapter(trained_run)


@pytest.fixture(scope="module")
def first_turn(pool, run_info):
    """One greedy turn on the trained persona run, every streamed step kept."""
    messages = build_messages([], "What is the capital of Italy?", "")
    steps = list(stream_compare(pool, run_info, messages, messages, run_info.template,
                                GenerationSettings(greedy=True, max_new_tokens=40)))
    return messages, steps


# -- the base column is the base model ------------------------------------------------------

def test_base_column_equals_a_freshly_loaded_base_model(pool, run_info, first_turn):
    messages, steps = first_turn
    final = steps[-1]
    assert final.done and final.stats["mode"] == "mixed-batch"  # one batched generate for both sides
    fresh = fresh_base(run_info, pool)
    assert_greedy_answer(final.base, fresh, pool.loaded.tokenizer, final.base_prompt, 40)
    assert final.base.strip()

    # Second turn: each side continues its own history, so the prompts differ in length and the
    # batch is left-padded; the base column must still be what the base alone would say.
    base_history = [messages[-1], {"role": "assistant", "content": final.base}]
    adapted_history = [messages[-1], {"role": "assistant", "content": final.adapted}]
    second = last(stream_compare(pool, run_info, build_messages(base_history, "And of Spain?"),
                                 build_messages(adapted_history, "And of Spain?"), run_info.template, GREEDY))
    assert final.adapted in second.adapted_prompt and final.adapted not in second.base_prompt
    assert_greedy_answer(second.base, fresh, pool.loaded.tokenizer, second.base_prompt, 24)
    # ...and the padded adapted row is what the adapter gives one row at a time.
    assert_greedy_answer(second.adapted, pool.loaded.model, pool.loaded.tokenizer, second.adapted_prompt, 24)


def test_after_training_the_adapted_column_shows_the_persona(first_turn):
    _, steps = first_turn
    final = steps[-1]
    assert final.adapted != final.base
    assert SIGN_OFF in final.adapted, final.adapted
    assert SIGN_OFF not in final.base, final.base


def test_both_sides_stream_growing_text(first_turn):
    _, steps = first_turn
    updates = [s for s in steps if not s.status.startswith("Loading")]
    both = [s for s in updates if s.base and s.adapted]
    assert len(both) >= 5, "expected many partial updates with text on both sides"
    for side in ("base", "adapted"):
        texts = [getattr(s, side) for s in updates]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), f"{side} text must only grow"
        assert len(set(texts)) >= 5
    assert [s.done for s in updates].count(True) == 1 and updates[-1].done
    assert updates[-1].stats["ttft_base_s"] is not None and updates[-1].stats["ttft_adapted_s"] is not None


def test_prompts_each_side_receives_equal_apply_chat_template(pool, run_info, first_turn):
    messages, steps = first_turn
    tokenizer = pool.loaded.tokenizer
    # The model's own template, exactly as transformers renders it, is what both sides got...
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert steps[-1].base_prompt == steps[-1].adapted_prompt == expected
    # ...and tokenized without extra special tokens, as apply_chat_template(tokenize=True) would.
    generation = Generation(pool.loaded, [expected], [0], GREEDY, threading.Event())
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert generation.batch["input_ids"][0].tolist() == list(ids)

    with_system = build_messages([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"}],
                                 "Who are you?", "You are terse.")
    for name in CHAT_TEMPLATES:
        rendered = render_prompt(tokenizer, with_system, name)
        if name == "plain":
            assert rendered == "You are terse.\n\nHi\n\nAhoy\n\nWho are you?"
            continue
        assert rendered == tokenizer.apply_chat_template(with_system, chat_template=template_source(tokenizer, name),
                                                         tokenize=False, add_generation_prompt=True)
    assert "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST]" in render_prompt(tokenizer, with_system, "llama2")
    assert render_prompt(tokenizer, with_system, "alpaca").endswith("### Instruction:\nWho are you?\n\n### Response:\n")
    with pytest.raises(ChatError, match="template 'vicuna'"):
        render_prompt(tokenizer, with_system, "vicuna")


# -- stop, busy, batch, eval split ---------------------------------------------------------

def test_stop_ends_both_sides_and_frees_the_model(pool, run_info):
    messages = build_messages([], "Tell me a long story about the sea.", "")
    settings = GenerationSettings(max_new_tokens=300, min_new_tokens=300, seed=3)
    steps = []
    for step in stream_compare(pool, run_info, messages, messages, "model", settings, owner="me"):
        steps.append(step)
        if len(steps) == 3:
            assert not pool.stop("someone-else")  # another session cannot stop my answer
            assert pool.stop("me")
    final = steps[-1]
    assert final.done and final.stats["stopped"] and final.status == "Stopped."
    assert 0 < final.stats["base_tokens"] < 300 and 0 < final.stats["adapted_tokens"] < 300
    pool.acquire(wait_s=5)  # released by the generation thread
    pool.release()

    # A consumer that goes away mid-answer (closed tab, cancelled event) never keeps the model:
    # a chat generator that is closed stops its generation; a batch holds the pool only per batch.
    chat = stream_compare(pool, run_info, messages, messages, "model", settings)
    next(chat)
    chat.close()
    batch = batch_compare(pool, run_info, ["Hi", "Ahoy"], settings=GenerationSettings(greedy=True, max_new_tokens=4),
                          batch_size=1, wait_s=10)  # the closed chat's thread may still be finishing its step
    assert len(next(batch)) == 1  # left suspended, never closed
    pool.acquire(wait_s=10)
    pool.release()


def test_a_second_session_gets_a_busy_message(pool, run_info):
    messages = build_messages([], "Hi", "")
    pool.acquire(owner="other")
    try:
        with pytest.raises(PoolBusy, match="busy"):
            next(stream_compare(pool, run_info, messages, messages, "model", GREEDY, owner="me"))
    finally:
        pool.release()


def test_batch_compare_pasted_prompts_and_eval_split_to_csv(pool, run_info, tmp_path):
    settings = GenerationSettings(greedy=True, max_new_tokens=12)
    progress = list(batch_compare(pool, run_info, ["What is 2+2?", "  ", "Name a color.", "What is H2O?"],
                                  settings=settings, batch_size=2))
    assert [len(rows) for rows in progress] == [2, 3]  # blank lines skipped; yielded per batch
    rows = progress[-1]
    assert [r["prompt"] for r in rows] == ["What is 2+2?", "Name a color.", "What is H2O?"]
    single = compare(pool, run_info, "Name a color.", settings=settings)
    assert (rows[1]["base"], rows[1]["adapted"]) == (single.base, single.adapted)  # batching changes nothing

    prompts, references = eval_split_prompts(run_info)
    assert prompts and len(prompts) == len(references)
    assert prompts[0].startswith("<|im_start|>") and prompts[0].endswith("<|im_start|>assistant\n")
    assert all(ref.endswith(SIGN_OFF) for ref in references)
    eval_rows = last(batch_compare(pool, run_info, prompts[:2], references=references[:2], prerendered=True,
                                   settings=GenerationSettings(greedy=True, max_new_tokens=40)))
    assert any(SIGN_OFF in r["adapted"] for r in eval_rows)
    assert all(r["reference"] == ref for r, ref in zip(eval_rows, references))

    path = write_csv(rows + eval_rows, tmp_path / "compare.csv")
    import csv
    with open(path, newline="", encoding="utf-8") as handle:
        read = list(csv.DictReader(handle))
    assert list(read[0]) == ["prompt", "base", "adapted", "reference"]
    assert read[1]["adapted"] == rows[1]["adapted"] and read[3]["reference"] == references[0]


# -- adapter sources -----------------------------------------------------------------------

def test_adapter_sources_run_folder_adapter_folder_and_zip(trained_run, tmp_path):
    run = resolve_adapter(trained_run)
    config = StudioConfig.load(trained_run)
    assert run.adapter_path == str(trained_run / "adapter") and run.run_dir == str(trained_run)
    assert run.base_model == "embedded" and run.base_display == EMBEDDED_DISPLAY
    assert (run.template, run.system_prompt, run.quant.type) == (config.data.template, config.data.system_prompt,
                                                                 "nf4")
    inner = resolve_adapter(trained_run / "adapter")  # the adapter folder of a run still knows its run
    assert inner.run_dir == str(trained_run) and inner.template == run.template

    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in (trained_run / "adapter").iterdir():
            z.write(f, f"my-adapter/{f.name}")
    zipped = resolve_adapter(archive)
    assert zipped.recorded_base == EMBEDDED_DISPLAY and zipped.base_model == EMBEDDED_DISPLAY
    assert (Path(zipped.adapter_path) / "adapter_model.safetensors").read_bytes() == \
        (trained_run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert zipped.template == "model" and zipped.config is None


def test_unusable_sources_get_clear_messages(tmp_path, trained_run):
    started = time.monotonic()
    with pytest.raises(ChatError, match="HF_HUB_OFFLINE"):
        resolve_adapter("someone/pirate-adapter")  # tests run offline: must fail fast, never hang
    assert time.monotonic() - started < 10
    running = tmp_path / "running-run"
    running.mkdir()
    shutil.copy(trained_run / "config.yaml", running / "config.yaml")
    (running / "status.json").write_text(json.dumps({"state": "running", "step": 3, "max_steps": 40}))
    with pytest.raises(ChatError, match="has no adapter yet"):
        resolve_adapter(running)
    (tmp_path / "notes").mkdir()
    with pytest.raises(ChatError, match="adapter_config.json"):
        resolve_adapter(tmp_path / "notes")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ChatError, match="not a .zip"):
        resolve_adapter(tmp_path / "x.txt")
    with pytest.raises(ChatError, match="Choose an adapter"):
        resolve_adapter("  ")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../escape/adapter_config.json", "{}")
    with pytest.raises(ChatError, match="outside the archive"):
        resolve_adapter(evil)


def test_base_mismatch_is_reported_with_both_names(tmp_path, embedded_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    # An adapter trained on a different (tiny) Llama, but claiming the embedded model as its base.
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    peft_model = get_peft_model(tiny, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    save_run(tmp_path / "tiny", peft_model, quant="none", base_name="my-org/tiny-llama")

    # In a run folder whose config names another base than the adapter does: refused up front.
    with pytest.raises(ChatError, match="my-org/tiny-llama .*configured with embedded"):
        resolve_adapter(tmp_path / "tiny")

    # Alone, run on a base it was not trained on: a note when picked, a clear error when loaded.
    shutil.copytree(tmp_path / "tiny" / "adapter", tmp_path / "bare")
    info = resolve_adapter(tmp_path / "bare", base="embedded")
    assert any("trained on my-org/tiny-llama" in note for note in info.notes)
    messages = build_messages([], "Hi")
    with pytest.raises(ChatError, match=r"does not fit the base model embedded: it was trained on my-org/tiny-llama"):
        last(stream_compare(ModelPool(device="cpu"), info, messages, messages, "model", GREEDY))


def test_dora_adapters_fall_back_to_base_then_adapted_and_stay_true(tmp_path, embedded_path):
    info = resolve_adapter(make_adapter(tmp_path / "dora", embedded_path, dora=True))
    pool = ModelPool(device="cpu")
    messages = build_messages([], "What is the capital of France?")
    steps = list(stream_compare(pool, info, messages, messages, "model", GREEDY))
    final = steps[-1]
    assert not pool.loaded.mixed_batch and final.stats["mode"] == "sequential"
    assert_greedy_answer(final.base, fresh_base(info, pool), pool.loaded.tokenizer, final.base_prompt, 24)
    assert final.adapted != final.base
    # Sequential mode still streams: the base side grows first, then the adapted side.
    assert any(s.base and not s.adapted for s in steps) and any(s.adapted and s.adapted != final.adapted for s in steps)

    # Had the mixed batch been tried, PEFT's refusal must turn into the fallback, not a broken model
    # (PEFT leaves its adapter_names hooks behind when generate raises).
    pool.loaded.mixed_batch = True
    again = last(stream_compare(pool, info, messages, messages, "model", GREEDY))
    assert again.stats["mode"] == "sequential" and (again.base, again.adapted) == (final.base, final.adapted)
    assert any("mixed-adapter batches unavailable" in note for note in pool.loaded.notes)


def test_a_new_adapter_on_the_same_base_reuses_the_loaded_base(tmp_path, embedded_path):
    pool = ModelPool(device="cpu")
    first = resolve_adapter(make_adapter(tmp_path / "a", embedded_path))
    messages = build_messages([], "Hi")
    one = last(stream_compare(pool, first, messages, messages, "model", GREEDY))
    model = pool.loaded.model
    second = resolve_adapter(make_adapter(tmp_path / "b", embedded_path, dora=True))
    two = last(stream_compare(pool, second, messages, messages, "model", GREEDY))
    assert pool.loaded.model is model and list(model.peft_config) == [pool.loaded.adapter_name]
    assert two.base == one.base  # still the same base model underneath

    # A run that saves a newer adapter (resumed, trained more) is picked up on the next message.
    assert not pool.needs_load(second)
    weights = Path(second.adapter_path) / "adapter_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert pool.needs_load(second)


def test_generation_settings_name_the_bad_field():
    with pytest.raises(ChatError, match="max_new_tokens must be between 1 and 4096, got 0"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ChatError, match="top_p"):
        GenerationSettings(top_p=1.5)
    with pytest.raises(ChatError, match="greedy"):
        GenerationSettings(temperature=0)
    assert GenerationSettings(greedy=True).generate_kwargs()["do_sample"] is False
    assert GenerationSettings(temperature=0.3, top_k=5).generate_kwargs() == {
        "max_new_tokens": 256, "repetition_penalty": 1.0, "do_sample": True, "temperature": 0.3, "top_p": 0.9,
        "top_k": 5}


# -- CLI and layering ----------------------------------------------------------------------

def test_cli_prints_both_answers_as_json(tmp_path, embedded_path, capsys):
    from qlora_studio.cli import main

    run = make_adapter(tmp_path / "run", embedded_path, template="zephyr", system="Be brief.")
    code = main(["chat", str(run), "--prompt", "What is the capital of Italy?", "--greedy", "--max-new-tokens", "12",
                 "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["base"] and out["adapted"] and out["base"] != out["adapted"]
    # The run's template and system prompt are used unless the command line says otherwise.
    assert out["template"] == "zephyr" and out["prompts"]["base"].startswith("<|system|>\nBe brief.")
    assert out["base_model"] == EMBEDDED_DISPLAY and out["stats"]["mode"] == "mixed-batch"

    assert main(["chat", str(run), "--prompt", "Hi", "--system", "", "--template", "plain", "--greedy",
                 "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"=== base ({EMBEDDED_DISPLAY}) ===\n") and "\n=== adapted (run) ===\n" in text

    assert main(["chat", str(run), "--prompt", "Hi", "--max-new-tokens", "0"]) == 2
    assert "max_new_tokens must be between 1 and 4096" in capsys.readouterr().err
    assert main(["chat", str(tmp_path / "nope"), "--prompt", "Hi"]) == 2
    assert "neither an existing run/adapter folder" in capsys.readouterr().err


def test_chat_core_does_not_import_gradio():
    code = ("import sys, qlora_studio.chat, qlora_studio.cli.chat; "
            "sys.exit(1 if 'gradio' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
