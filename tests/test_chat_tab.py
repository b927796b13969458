"""Chat tab handlers, called as the UI calls them: pick, stream, stop, clear, batch compare."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from qlora_studio.chat import ModelPool, render_prompt, build_messages
from qlora_studio.models import EMBEDDED_DISPLAY
from qlora_studio.ui import chat_tab
from test_chat import make_adapter

FAST = {"max_new_tokens": 16, "greedy": True}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, embedded_path) -> Path:
    return make_adapter(tmp_path_factory.mktemp("runs") / "pirate-run", embedded_path, template="chatml",
                        system="You are terse.")


@pytest.fixture(scope="module")
def pool(run_dir):
    # fp32 chat even on a bf16 CPU, as in test_chat.py: answers are compared token for token.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("QLORA_STUDIO_CPU_BF16", "0")
        yield ModelPool(device="cpu")


def test_picking_an_adapter_preselects_its_template_and_system_prompt(run_dir, tmp_path):
    source, summary, template, system = chat_tab.choose_adapter(str(run_dir))
    assert source == str(run_dir) and (template, system) == ("chatml", "You are terse.")
    assert "pirate-run" in summary and EMBEDDED_DISPLAY in summary and "ChatML" in summary

    source, summary, template, system = chat_tab.choose_adapter(str(tmp_path / "missing"))
    assert source == "" and "neither an existing run" in summary
    assert template == gr.update() and system == gr.update()  # the previous choices stay
    # In demo mode only the app's own folders may be read.
    source, summary, _, _ = chat_tab.choose_adapter(str(run_dir), allowed_roots=[tmp_path])
    assert source == "" and "outside the folders" in summary
    assert chat_tab.choose_adapter(str(run_dir), allowed_roots=[run_dir.parent])[0] == str(run_dir)


def test_send_streams_both_sides_and_keeps_each_sides_history(pool, run_dir):
    outputs = list(chat_tab.send(pool, str(run_dir), None, "What is the capital of France?", "You are terse.",
                                 "chatml", **FAST))
    state, base_chat, adapted_chat, base_raw, adapted_raw, status, box = outputs[-1]
    assert box == "" and status.startswith("Done.") and "First token" in status
    growing = [o for o in outputs if o[1][-1]["content"] and o[2][-1]["content"]]
    assert len(growing) >= 4
    for index in (1, 2):
        texts = [o[index][-1]["content"] for o in growing]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:])) and len(set(texts)) >= 4
    assert [m["role"] for m in base_chat] == [m["role"] for m in adapted_chat] == ["user", "assistant"]
    assert base_chat[1]["content"] != adapted_chat[1]["content"]  # the adapter changes the answer
    tokenizer = pool.loaded.tokenizer
    messages = build_messages([], "What is the capital of France?", "You are terse.")
    assert base_raw == adapted_raw == render_prompt(tokenizer, messages, "chatml")
    assert base_raw.startswith("<|im_start|>system\nYou are terse.<|im_end|>")

    # Second turn: each side is reminded of its own answer, never of the other side's.
    outputs = list(chat_tab.send(pool, str(run_dir), state, "Are you sure?", "You are terse.", "chatml", **FAST))
    state2, base_chat2, adapted_chat2, base_raw2, adapted_raw2, _, _ = outputs[-1]
    assert len(base_chat2) == len(adapted_chat2) == 4 and state2["owner"] == state["owner"]
    assert base_chat[1]["content"] in base_raw2 and adapted_chat[1]["content"] not in base_raw2
    assert adapted_chat[1]["content"] in adapted_raw2 and base_chat[1]["content"] not in adapted_raw2

    cleared = chat_tab.clear(state2)
    assert cleared[0]["base"] == cleared[0]["adapted"] == [] and cleared[1:5] == ([], [], "", "")
    assert cleared[0]["owner"] == state2["owner"]


def test_stop_ends_both_answers_and_keeps_what_was_written(pool, run_dir):
    state = chat_tab.new_state()
    assert chat_tab.stop(pool, state) == "Nothing is running."
    outputs = []
    for out in chat_tab.send(pool, str(run_dir), state, "Tell me a story.", "", "chatml", max_new_tokens=400,
                             temperature=0.9, seed=1):
        outputs.append(out)
        if len(outputs) == 3:
            assert chat_tab.stop(pool, chat_tab.new_state()) == "Nothing is running."  # not another session's
            assert chat_tab.stop(pool, state) == "Stopping…"
    final_state, base_chat, adapted_chat, *_ , status, _ = outputs[-1]
    assert status.startswith("Stopped.")
    assert base_chat[-1]["content"] and adapted_chat[-1]["content"]
    assert final_state["base"] == base_chat  # the partial answers stay in the conversation
    assert pool.loaded.tokenizer.encode(base_chat[-1]["content"]).__len__() < 400


def test_busy_model_and_missing_input_get_a_message(pool, run_dir):
    pool.acquire(owner="someone-else")
    try:
        state, base_chat, _, _, _, status, box = list(chat_tab.send(pool, str(run_dir), None, "Hi", "", "chatml",
                                                                    **FAST))[-1]
    finally:
        pool.release()
    assert "busy" in status and box == "Hi" and base_chat == []  # the message stays to be sent again
    assert "Type a message" in list(chat_tab.send(pool, str(run_dir), None, "  ", "", "chatml"))[0][5]
    assert "Pick an adapter" in list(chat_tab.send(pool, "", None, "Hi", "", "chatml"))[0][5]
    status = list(chat_tab.send(pool, str(run_dir), None, "Hi", "", "chatml", max_new_tokens=0))[0][5]
    assert "max_new_tokens must be between 1 and 4096" in status


def test_batch_compare_table_and_csv(pool, run_dir):
    outputs = list(chat_tab.run_batch(pool, str(run_dir), None, "What is 2+2?\n\nName a color.\nHi", "Pasted prompts",
                                      "", "chatml", batch_size=2, **FAST))
    table, path, status = outputs[-1]
    assert list(table.columns) == ["prompt", "base", "adapted"] and len(table) == 3
    assert "3 of 3" in status and any(o[2].startswith("2 of 3") for o in outputs)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["prompt"] for r in rows] == ["What is 2+2?", "Name a color.", "Hi"]
    assert rows[0]["base"] == table.iloc[0]["base"]

    table, path, status = list(chat_tab.run_batch(pool, str(run_dir), None, "", "The run's eval split", "", "chatml",
                                                  max_new_tokens=4, greedy=True, batch_size=8))[-1]
    assert "reference" in table.columns and len(table) >= 2 and table["reference"].str.endswith("Fair winds, matey!").all()
    empty = list(chat_tab.run_batch(pool, str(run_dir), None, "  \n", "Pasted prompts", "", "chatml"))[-1]
    assert "No prompts" in empty[2]


def test_build_tab_lays_out_the_side_by_side_chat(run_dir, pool):
    ctx = SimpleNamespace(model_pool=pool, runs_root=run_dir.parent,
                          settings=SimpleNamespace(demo=False, uploads_dir=run_dir.parent / "uploads"))
    with gr.Blocks() as demo:
        session = SimpleNamespace(run=gr.State(None), data=gr.State(None))
        chat_tab.build_tab(ctx, session)
    chatbots = [b for b in demo.blocks.values() if isinstance(b, gr.Chatbot)]
    assert [c.label for c in chatbots] == ["Base (adapter off)", "Adapted (adapter on)"]
    dropdowns = {b.label: b for b in demo.blocks.values() if isinstance(b, gr.Dropdown)}
    assert [c[1] for c in dropdowns["Run"].choices] == [str(run_dir)]
    assert "plain" in [c[1] for c in dropdowns["Chat template"].choices]
