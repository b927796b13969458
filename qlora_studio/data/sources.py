"""Where rows come from: a sample, a local file, or a Hugging Face dataset.

Files are read as a stream of records, one at a time, so previewing or validating a 1 GB
JSONL never holds the file in memory. A record that cannot be read (invalid JSON, not an
object) is yielded with its error instead of a value, so the caller can report it with its
line number and keep going.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..paths import ASSETS_DIR
from .errors import DataError

SAMPLES = {"persona": "persona.jsonl", "instructions": "instructions.jsonl", "dialogue": "dialogue.txt"}
SAMPLE_PREFIX = "sample:"
FILE_TYPES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet", ".pq": "parquet", ".txt": "txt", ".text": "txt", ".md": "txt"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CHUNK = 1 << 20

# Long cells (whole conversations as JSON in a CSV) exceed the csv module's 128 KiB default.
csv.field_size_limit(2**31 - 1)


def samples_dir() -> Path:
    return ASSETS_DIR / "samples"


@dataclass(frozen=True)
class Source:
    spec: str            # what the user typed
    kind: str            # "sample" | "file" | "hub"
    location: str        # a local path, or the Hub dataset id
    file_type: str = ""  # jsonl/json/csv/tsv/parquet/txt for files
    hub_config: str = ""
    split: str = "train"

    def describe(self) -> str:
        if self.kind == "hub":
            extra = f" (config {self.hub_config})" if self.hub_config else ""
            return f"Hub dataset {self.location}{extra}, split {self.split}"
        return f"{self.file_type.upper()} file {self.location}"


@dataclass
class Record:
    row: int                 # 1-based: the line for line-based files, else the row/element number
    where: str               # how the user finds it: "line 7", "row 5 (line 6)", "element 3"
    value: dict | None = None
    error: str | None = None  # set when the record could not be read; `code` says which kind
    code: str = ""


def resolve_source(spec: str) -> str:
    """The local path of a sample or file (absolute), or the Hub id unchanged."""
    return open_source(spec).location


def open_source(spec: str, *, hub_config: str = "", split: str = "train") -> Source:
    spec = (spec or "").strip()
    if not spec:
        raise DataError("No data source given: choose a file, a sample (sample:persona) or a Hub dataset id.")
    if spec.startswith(SAMPLE_PREFIX):
        name = spec[len(SAMPLE_PREFIX):]
        if name not in SAMPLES:
            raise DataError(f"Unknown sample '{name}'; samples are: {', '.join(SAMPLE_PREFIX + s for s in SAMPLES)}")
        path = samples_dir() / SAMPLES[name]
        if not path.exists():
            raise DataError(f"Sample file {path} is missing; regenerate it with python assets/samples/make_samples.py")
        return Source(spec, "sample", str(path), FILE_TYPES[path.suffix])
    path = Path(spec).expanduser()
    if path.is_dir():
        raise DataError(f"{spec} is a folder; choose a data file inside it (JSONL, JSON, CSV, TSV, Parquet or TXT).")
    if path.exists():
        return Source(spec, "file", str(path.resolve()), _file_type(path))
    looks_like_file = path.suffix.lower() in FILE_TYPES or spec.startswith((".", "/", "~")) or os.sep + os.sep in spec
    if looks_like_file or not _HUB_ID.match(spec):
        raise DataError(f"Data file {spec} does not exist.")
    return Source(spec, "hub", spec, "", hub_config, split or "train")


def confine_path(spec: str, allowed_dirs) -> Source:
    """Open a source typed by a user of a shared app: files must lie inside one of `allowed_dirs`."""
    spec = (spec or "").strip()
    if spec.startswith(SAMPLE_PREFIX):
        return open_source(spec)
    # Check the folder before touching the file, so answers never reveal what exists elsewhere.
    real = Path(os.path.realpath(Path(spec).expanduser()))
    roots = [Path(os.path.realpath(Path(d).expanduser())) for d in allowed_dirs or []]
    if not any(real == root or root in real.parents for root in roots):
        allowed = ", ".join(str(r) for r in roots) or "none configured"
        raise DataError(f"{spec} is outside the folders this app may read (allowed: {allowed}). "
                        "Upload the file instead, or move it into an allowed folder.")
    return open_source(spec)


def looks_like_hub_id(spec: str) -> bool:
    """'org/name' or 'name' without a file extension or path prefix (says nothing about existence)."""
    spec = (spec or "").strip()
    return (bool(_HUB_ID.match(spec)) and not spec.startswith((".", "/", "~"))
            and Path(spec).suffix.lower() not in FILE_TYPES)


def _file_type(path: Path) -> str:
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path.name}: unsupported file type '{path.suffix or '(none)'}'; use one of: "
                        f"{', '.join(sorted(FILE_TYPES))}")
    return kind


def iter_records(source: Source) -> Iterator[Record]:
    """Yield every record of the source in order, streaming."""
    if source.kind == "hub":
        yield from _iter_hub(source)
        return
    reader = {"jsonl": _iter_jsonl, "json": _iter_json, "csv": _iter_csv, "tsv": _iter_csv,
              "parquet": _iter_parquet, "txt": _iter_txt}[source.file_type]
    yield from reader(source)


def _object_record(row: int, where: str, value) -> Record:
    if isinstance(value, dict):
        return Record(row, where, value)
    kind = "array" if isinstance(value, list) else type(value).__name__
    return Record(row, where, error=f"{where}: expected a JSON object with named fields, got a {kind}",
                  code="not_an_object")


def _iter_jsonl(source: Source) -> Iterator[Record]:
    with open(source.location, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"line {number}"
            try:
                value = json.loads(raw)
            except UnicodeDecodeError:
                yield Record(number, where, error=f"{where}: not valid UTF-8 text", code="invalid_json")
                continue
            except json.JSONDecodeError as e:
                yield Record(number, where, error=f"invalid JSON on line {number}: {e.msg} (column {e.colno})",
                             code="invalid_json")
                continue
            yield _object_record(number, where, value)


def _iter_json(source: Source) -> Iterator[Record]:
    """A JSON array (streamed element by element), JSONL saved as .json, or {"key": [rows]}."""
    with open(source.location, encoding="utf-8") as f:
        head = f.read(4096).lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        yield from _iter_json_array(source.location)
        return
    if head.startswith("{"):
        first_line, _, rest = head.partition("\n")
        with contextlib.suppress(json.JSONDecodeError):
            if isinstance(json.loads(first_line), dict) and rest.strip():
                yield from _iter_jsonl(source)  # JSON Lines with a .json name: common, and streamable
                return
        # One object, parsed whole: either {"data": [rows]} (also train/rows/examples/records) or a single row.
        try:
            with open(source.location, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{source.spec}: invalid JSON on line {e.lineno}: {e.msg}") from None
        key = next((k for k in ("train", "data", "rows", "examples", "records") if isinstance(data.get(k), list)), None)
        if key is None:
            yield _object_record(1, "line 1", data)
            return
        for i, value in enumerate(data[key], 1):
            yield _object_record(i, f"element {i} of '{key}'", value)
        return
    raise DataError(f"{source.spec}: not a JSON array or object (starts with {head[:20]!r})")


def _iter_json_array(path: str) -> Iterator[Record]:
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, lines_before, row = "", 0, 0, 0

        def fill() -> bool:
            nonlocal buf, pos, lines_before
            more = f.read(_CHUNK)
            if not more:
                return False
            lines_before += buf.count("\n", 0, pos)
            buf, pos = buf[pos:] + more, 0
            return True

        def skip_ws() -> bool:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                    pos += 1
                if pos < len(buf) or not fill():
                    return pos < len(buf)

        skip_ws()
        pos += 1  # the opening '['
        while True:
            if not skip_ws():
                yield Record(row + 1, f"element {row + 1}", error="the JSON array is not closed (missing ']')",
                             code="invalid_json")
                return
            if buf[pos] == "]":
                return
            if row:
                if buf[pos] != ",":
                    line = lines_before + buf.count("\n", 0, pos) + 1
                    yield Record(row + 1, f"line {line}", error=f"invalid JSON on line {line}: expected ',' "
                                 f"between elements", code="invalid_json")
                    return
                pos += 1
                skip_ws()
            line = lines_before + buf.count("\n", 0, pos) + 1
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    if fill():
                        line = lines_before + buf.count("\n", 0, pos) + 1
                        continue
                    yield Record(row + 1, f"line {line}", error=f"invalid JSON on line {e.lineno + lines_before}: "
                                 f"{e.msg} (element {row + 1}; the rest of the array cannot be read)",
                                 code="invalid_json")
                    return
            row += 1
            yield _object_record(row, f"element {row} (line {line})", value)
            pos = end


def _iter_csv(source: Source) -> Iterator[Record]:
    delimiter = "\t" if source.file_type == "tsv" else ","
    with open(source.location, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            return
        for i, row in enumerate(reader, 1):
            where = f"row {i} (line {reader.line_num})"
            extra = row.pop(None, None)
            if extra:
                yield Record(i, where, error=f"{where}: {len(extra)} more cells than the header has columns",
                             code="bad_shape")
                continue
            # A short row gives None for the cells it lacks: those columns are missing, not empty.
            yield Record(i, where, {k: v for k, v in row.items() if v is not None})


def _iter_parquet(source: Source) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source.location)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{source.spec}: cannot read as Parquet: {e}") from None
    i = 0
    for batch in parquet.iter_batches(batch_size=512):
        for value in batch.to_pylist():
            i += 1
            yield Record(i, f"row {i}", value)


def _iter_txt(source: Source) -> Iterator[Record]:
    """Paragraphs separated by blank lines are rows; a file without blank lines has a row per line."""
    with open(source.location, encoding="utf-8", errors="replace") as f:
        head = f.read(_CHUNK)
    by_paragraph = re.search(r"\n[ \t]*\r?\n", head.strip("\r\n")) is not None
    row = 0
    with open(source.location, encoding="utf-8", errors="replace") as f:
        block: list[str] = []
        start = 0
        for number, line in enumerate(f, 1):
            text = line.rstrip("\r\n")
            if not by_paragraph:
                if text.strip():
                    row += 1
                    yield Record(row, f"line {number}", {"text": text})
                continue
            if text.strip():
                if not block:
                    start = number
                block.append(text)
            elif block:
                row += 1
                yield Record(row, f"line {start}", {"text": "\n".join(block)})
                block = []
        if block:
            row += 1
            yield Record(row, f"line {start}", {"text": "\n".join(block)})


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_hub_dataset(repo_id: str, config: str = "", split: str = "train"):
    """`datasets.load_dataset` with a clear DataError instead of a hang or a stack trace offline."""
    import datasets

    offline = is_offline()
    try:
        with _offline_mode(offline):
            return datasets.load_dataset(repo_id, config or None, split=split or "train")
    except (ValueError, KeyError) as e:
        if "split" in str(e).lower():
            raise DataError(f"Hub dataset {repo_id}: no split '{split}' ({e})") from None
        raise DataError(f"Hub dataset {repo_id}: {e}") from None
    except Exception as e:  # connection errors, missing repos and cache misses come as many types
        if offline:
            raise DataError(f"Hub dataset {repo_id} needs the network or the local Hugging Face cache: it is not in "
                            "the cache and HF_HUB_OFFLINE=1 is set. Download it once online, or use a local file.") from None
        raise DataError(f"Could not load Hub dataset {repo_id}"
                        f"{f' (config {config})' if config else ''}: {type(e).__name__}: {e}. It needs the network "
                        "or the local cache; check the id, or use a local file.") from None


@contextlib.contextmanager
def _offline_mode(offline: bool):
    # datasets and huggingface_hub read HF_HUB_OFFLINE once at import; honour a later change, so an
    # offline machine fails at once from the cache lookup instead of waiting on network timeouts.
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _iter_hub(source: Source) -> Iterator[Record]:
    dataset = load_hub_dataset(source.location, source.hub_config, source.split)
    for i, value in enumerate(dataset, 1):
        yield Record(i, f"row {i}", dict(value))
