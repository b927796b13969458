"""The data step: load any common format, check every row, and render exactly what is trained.

    prepare_training_data(data_config, tokenizer, seed=..., completion_only_loss=...)  -> PreparedData
    inspect_data(data_config, tokenizer, ...)                                           -> Inspection
    preview_rows(data_config, tokenizer, start=..., count=...)                          -> [PreviewRow]
    resolve_source("sample:persona")                                                    -> local path

Modules: sources (files, samples, Hub; streaming), formats (detection, mapping, row checks),
render (template + loss mask), pipeline (rows -> examples), prepare (datasets for the trainer),
inspection (statistics, histogram, preview for the CLI and the Dataset tab).
"""

from .errors import DataError
from .formats import FORMATS, REASONS, Detection, Example, RowError, detect_format, row_to_example
from .inspection import Inspection, PreviewRow, histogram, inspect_data, preview_rows
from .pipeline import as_data_config, open_examples
from .prepare import DataReport, PreparedData, prepare_training_data, split_rows
from .render import Rendered, render_example
from .sources import SAMPLES, Source, confine_path, iter_records, open_source, resolve_source, samples_dir

__all__ = [
    "DataError", "FORMATS", "REASONS", "Detection", "Example", "RowError", "detect_format", "row_to_example",
    "Inspection", "PreviewRow", "histogram", "inspect_data", "preview_rows", "as_data_config", "open_examples",
    "DataReport", "PreparedData", "prepare_training_data", "split_rows", "Rendered", "render_example",
    "SAMPLES", "Source", "confine_path", "iter_records", "open_source", "resolve_source", "samples_dir",
]
