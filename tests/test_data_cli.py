"""`qlora-studio data inspect`: text and --json output over the same core."""

from __future__ import annotations

import json

from qlora_studio.cli import main


def test_inspect_json_reports_detection_rows_bad_rows_stats_and_examples(tmp_path, capsys):
    path = tmp_path / "qa.csv"
    path.write_text('q,a,who\n"What is 2+2?","4","Be terse."\n"Capital of Peru?","",""\n"Hi?","Hello!",""\n')
    code = main(["data", "inspect", str(path), "--format", "prompt_completion", "--map", "prompt=q",
                 "--map", "completion=a", "--map", "system=who", "--template", "chatml", "--json"])
    assert code == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "prompt_completion" and d["reason"] == "chosen by you"
    assert d["mapping"] == {"prompt": "q", "completion": "a", "system": "who"}
    assert d["rows_scanned"] == 3 and d["rows_valid"] == 2
    assert d["bad_rows"]["rows"] == [{"row": 2, "where": "row 2 (line 3)", "kind": "empty assistant turn",
                                      "reason": "row 2 (line 3): column 'a' (completion) is empty"}]
    assert d["token_stats"]["count"] == 2 and d["token_stats"]["min"] > 0
    first = d["examples"][0]
    assert first["text"].startswith("<|im_start|>system\nBe terse.<|im_end|>")  # chatml: no injected default
    assert [s["text"] for s in first["segments"] if s["trained"]] == ["4<|im_end|>"]
    assert len(d["examples"]) == 2


def test_inspect_text_output_on_a_sample(capsys):
    assert main(["data", "inspect", "sample:persona"]) == 0
    out = capsys.readouterr().out
    assert "Format:    messages (column 'messages' holds lists of role/content turns)" in out
    assert "Rows:      170 read, 170 usable, 0 bad" in out
    assert "Tokens:    min" in out
    assert out.count("«") >= 2  # two examples, each with at least one trained span
    assert "Fair winds, matey!<|im_end|>»" in out


def test_inspect_errors_exit_nonzero_with_the_reason(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "missing.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "inspect", "sample:persona", "--map", "prompt", "--json"]) == 1
    assert "expected FIELD=COLUMN" in json.loads(capsys.readouterr().out)["error"]
