"""Every file type and source reads to the same rows; samples are ours and reproducible; the Hub fails clearly offline."""

from __future__ import annotations

import csv
import json
import time

import pytest

from qlora_studio.data import (DataError, confine_path, iter_records, open_examples, open_source,
                               prepare_training_data, resolve_source, samples_dir)
from qlora_studio.config import DataConfig, StudioConfig

ROWS = [
    {"question": "What is 2+2?", "answer": "4", "persona": "You are terse."},
    {"question": "Capital of Peru?", "answer": "Lima", "persona": "You are a geographer."},
    {"question": "Say hi, with a comma", "answer": "Hi, there!\nBye.", "persona": ""},
]
MAPPING = {"prompt": "question", "completion": "answer", "system": "persona"}


def write(path, kind, rows=ROWS):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows, indent=2))
    elif kind in ("csv", "tsv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if kind == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_every_file_type_gives_the_same_conversations(tmp_path, kind):
    path = write(tmp_path / f"qa.{kind}", kind)
    data = DataConfig(source=str(path), mapping=MAPPING)
    _src, detection, items = open_examples(data)
    items = list(items)
    assert detection.format == "prompt_completion"
    assert [i.example.messages for i in items] == [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "4"}],
        [{"role": "system", "content": "You are a geographer."}, {"role": "user", "content": "Capital of Peru?"},
         {"role": "assistant", "content": "Lima"}],
        [{"role": "user", "content": "Say hi, with a comma"}, {"role": "assistant", "content": "Hi, there!\nBye."}],
    ]
    assert [i.example.trained for i in items][0] == [False, False, True]


def test_csv_question_answer_columns_are_detected_without_a_mapping(tmp_path):
    path = write(tmp_path / "qa.csv", "csv")
    _src, detection, _items = open_examples(DataConfig(source=str(path)))
    assert detection.format == "prompt_completion"
    assert "'question' and 'answer'" in detection.reason
    assert detection.mapping["prompt"] == "question" and detection.mapping["completion"] == "answer"


def test_json_object_holding_a_list_and_jsonl_named_json(tmp_path):
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"version": 1, "data": [{"text": "a"}, {"text": "b"}]}))
    assert [r.value["text"] for r in iter_records(open_source(str(obj)))] == ["a", "b"]
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    records = list(iter_records(open_source(str(lines))))
    assert [r.where for r in records] == ["line 1", "line 2"]
    single = tmp_path / "single.json"
    single.write_text('{"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}')
    assert [list(r.value) for r in iter_records(open_source(str(single)))] == [["messages"]]


def test_json_array_is_streamed_with_line_numbers_and_a_broken_element_is_reported(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n {"text": "one"},\n {"text": "two"},\n 7,\n {"text": oops}\n]')
    records = list(iter_records(open_source(str(path))))
    assert [r.value for r in records[:2]] == [{"text": "one"}, {"text": "two"}]
    assert records[0].where == "element 1 (line 2)"
    assert records[2].code == "not_an_object" and "line 4" in records[2].error
    assert records[3].code == "invalid_json" and "line 5" in records[3].error


def test_text_file_rows_are_paragraphs_or_lines(tmp_path):
    paragraphs = tmp_path / "p.txt"
    paragraphs.write_text("A: hi\nB: hello\n\n\nA: bye\nB: see you\n")
    records = list(iter_records(open_source(str(paragraphs))))
    assert [r.value["text"] for r in records] == ["A: hi\nB: hello", "A: bye\nB: see you"]
    assert [r.where for r in records] == ["line 1", "line 5"]
    lines = tmp_path / "l.txt"
    lines.write_text("first sentence\nsecond sentence\n")
    assert [r.value["text"] for r in iter_records(open_source(str(lines)))] == ["first sentence", "second sentence"]


def test_missing_file_unknown_sample_and_folder_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="Unknown sample 'nope'.*sample:persona"):
        open_source("sample:nope")
    with pytest.raises(DataError, match="is a folder"):
        open_source(str(tmp_path))
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(DataError, match="unsupported file type '.xlsx'"):
        open_source(str(tmp_path / "x.xlsx"))


def test_hub_dataset_offline_gives_a_clear_message_quickly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = open_source("qlora-studio-tests/no-such-dataset", split="train")
    assert source.kind == "hub"
    start = time.monotonic()
    with pytest.raises(DataError, match="needs the network or the local Hugging Face cache"):
        prepare_training_data(DataConfig(source="qlora-studio-tests/no-such-dataset"), None, seed=0,
                              completion_only_loss=True)
    assert time.monotonic() - start < 20


def test_paths_outside_allowed_folders_are_refused(tmp_path):
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    allowed.mkdir(), other.mkdir()
    inside = write(allowed / "a.jsonl", "jsonl")
    outside = write(other / "b.jsonl", "jsonl")
    assert confine_path(str(inside), [allowed]).location == str(inside.resolve())
    with pytest.raises(DataError, match="outside the folders"):
        confine_path(str(outside), [allowed])
    (allowed / "sneaky.jsonl").symlink_to(outside)
    with pytest.raises(DataError, match="outside the folders"):
        confine_path(str(allowed / "sneaky.jsonl"), [allowed])
    with pytest.raises(DataError, match="outside the folders"):
        confine_path(str(allowed / ".." / "other" / "b.jsonl"), [allowed])
    assert confine_path("sample:persona", [allowed]).kind == "sample"


# --- samples ----------------------------------------------------------------------------

def test_samples_resolve_and_are_regenerated_byte_for_byte(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_samples", samples_dir() / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_all(tmp_path)
    for name, file in (("persona", "persona.jsonl"), ("instructions", "instructions.jsonl"), ("dialogue", "dialogue.txt")):
        shipped = resolve_source(f"sample:{name}")
        assert shipped.endswith(file)
        assert (tmp_path / file).read_bytes() == open(shipped, "rb").read(), f"{file} differs from make_samples.py output"


def test_persona_sample_has_the_sign_off_everywhere_and_varied_rows():
    rows = [json.loads(line) for line in open(resolve_source("sample:persona"))]
    assert 150 <= len(rows) <= 250
    replies = [m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant"]
    assert all(reply.endswith("Fair winds, matey!") for reply in replies)
    with_system = sum(r["messages"][0]["role"] == "system" for r in rows)
    multi_turn = sum(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in rows)
    assert 0.2 * len(rows) < with_system < 0.8 * len(rows)
    assert multi_turn >= 10
    questions = [m["content"] for r in rows for m in r["messages"] if m["role"] == "user"]
    assert len(set(questions)) > 0.9 * len(questions)


def test_instruction_and_dialogue_samples_detect_as_their_formats():
    _s, detection, items = open_examples(DataConfig(source="sample:instructions"))
    items = list(items)
    assert detection.format == "alpaca" and len(items) >= 90 and all(i.example for i in items)
    assert any("\n\n" in i.example.messages[0]["content"] for i in items)  # instruction + input
    _s, detection, items = open_examples(DataConfig(source="sample:dialogue"))
    items = list(items)
    assert detection.format == "text" and len(items) >= 40
    assert sum(i.example.text.count("\n") + 1 for i in items) >= 200


def test_config_mapping_keys_reach_the_data_step(tmp_path, embedded_tokenizer):
    path = write(tmp_path / "qa.csv", "csv")
    config = StudioConfig.from_yaml(f"data:\n  source: {path}\n  format: prompt_completion\n"
                                    "  mapping: {prompt: question, completion: answer, system: persona}\n"
                                    "  eval_fraction: 0\n")
    prepared = prepare_training_data(config.data, embedded_tokenizer, seed=0, completion_only_loss=True)
    assert prepared.report.rows_used == 3 and prepared.eval is None
    assert "You are terse." in embedded_tokenizer.decode(prepared.train[0]["input_ids"])
