"""A large generated JSONL is previewed and validated with bounded memory, and the stats say they sampled."""

from __future__ import annotations

import json
import time
import tracemalloc

from qlora_studio.config import DataConfig
from qlora_studio.data import inspect_data, preview_rows

ROWS = 24_000
BAD_LINES = {5, 12_345, ROWS}


def make_large_jsonl(path) -> int:
    filler = "The quick brown fox jumps over the lazy dog. " * 40  # ~1.8 KB per answer
    with open(path, "w") as f:
        for line in range(1, ROWS + 1):
            if line in BAD_LINES:
                f.write('{"messages": [oops\n')
                continue
            row = {"messages": [{"role": "user", "content": f"Question number {line}?"},
                                {"role": "assistant", "content": f"Answer {line}. {filler * (1 + line % 3)}"}]}
            f.write(json.dumps(row) + "\n")
    return path.stat().st_size


def test_large_jsonl_is_inspected_with_bounded_memory(tmp_path, embedded_tokenizer):
    path = tmp_path / "large.jsonl"
    size = make_large_jsonl(path)
    assert size > 50_000_000
    data = DataConfig(source=str(path), max_length=1024)

    tracemalloc.start()
    try:
        start = time.monotonic()
        result = inspect_data(data, embedded_tokenizer, sample_size=200)
        elapsed = time.monotonic() - start
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size / 5, f"peak Python memory {peak / 1e6:.1f} MB for a {size / 1e6:.0f} MB file"
    d = result.to_dict()
    assert d["rows_scanned"] == ROWS and d["rows_valid"] == ROWS - len(BAD_LINES) and d["complete"]
    assert [b["row"] for b in d["bad_rows"]["rows"]] == sorted(BAD_LINES)
    assert all(b["kind"] == "invalid JSON" for b in d["bad_rows"]["rows"])
    stats = d["token_stats"]
    assert stats["sampled"] is True and stats["count"] == 200 and "random sample of 200" in stats["note"]
    # Answers are ~400, ~800 or ~1200 tokens: a third of the rows exceed 1024; the estimate covers all rows.
    assert 0.2 * ROWS < stats["truncated_estimate"] < 0.5 * ROWS
    assert elapsed < 60

    tracemalloc.start()
    try:
        rows = preview_rows(data, embedded_tokenizer, start=ROWS - 3, count=10)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size / 5
    assert [r.row for r in rows] == [ROWS - 2, ROWS - 1, ROWS]
    assert rows[-1].error.startswith(f"invalid JSON on line {ROWS}")
