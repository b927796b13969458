"""What the CLI's `data inspect` and the Dataset tab show: detection, bad rows, token-length
statistics, a histogram, and rendered rows with the trained tokens told apart.

Every row is read and checked (streaming, so a 1 GB file is fine), but only a reservoir
sample of valid rows is tokenized for statistics; the result says when it sampled.
"""

from __future__ import annotations

import itertools
import random
import statistics
from dataclasses import dataclass, field

from .formats import Detection
from .pipeline import BadRows, as_data_config, open_examples
from .render import render_example
from .sources import Source


@dataclass
class PreviewRow:
    row: int
    where: str
    error: str | None = None
    segments: list = field(default_factory=list)   # [(text, counts_in_loss)]
    n_tokens: int = 0
    n_trained: int = 0
    truncated: bool = False
    messages: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"row": self.row, "where": self.where, "error": self.error, "n_tokens": self.n_tokens,
                "n_trained": self.n_trained, "truncated": self.truncated,
                "segments": [{"text": t, "trained": f} for t, f in self.segments],
                "text": "".join(t for t, _ in self.segments)}

    def marked_text(self, open_mark: str = "«", close_mark: str = "»") -> str:
        """The rendered text with the trained parts between marks (for terminals)."""
        return "".join(f"{open_mark}{t}{close_mark}" if f else t for t, f in self.segments)


@dataclass
class Inspection:
    source: str
    location: str
    source_kind: str
    detection: Detection
    template: str
    max_length: int
    completion_only_loss: bool
    rows_scanned: int = 0
    rows_valid: int = 0
    complete: bool = True                 # False when scan_limit stopped the scan early
    bad: BadRows = field(default_factory=BadRows)
    lengths: list = field(default_factory=list)
    sampled: bool = False
    stats: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "source": self.source, "location": self.location, "source_kind": self.source_kind,
            **self.detection.to_dict(), "template": self.template, "max_length": self.max_length,
            "completion_only_loss": self.completion_only_loss, "rows_scanned": self.rows_scanned,
            "rows_valid": self.rows_valid, "complete": self.complete,
            "bad_rows": {"total": self.bad.total, "by_reason": dict(self.bad.counts), "rows": list(self.bad.listed)},
            "token_stats": dict(self.stats), "examples": [e.to_dict() for e in self.examples],
        }


def inspect_data(data, tokenizer, *, completion_only_loss: bool = True, n_examples: int = 2, sample_size: int = 2000,
                 scan_limit: int | None = None, seed: int = 0, source: Source | None = None) -> Inspection:
    data = as_data_config(data)
    src, detection, items = open_examples(data, source=source)
    result = Inspection(data.source, src.location, src.kind, detection, data.template, data.max_length,
                        completion_only_loss)
    rng = random.Random(seed)
    reservoir: list = []          # (record, example), a uniform sample of valid rows
    seen_valid = 0
    for item in items:
        if scan_limit is not None and result.rows_scanned >= scan_limit:
            result.complete = False
            break
        result.rows_scanned += 1
        if item.example is None:
            result.bad.add(item.record, item.code, item.error)
            continue
        seen_valid += 1
        if len(result.examples) < n_examples:
            result.examples.append(_preview(item.record, item.example, tokenizer, data, completion_only_loss))
        if len(reservoir) < sample_size:
            reservoir.append((item.record, item.example))
        else:
            j = rng.randrange(seen_valid)
            if j < sample_size:
                reservoir[j] = (item.record, item.example)
    result.sampled = seen_valid > len(reservoir) or not result.complete
    empty_prompts = 0
    for record, example in reservoir:
        rendered = render_example(example, tokenizer, data.template, completion_only_loss=completion_only_loss)
        if 1 not in rendered.mask[: data.max_length]:
            empty_prompts += 1
            if not result.sampled:  # exact: report it as the bad row prepare_training_data will drop
                result.bad.add(record, "no_trainable_tokens", f"{record.where}: no token that counts in the loss "
                               f"lies within max_length {data.max_length}")
                continue
        result.lengths.append(len(rendered.input_ids))
    result.bad.listed.sort(key=lambda b: b["row"])
    result.rows_valid = seen_valid - (0 if result.sampled else empty_prompts)
    result.stats = _stats(result.lengths, data.max_length, result.sampled, result.rows_valid, empty_prompts)
    return result


def _stats(lengths: list, max_length: int, sampled: bool, rows_valid: int, empty_prompts: int) -> dict:
    if not lengths:
        return {"count": 0, "sampled": sampled}
    ordered = sorted(lengths)
    truncated = sum(n > max_length for n in lengths)
    stats = {
        "count": len(lengths), "sampled": sampled, "min": ordered[0], "max": ordered[-1],
        "mean": round(statistics.fmean(ordered), 1), "median": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max_length": max_length,
        "truncated": truncated, "tokens": sum(min(n, max_length) for n in lengths),
    }
    if sampled:
        stats["note"] = (f"statistics from a random sample of {len(lengths)} of {rows_valid} valid rows scanned; "
                         "counts for all rows are estimates")
        stats["truncated_estimate"] = round(truncated / len(lengths) * rows_valid)
        if empty_prompts:
            stats["no_trainable_tokens_in_sample"] = empty_prompts
    return stats


def _preview(record, example, tokenizer, data, completion_only_loss: bool) -> PreviewRow:
    rendered = render_example(example, tokenizer, data.template, completion_only_loss=completion_only_loss)
    return PreviewRow(record.row, record.where, None, rendered.segments(), len(rendered.input_ids),
                      sum(rendered.mask[: data.max_length]), len(rendered.input_ids) > data.max_length,
                      list(example.messages))


def preview_rows(data, tokenizer, *, start: int = 0, count: int = 10, completion_only_loss: bool = True,
                 source: Source | None = None) -> list[PreviewRow]:
    """Rows start..start+count-1 (0-based, bad rows included with their error), rendered for display.

    Streams from the beginning, so any page of a large file costs one pass up to it, not the file.
    """
    data = as_data_config(data)
    _src, _detection, items = open_examples(data, source=source)
    out = []
    for item in itertools.islice(items, start, start + count):
        if item.example is None:
            out.append(PreviewRow(item.record.row, item.record.where, item.error))
        else:
            out.append(_preview(item.record, item.example, tokenizer, data, completion_only_loss))
    return out


def histogram(lengths: list, max_length: int, bins: int = 30) -> dict:
    """Token-length histogram whose range always includes the max_length cutoff.

    Returns {"edges": [bins+1 floats], "counts": [bins ints], "max_length", "over_max": rows longer than max_length}.
    """
    import numpy as np

    top = max([max_length, *lengths]) if lengths else max_length
    counts, edges = np.histogram(np.asarray(lengths, dtype=float), bins=bins, range=(0, top))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "max_length": max_length,
            "over_max": int(sum(n > max_length for n in lengths)), "total": len(lengths)}
