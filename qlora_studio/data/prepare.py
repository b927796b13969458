"""prepare_training_data: the config's data section -> tokenized train/eval sets + a report.

The sets hold the full rendered sequences (`input_ids`) and which tokens count in the loss
(`assistant_masks`). SFTTrainer takes them as they are: it builds labels from the mask and
truncates to max_length (keep_start), so what the Dataset tab shows is what is trained.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from ..config import DataConfig
from .errors import DataError
from .pipeline import BadRows, as_data_config, open_examples
from .render import render_example
from .sources import open_source


@dataclass
class SourceReport:
    source: str
    location: str
    format: str
    reason: str
    mapping: dict
    rows_total: int = 0
    rows_used: int = 0
    dropped: list = field(default_factory=list)          # [{row, where, reason, kind}], first 1000
    dropped_by_reason: dict = field(default_factory=dict)
    truncated: int = 0
    system_prompt_added: int = 0
    tokens_total: int = 0
    tokens_trained: int = 0


@dataclass
class DataReport:
    source: str
    location: str
    format: str
    reason: str
    mapping: dict
    template: str
    max_length: int
    completion_only_loss: bool
    bad_rows_policy: str
    rows_total: int = 0
    rows_used: int = 0
    rows_train: int = 0
    rows_eval: int = 0
    dropped: list = field(default_factory=list)
    dropped_by_reason: dict = field(default_factory=dict)
    rows_dropped: int = 0
    truncated: int = 0
    system_prompt_added: int = 0
    tokens_total: int = 0
    tokens_trained: int = 0
    split: str = ""
    eval_source: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"{self.rows_used}/{self.rows_total} rows used ({self.format}: {self.reason})",
                 f"train {self.rows_train}, eval {self.rows_eval} ({self.split})"]
        if self.rows_dropped:
            why = ", ".join(f"{n} {k}" for k, n in self.dropped_by_reason.items())
            parts.append(f"{self.rows_dropped} dropped: {why}")
        if self.truncated:
            parts.append(f"{self.truncated} longer than {self.max_length} tokens (truncated)")
        return "; ".join(parts)


@dataclass
class PreparedData:
    train: object          # datasets.Dataset
    eval: object | None
    report: DataReport


def prepare_training_data(data: DataConfig | dict, tokenizer, *, seed: int, completion_only_loss: bool) -> PreparedData:
    """Load, check, render and tokenize the configured data; split off the eval set."""
    from datasets import Dataset

    data = as_data_config(data)
    rows, main = _tokenized(data, None, tokenizer, completion_only_loss)
    report = DataReport(
        source=data.source, location=main.location, format=main.format, reason=main.reason, mapping=main.mapping,
        template=data.template, max_length=data.max_length, completion_only_loss=completion_only_loss,
        bad_rows_policy=data.bad_rows, rows_total=main.rows_total, rows_used=main.rows_used, dropped=main.dropped,
        dropped_by_reason=main.dropped_by_reason, rows_dropped=sum(main.dropped_by_reason.values()),
        truncated=main.truncated, system_prompt_added=main.system_prompt_added, tokens_total=main.tokens_total,
        tokens_trained=main.tokens_trained)

    if data.eval_source.strip():
        eval_spec = data.eval_source.strip()
        # "split:NAME" = another split of the same Hub dataset (or the same file, which then has no other split).
        split = eval_spec[len("split:"):] if eval_spec.startswith("split:") else None
        if split is not None and (not split or open_source(data.source).kind != "hub"):
            raise DataError(f"eval_source '{eval_spec}': 'split:NAME' picks another split of a Hub dataset; "
                            f"{data.source} is a file, so give a separate eval file or use eval_fraction")
        eval_rows, eval_report = _tokenized(data, data.source if split else eval_spec, tokenizer,
                                            completion_only_loss, split=split)
        train_rows = rows
        report.eval_source = asdict(eval_report)
        report.split = f"eval from {eval_spec}"
    elif data.eval_fraction > 0:
        train_rows, eval_rows = split_rows(rows, data.eval_fraction, seed)
        report.split = f"{data.eval_fraction:g} of rows held out for eval, seed {seed}"
    else:
        train_rows, eval_rows = rows, []
        report.split = "no eval set"
    if not train_rows:
        raise DataError(f"No rows left to train on after holding out {len(eval_rows)} for evaluation: "
                        f"{report.summary()}")
    report.rows_train, report.rows_eval = len(train_rows), len(eval_rows)

    def to_dataset(items):
        return Dataset.from_dict({"input_ids": [ids for ids, _ in items], "assistant_masks": [m for _, m in items]})

    return PreparedData(to_dataset(train_rows), to_dataset(eval_rows) if eval_rows else None, report)


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic train/eval split: the same seed holds out the same rows. Both keep file order."""
    if len(rows) < 2:
        return rows, []
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _tokenized(data: DataConfig, spec: str | None, tokenizer, completion_only_loss: bool, *,
               split: str | None = None) -> tuple[list, SourceReport]:
    source, detection, items = open_examples(data, spec, split=split)
    report = SourceReport(source.spec, source.location, detection.format, detection.reason, detection.mapping)
    bad, rows = BadRows(), []
    stop = data.bad_rows == "stop"
    for item in items:
        report.rows_total += 1
        if item.example is not None:
            rendered = render_example(item.example, tokenizer, data.template, completion_only_loss=completion_only_loss)
            if 1 not in rendered.mask[: data.max_length]:
                # SFTTrainer would silently drop this row after truncation: drop it here, visibly.
                prompt_tokens = rendered.mask.index(1) if 1 in rendered.mask else len(rendered.mask)
                item.code, item.error = "no_trainable_tokens", (
                    f"{item.record.where}: no token that counts in the loss lies within max_length "
                    f"{data.max_length} (the prompt alone is {prompt_tokens} tokens)")
            else:
                rows.append((rendered.input_ids, rendered.mask))
                report.truncated += len(rendered.input_ids) > data.max_length
                report.system_prompt_added += item.example.system_added
                report.tokens_total += min(len(rendered.input_ids), data.max_length)
                report.tokens_trained += sum(rendered.mask[: data.max_length])
                continue
        if stop:
            raise DataError(f"{source.describe()}: {item.error}. Fix the row, or set bad_rows to 'drop' to skip "
                            "bad rows (they are listed in the report).")
        bad.add(item.record, item.code, item.error)
    report.rows_used = len(rows)
    report.dropped, report.dropped_by_reason = bad.listed, bad.counts
    if not rows:
        first = bad.listed[0]["reason"] if bad.listed else "no rows"
        raise DataError(f"{source.describe()}: no usable rows ({bad.total} bad; first: {first})")
    return rows, report
