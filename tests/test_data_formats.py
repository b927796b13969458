"""Formats, detection with reasons, overrides and mapping; every kind of bad row with its line number."""

from __future__ import annotations

import json

import pytest

from qlora_studio.data import DataError, detect_format, inspect_data, open_examples, prepare_training_data
from qlora_studio.config import DataConfig


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def examples(path, **kw):
    _s, detection, items = open_examples(DataConfig(source=path, **kw))
    return detection, list(items)


def test_messages_format_with_system(tmp_path):
    path = jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                                      {"role": "assistant", "content": "A"}]}])
    detection, items = examples(path)
    assert detection.format == "messages" and "role/content" in detection.reason
    assert items[0].example.messages[0] == {"role": "system", "content": "S"}
    assert items[0].example.trained == [False, False, True]


def test_sharegpt_format_maps_human_gpt_system(tmp_path):
    path = jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "U"},
                                                           {"from": "gpt", "value": "A"}]}])
    detection, items = examples(path)
    assert detection.format == "sharegpt" and "ShareGPT" in detection.reason
    assert [m["role"] for m in items[0].example.messages] == ["system", "user", "assistant"]


def test_sharegpt_turns_under_a_messages_column_are_recognized(tmp_path):
    path = jsonl(tmp_path / "s.jsonl", [{"messages": [{"from": "human", "value": "U"}, {"from": "gpt", "value": "A"}]}])
    detection, items = examples(path)
    assert detection.format == "sharegpt" and detection.mapping["conversations"] == "messages"
    assert items[0].example.messages[1] == {"role": "assistant", "content": "A"}


def test_alpaca_format_joins_instruction_and_input(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [{"instruction": "Sort", "input": "3, 1", "output": "1, 3"},
                                        {"instruction": "Say hi", "output": "hi"}])
    detection, items = examples(path)
    assert detection.format == "alpaca"
    assert items[0].example.messages == [{"role": "user", "content": "Sort\n\n3, 1"}, {"role": "assistant", "content": "1, 3"}]
    assert items[1].example.messages[0]["content"] == "Say hi"


def test_prompt_completion_plain_and_conversational(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Q", "completion": "A"},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Bye?"}],
         "completion": [{"role": "assistant", "content": "Bye"}]},
    ])
    detection, items = examples(path)
    assert detection.format == "prompt_completion"
    assert items[0].example.trained == [False, True]
    # Only the completion counts, not the earlier assistant turn inside the prompt.
    assert items[1].example.trained == [False, False, False, True]


def test_plain_text_and_single_column_detection(tmp_path):
    detection, items = examples(jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}]))
    assert detection.format == "text" and items[0].example.text == "hello world"
    detection, items = examples(jsonl(tmp_path / "c.jsonl", [{"sentence": "one"}, {"sentence": "two"}]))
    assert detection.format == "text" and detection.mapping == {"text": "sentence"}
    assert "only column" in detection.reason


def test_manual_override_and_mapping_for_arbitrary_columns(tmp_path):
    path = jsonl(tmp_path / "x.jsonl", [{"q": "Why?", "a": "Because.", "who": "Be brief."}])
    with pytest.raises(DataError, match="Cannot tell the format.*q, a, who"):
        examples(path)
    detection, items = examples(path, format="prompt_completion", mapping={"prompt": "q", "completion": "a", "system": "who"})
    assert detection.reason == "chosen by you"
    assert items[0].example.messages[0] == {"role": "system", "content": "Be brief."}
    # Plain text over the same file, from a chosen column.
    detection, items = examples(path, format="text", mapping={"text": "a"})
    assert items[0].example.text == "Because."


def test_mapping_errors_name_the_field_and_column():
    with pytest.raises(DataError, match="mapping prompt=questoin: no column 'questoin'; columns are: question, answer"):
        detect_format(["question", "answer"], [], mapping={"prompt": "questoin"})
    with pytest.raises(DataError, match="unknown field 'promt'"):
        detect_format(["question", "answer"], [], mapping={"promt": "question"})
    with pytest.raises(DataError, match="format alpaca needs column 'instruction'"):
        detect_format(["question", "answer"], [], format="alpaca")


def test_default_system_prompt_only_for_rows_without_one(tmp_path, embedded_tokenizer):
    path = jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]},
        {"messages": [{"role": "system", "content": "Own"}, {"role": "user", "content": "U"},
                      {"role": "assistant", "content": "A"}]},
    ])
    _d, items = examples(path, system_prompt="Default sys")
    assert items[0].example.messages[0] == {"role": "system", "content": "Default sys"}
    assert items[1].example.messages[0]["content"] == "Own"
    prepared = prepare_training_data(DataConfig(source=path, system_prompt="Default sys", eval_fraction=0),
                                     embedded_tokenizer, seed=0, completion_only_loss=True)
    assert prepared.report.system_prompt_added == 1


# --- bad rows -------------------------------------------------------------------------------

BAD_FILE = [
    {"messages": [{"role": "user", "content": "fine"}, {"role": "assistant", "content": "ok"}]},          # 1
    '{"messages": [{"role": "user", "content": "broken"}',                                                # 2
    {"conversation": []},                                                                                 # 3
    {"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "  "}]},             # 4
    {"messages": [{"role": "user", "content": "U"}, {"role": "user", "content": "again"},
                  {"role": "assistant", "content": "A"}]},                                                # 5
    {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "A"}]},               # 6
    {"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A " * 400}]},       # 7: long
    {"messages": [{"role": "user", "content": "fine again"}, {"role": "assistant", "content": "ok"}]},     # 8
    {"messages": [{"role": "user", "content": "only a question"}]},                                       # 9
    {"messages": [{"role": "wizard", "content": "U"}, {"role": "assistant", "content": "A"}]},            # 10
    {"messages": [{"role": "user", "content": "U " * 200}, {"role": "assistant", "content": "late"}]},    # 11: prompt fills max_length
    "[1, 2]",                                                                                             # 12
]
EXPECTED = {
    2: ("invalid JSON", "invalid JSON on line 2"),
    3: ("missing column", "line 3: missing column 'messages'"),
    4: ("empty assistant turn", "line 4: turn 2 is an empty assistant turn"),
    5: ("roles not alternating", "line 5: roles not alternating: turn 2 is 'user' after 'user'"),
    6: ("non-string content", "line 6: turn 1 (user) content is a number, not a string"),
    9: ("no assistant turn", "line 9: no assistant turn"),
    10: ("unknown role", "line 10: turn 1 has unknown role 'wizard'"),
    11: ("nothing to train on within max_length", "line 11: no token that counts in the loss lies within max_length 128"),
    12: ("not an object", "line 12: expected a JSON object"),
}


@pytest.fixture
def bad_file(tmp_path):
    return jsonl(tmp_path / "bad.jsonl", BAD_FILE)


def test_each_bad_row_is_reported_with_its_line_and_reason(bad_file, embedded_tokenizer):
    prepared = prepare_training_data(DataConfig(source=bad_file, max_length=128, eval_fraction=0),
                                     embedded_tokenizer, seed=0, completion_only_loss=True)
    report = prepared.report.to_dict()
    assert report["rows_total"] == 12 and report["rows_used"] == 3 and prepared.train.num_rows == 3
    assert {d["row"]: d["kind"] for d in report["dropped"]} == {line: kind for line, (kind, _) in EXPECTED.items()}
    for entry in report["dropped"]:
        assert entry["reason"].startswith(EXPECTED[entry["row"]][1]), entry
    assert report["rows_dropped"] == 9 and sum(report["dropped_by_reason"].values()) == 9
    assert report["dropped_by_reason"]["invalid JSON"] == 1
    # Too long is truncated, not dropped: line 7 stays, and is counted.
    assert report["truncated"] == 1
    assert max(len(ids) for ids in prepared.train["input_ids"]) > 128


def test_inspection_lists_the_same_bad_rows(bad_file, embedded_tokenizer):
    result = inspect_data(DataConfig(source=bad_file, max_length=128), embedded_tokenizer)
    d = result.to_dict()
    assert [b["row"] for b in d["bad_rows"]["rows"]] == sorted(EXPECTED)
    assert d["bad_rows"]["total"] == 9 and d["rows_valid"] == 3
    assert d["token_stats"]["truncated"] == 1 and d["token_stats"]["sampled"] is False


def test_bad_rows_stop_names_the_first_bad_row(bad_file, embedded_tokenizer):
    with pytest.raises(DataError, match=r"invalid JSON on line 2.*set bad_rows to 'drop'"):
        prepare_training_data(DataConfig(source=bad_file, bad_rows="stop"), embedded_tokenizer, seed=0,
                              completion_only_loss=True)


def test_csv_bad_rows_are_reported_by_row_and_line(tmp_path, embedded_tokenizer):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer\n"Q1","A1"\n"Q2",""\n"multi\nline","A3"\n"Q4"\n')
    prepared = prepare_training_data(DataConfig(source=str(path), eval_fraction=0), embedded_tokenizer, seed=0,
                                     completion_only_loss=True)
    dropped = prepared.report.dropped
    assert [(d["where"], d["kind"]) for d in dropped] == [("row 2 (line 3)", "empty assistant turn"),
                                                          ("row 4 (line 6)", "missing column")]
    assert prepared.report.rows_used == 2


def test_nothing_usable_is_an_error_not_an_empty_dataset(tmp_path, embedded_tokenizer):
    path = jsonl(tmp_path / "all_bad.jsonl", [{"messages": [{"role": "user", "content": "U"}]}] * 3)
    with pytest.raises(DataError, match="no usable rows.*3 bad.*line 1: no assistant turn"):
        prepare_training_data(DataConfig(source=path), embedded_tokenizer, seed=0, completion_only_loss=True)


# --- split ----------------------------------------------------------------------------------

def test_split_is_deterministic_with_the_seed(embedded_tokenizer):
    def eval_ids(seed, fraction=0.2):
        p = prepare_training_data(DataConfig(source="sample:instructions", eval_fraction=fraction), embedded_tokenizer,
                                  seed=seed, completion_only_loss=True)
        assert p.train.num_rows + p.eval.num_rows == 100
        return [tuple(x) for x in p.eval["input_ids"]], p
    first, prepared = eval_ids(1)
    again, _ = eval_ids(1)
    other, _ = eval_ids(2)
    assert len(first) == 20 and first == again and first != other
    assert set(map(tuple, prepared.train["input_ids"])).isdisjoint(first)
    assert prepared.report.rows_train == 80 and prepared.report.rows_eval == 20


def test_eval_source_file_overrides_the_fraction(tmp_path, embedded_tokenizer):
    eval_path = jsonl(tmp_path / "eval.jsonl", [{"prompt": "Q", "completion": "A"}, {"prompt": "Q2", "completion": "A2"}])
    p = prepare_training_data(DataConfig(source="sample:persona", eval_source=eval_path, eval_fraction=0.5),
                              embedded_tokenizer, seed=0, completion_only_loss=True)
    assert p.train.num_rows == 170 and p.eval.num_rows == 2
    assert p.report.eval_source["format"] == "prompt_completion" and p.report.rows_eval == 2
    no_eval = prepare_training_data(DataConfig(source="sample:dialogue", eval_fraction=0), embedded_tokenizer, seed=0,
                                    completion_only_loss=True)
    assert no_eval.eval is None and no_eval.report.rows_eval == 0


def test_split_name_as_eval_source_needs_a_hub_dataset(embedded_tokenizer):
    with pytest.raises(DataError, match="'split:NAME' picks another split of a Hub dataset"):
        prepare_training_data(DataConfig(source="sample:persona", eval_source="split:test"), embedded_tokenizer,
                              seed=0, completion_only_loss=True)
