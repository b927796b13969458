"""Dataset tab handlers, called directly: source choice and confinement, detection, preview, histogram, hand-off."""

from __future__ import annotations

import pytest

gr = pytest.importorskip("gradio")

from qlora_studio.data import samples_dir  # noqa: E402
from qlora_studio.ui import dataset_tab as tab  # noqa: E402
from qlora_studio.ui.context import AppSettings, SessionStates  # noqa: E402

DEFAULTS = dict(hub_id="", hub_config="", split="train", fmt="auto", slot_fields=[], slot_values=[], template="model",
                system_prompt="", max_length=512, eval_fraction=0.1, eval_source="", bad_rows="drop",
                model_name="embedded", completion_only_loss=True)


@pytest.fixture
def settings(tmp_path):
    allowed = tmp_path / "data"
    allowed.mkdir()
    return AppSettings(runs_root=tmp_path / "runs", uploads_dir=tmp_path / "uploads",
                       allowed_data_dirs=[samples_dir(), allowed])


def check(settings, kind="Sample", sample="persona", upload=None, path="", **kw):
    args = {**DEFAULTS, **kw}
    return tab.load_and_check(settings, kind, sample, upload, path, args["hub_id"], args["hub_config"], args["split"],
                              args["fmt"], args["slot_fields"], args["slot_values"], args["template"],
                              args["system_prompt"], args["max_length"], args["eval_fraction"], args["eval_source"],
                              args["bad_rows"], args["model_name"], args["completion_only_loss"])


def test_sample_is_detected_previewed_and_handed_to_training(settings):
    out = check(settings)
    assert "`messages`" in out["message"] and "role/content" in out["message"]
    assert "The Train tab will use **sample:persona**" in out["message"]
    assert "**Split:** 153 train / 17 eval" in out["message"]  # the split prepare_training_data makes
    assert out["data"]["source"] == "sample:persona" and out["data"]["format"] == "messages"
    assert out["data"]["mapping"] == {"messages": "messages"}
    assert out["pages"] == 34 and out["bad_rows"] == []
    assert tab.TRAINED_STYLE in out["preview"] and "Fair winds, matey!&lt;|im_end|&gt;</span>" in out["preview"]
    assert "Longer than max length 512:** 0 of 170" in out["stats"]
    fig = out["figure"]
    assert sum(fig.data[0].y) == 170
    assert fig.layout.shapes[0].x0 == 512  # the cutoff line


def test_the_chosen_data_dict_is_a_valid_config_section(settings):
    from qlora_studio.config import StudioConfig
    out = check(settings, sample="instructions", template="alpaca", max_length=256, eval_fraction=0.2)
    config = StudioConfig.from_dict({"data": out["data"]})
    assert config.data.format == "alpaca" and config.data.template == "alpaca" and config.data.max_length == 256
    assert config.data.mapping == {"instruction": "instruction", "input": "input", "output": "output"}


def test_typed_paths_must_be_inside_allowed_folders(settings, tmp_path):
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"text": "hi"}\n')
    out = check(settings, kind="Path", path=str(outside))
    assert "data" not in out and "outside the folders this app may read" in out["message"]
    out = check(settings, kind="Path", path="/etc/passwd")
    assert "data" not in out and "outside the folders" in out["message"]
    # Existence outside the allowed folders is never revealed.
    assert "outside the folders" in check(settings, kind="Path", path="/no/such/file.jsonl")["message"]
    out = check(settings, eval_source=str(outside))
    assert "data" not in out and "outside the folders" in out["message"]


def test_csv_path_with_manual_mapping(settings):
    path = settings.allowed_data_dirs[1] / "qa.csv"
    path.write_text('q,a,who\n"What is 2+2?","4","Be terse."\n"Hi?","Hello!",""\n')
    out = check(settings, kind="Path", path=str(path), fmt="prompt_completion",
                slot_fields=["prompt", "completion", "system"], slot_values=["q", "a", "who"])
    assert out["data"]["mapping"] == {"prompt": "q", "completion": "a", "system": "who"}
    assert "Be terse." in out["preview"] and out["result"].rows_valid == 2
    fields, updates = tab.slot_updates("prompt_completion", out["data"]["mapping"], out["result"].detection.columns)
    assert fields == ["prompt", "completion", "system"]
    assert updates[0]["value"] == "q" and updates[0]["choices"] == [tab.NO_COLUMN, "q", "a", "who"]
    assert updates[3]["visible"] is False


def test_upload_is_kept_in_the_uploads_folder(settings, tmp_path):
    gradio_tmp = tmp_path / "gradio" / "chat.jsonl"
    gradio_tmp.parent.mkdir()
    gradio_tmp.write_text('{"prompt": "Q", "completion": "A"}\n{"prompt": "Q2", "completion": "A2"}\n')
    out = check(settings, kind="Upload", upload=str(gradio_tmp))
    kept = out["data"]["source"]
    assert kept.startswith(str(settings.uploads_dir)) and kept.endswith("-chat.jsonl")
    assert open(kept).read() == gradio_tmp.read_text()
    assert "data" not in check(settings, kind="Upload", upload=None)


def test_bad_rows_are_listed_and_shown_inline(settings):
    path = settings.allowed_data_dirs[1] / "bad.jsonl"
    path.write_text('{"prompt": "Q", "completion": "A"}\nnot json\n{"prompt": "<script>x</script>", "completion": ""}\n')
    out = check(settings, kind="Path", path=str(path))
    assert out["bad_rows"] == [["line 2", "invalid JSON", "invalid JSON on line 2: Expecting value (column 1)"],
                               ["line 3", "empty assistant turn", "line 3: column 'completion' (completion) is empty"]]
    assert "bad row: invalid JSON on line 2" in out["preview"]


def test_preview_html_escapes_user_text_and_marks_masked_parts():
    from qlora_studio.data import PreviewRow
    row = PreviewRow(1, "line 1", None, [("<b>prompt</b> ", False), ("answer & done", True)], 5, 2, False)
    html = tab.render_preview_html([row])
    assert "&lt;b&gt;prompt&lt;/b&gt;" in html and "<b>prompt</b>" not in html
    assert f'<span style="{tab.MASKED_STYLE}">&lt;b&gt;' in html
    assert f'<span style="{tab.TRAINED_STYLE}">answer &amp; done</span>' in html


def test_hub_source_offline_is_a_clear_message(settings, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = check(settings, kind="Hub", hub_id="qlora-studio-tests/no-such-dataset")
    assert "needs the network or the local Hugging Face cache" in out["message"]
    assert "data" not in check(settings, kind="Hub", hub_id="")


def test_later_pages_and_the_tab_builds_inside_blocks(settings):
    data = check(settings)["data"]
    html = tab.preview_page_html(data, "embedded", True, 34)
    assert html.count('class="qs-row"') == 5
    assert tab.preview_page_html(data, "embedded", True, 35) == "<p>No rows on this page.</p>"

    class Ctx:
        pass
    ctx = Ctx()
    ctx.settings = settings
    with gr.Blocks():
        session = SessionStates.create()
        tab.build_tab(ctx, session)
