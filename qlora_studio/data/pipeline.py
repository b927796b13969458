"""Source -> detected format -> examples, one row at a time, with every bad row accounted for."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator

from ..config import ConfigError, DataConfig, StudioConfig
from .errors import DataError
from .formats import REASONS, Detection, Example, RowError, detect_format, row_to_example
from .sources import Record, Source, iter_records, open_source

DETECT_ROWS = 50      # rows read before deciding the format
MAX_LISTED_BAD = 1000  # bad rows listed one by one in a report; counts stay exact past it


def as_data_config(data) -> DataConfig:
    """A DataConfig from a DataConfig or the dict the UI keeps in its state (validated like a config)."""
    if isinstance(data, DataConfig):
        return data
    if isinstance(data, dict):
        try:
            return StudioConfig.from_dict({"data": data}).data
        except ConfigError as e:
            raise DataError(f"data.{e.field.removeprefix('data.')}: {e.reason}") from None
    raise TypeError(f"expected a DataConfig or dict, got {type(data).__name__}")


@dataclass
class Item:
    record: Record
    example: Example | None = None
    error: str | None = None   # "line 7: missing column 'output'"
    code: str = ""


@dataclass
class BadRows:
    """Bad rows, listed with where and why, counted by reason."""
    listed: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)

    def add(self, record: Record, code: str, message: str) -> None:
        label = REASONS.get(code, code)
        self.counts[label] = self.counts.get(label, 0) + 1
        if len(self.listed) < MAX_LISTED_BAD:
            self.listed.append({"row": record.row, "where": record.where, "reason": message, "kind": label})

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def open_examples(data: DataConfig, source_spec: str | None = None, *, split: str | None = None,
                  source: Source | None = None) -> tuple[Source, Detection, Iterator[Item]]:
    """Open the source, detect the format from its first rows, and stream Items (good or bad) in order."""
    source = source or open_source(source_spec or data.source, hub_config=data.hub_config, split=split or data.split)
    records = iter_records(source)
    head = list(itertools.islice(records, DETECT_ROWS))
    if not head:
        raise DataError(f"{source.describe()} has no rows.")
    readable = [r.value for r in head if r.value is not None]
    if not readable:
        raise DataError(f"{source.describe()}: none of the first {len(head)} rows could be read; first problem: "
                        f"{head[0].error}")
    columns = list(dict.fromkeys(k for row in readable for k in row))
    detection = detect_format(columns, readable, format=data.format, mapping=data.mapping)
    return source, detection, _items(itertools.chain(head, records), detection, data.system_prompt)


def _items(records, detection: Detection, system_prompt: str) -> Iterator[Item]:
    for record in records:
        if record.error is not None:
            yield Item(record, error=record.error if record.error.startswith(("invalid JSON", record.where))
                       else f"{record.where}: {record.error}", code=record.code)
            continue
        try:
            yield Item(record, row_to_example(record.value, detection, system_prompt))
        except RowError as e:
            yield Item(record, error=f"{record.where}: {e}", code=e.code)
