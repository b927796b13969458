"""Export tab handlers, called directly (no browser), on a tiny run folder built for the test."""

from __future__ import annotations

import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from qlora_studio.ui import export_tab as tab
from test_export_hub import GOOD, FakeHub
from test_export_safety import make_tiny_run


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, embedded_path) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_tiny_run(root, embedded_path, name="pirate")
    make_tiny_run(root, embedded_path, name="busy", state="running")
    return root


def test_run_choices_list_runs_with_adapters_and_the_session_pick(runs_root, tmp_path):
    choices = dict((v, label) for label, v in tab.run_choices(runs_root))
    assert str(runs_root / "pirate") in choices and "completed" in choices[str(runs_root / "pirate")]
    assert "loss 2.000" in choices[str(runs_root / "pirate")]
    assert "running" in choices[str(runs_root / "busy")]  # listed, so picking it explains why it cannot export
    elsewhere = tmp_path / "imported-adapter"
    elsewhere.mkdir()
    assert tab.run_choices(runs_root, str(elsewhere))[0] == ("imported-adapter (selected)", str(elsewhere))


def test_describe_run(runs_root):
    text = tab.describe_run(str(runs_root / "pirate"))
    assert "pirate" in text and "tiny-llama" in text and "train loss 2.0000" in text and "eval loss 2.4000" in text
    assert tab.describe_run(None) == "No run selected."
    assert "Cannot export" in tab.describe_run(str(runs_root / "nope"))


def test_build_adapter_zip_gives_a_downloadable_bundle_and_the_card(runs_root):
    zip_path, card, status = tab.build_adapter_zip(str(runs_root / "pirate"), runs_root)
    assert zip_path and Path(zip_path).is_relative_to(runs_root)  # served: the runs root is an allowed path
    names = zipfile.ZipFile(zip_path).namelist()
    for required in ("adapter_model.safetensors", "adapter_config.json", "config.yaml", "metrics.jsonl",
                     "loss_curve.png", "README.md"):
        assert f"pirate-adapter/{required}" in names
    assert not card.startswith("---") and "# pirate" in card and "Talk like a pirate." in card
    assert "Adapter bundle ready" in status
    # Building again (e.g. after more training) replaces the studio's own earlier export.
    again, _, status = tab.build_adapter_zip(str(runs_root / "pirate"), runs_root)
    assert again == zip_path and "ready" in status


def test_build_adapter_zip_explains_problems(runs_root):
    assert tab.build_adapter_zip(None, runs_root)[2].startswith("**Export failed:** Pick a run first")
    none, card, status = tab.build_adapter_zip(str(runs_root / "busy"), runs_root)
    assert none is None and "still training" in status


def test_merge_reports_the_logit_difference(runs_root):
    steps = list(tab.merge_run(str(runs_root / "pirate"), runs_root))
    assert steps[0].startswith("Merging")
    report = steps[-1]
    assert "Largest logit difference, merged vs base+adapter" in report and "Top-1 token agreement" in report
    merged = tab.exports_root(runs_root, str(runs_root / "pirate")) / "pirate-merged"
    assert (merged / "model.safetensors").exists() and (merged / "chat_template.jinja").exists()
    assert "(bf16," in report
    assert "(fp16," in list(tab.merge_run(str(runs_root / "pirate"), runs_root, "fp16"))[-1]
    assert list(tab.merge_run(None, runs_root))[-1].startswith("**Merge failed:**")
    assert "must be one of" in list(tab.merge_run(str(runs_root / "pirate"), runs_root, "int4"))[-1]


def test_push_offline_says_so(runs_root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status = tab.push_export(str(runs_root / "pirate"), "Adapter", "pirate", True, GOOD, runs_root)
    assert "offline" in status and GOOD not in status


def test_push_adapter_and_merged_to_a_fake_hub(runs_root, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        status = tab.push_export(str(runs_root / "pirate"), "Adapter", "pirate", True, GOOD, runs_root)
        assert status.startswith("Pushed") and "alice/pirate" in status and "(private)" in status
        assert "adapter_model.safetensors" in hub.files
        bad = tab.push_export(str(runs_root / "pirate"), "Adapter", "pirate", True, "hf_nope", runs_root)
        assert "rejected the token" in bad and "hf_nope" not in bad
        empty = tab.push_export(str(runs_root / "pirate"), "Adapter", " ", True, GOOD, runs_root)
        assert "Type a repo name" in empty
        list(tab.merge_run(str(runs_root / "pirate"), runs_root))
        hub.files.clear()
        merged = tab.push_export(str(runs_root / "pirate"), "Merged model", "pirate-merged", False, GOOD, runs_root)
        assert merged.startswith("Pushed") and "model.safetensors" in hub.files
    assert GOOD not in status + bad + merged


def test_import_upload_hands_the_adapter_to_the_chat_tab(runs_root, tmp_path):
    zip_path, _, _ = tab.build_adapter_zip(str(runs_root / "pirate"), runs_root)
    new_run, status = tab.import_upload(zip_path, runs_root, current="previous")
    assert Path(new_run).parent == runs_root / tab.IMPORTS_DIR
    assert (Path(new_run) / "adapter_config.json").exists() and (Path(new_run) / "config.yaml").exists()
    assert "Chat" in status and "tiny-llama" in status and "r=4" in status
    # What the Chat tab does when session.run changes: the import is accepted, with its training template.
    from qlora_studio.ui.chat_tab import choose_adapter

    source, summary, template, system = choose_adapter(new_run, [runs_root])
    assert source == new_run and "trained with template" in summary
    assert template == "model" and system == "Talk like a pirate."
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("notes.txt", "hi")
    kept, status = tab.import_upload(str(bad), runs_root, current="previous")
    assert kept == "previous" and status.startswith("**Import failed:**") and "notes.txt" in status


def test_build_tab_wires_components(runs_root):
    import gradio as gr

    ctx = SimpleNamespace(runs_root=runs_root)
    with gr.Blocks() as demo:
        session = SimpleNamespace(run=gr.State(None), data=gr.State(None))
        tab.build_tab(ctx, session)
    passwords = [c for c in demo.blocks.values() if isinstance(c, gr.Textbox) and c.type == "password"]
    assert len(passwords) == 1
    dropdown = next(c for c in demo.blocks.values() if isinstance(c, gr.Dropdown) and c.label == "Run")
    assert dropdown.value == tab.run_choices(runs_root)[0][1]  # the newest run is preselected
