"""`qlora-studio data inspect SOURCE`: what the trainer will see, before it trains.

Prints the detected format and why, the row count, every bad row with its reason,
token-length statistics and two rendered examples (trained text between « »); `--json`
prints the same as one JSON object. Mapping keys are those of the config's data.mapping.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..config import DATA_FORMATS, TEMPLATES, ConfigError, DataConfig


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="Inspect a dataset: format, bad rows, token lengths, rendered rows.")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    inspect = sub.add_parser("inspect", help="Detect the format, check every row and show what will be trained.",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect.add_argument("source", help="A file (JSONL, JSON, CSV, TSV, Parquet, TXT), sample:persona|instructions|"
                         "dialogue, or a Hub dataset id.")
    inspect.add_argument("--format", default="auto", choices=DATA_FORMATS, help="Row format (default: detect).")
    inspect.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                         help="Map a format field to your column, e.g. --map prompt=question (repeatable).")
    inspect.add_argument("--template", default="model", choices=TEMPLATES, help="Chat template used to render.")
    inspect.add_argument("--system-prompt", default="", help="System prompt for conversations without one.")
    inspect.add_argument("--max-length", type=int, default=DataConfig.max_length, help="Max tokens per row.")
    inspect.add_argument("--hub-config", default="", help="Hub dataset configuration.")
    inspect.add_argument("--split", default="train", help="Hub dataset split.")
    inspect.add_argument("--model", default="embedded", help="Model whose tokenizer renders the rows.")
    inspect.add_argument("--full-loss", action="store_true", help="Train on every token, not only completions.")
    inspect.add_argument("--sample-size", type=int, default=2000, help="Rows tokenized for statistics.")
    inspect.add_argument("--examples", type=int, default=2, help="Rendered examples to show.")
    inspect.add_argument("--json", action="store_true", help="Print one JSON object.")
    inspect.set_defaults(func=run_inspect)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def parse_mapping(items: list[str]) -> dict:
    mapping = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError("--map", f"expected FIELD=COLUMN, e.g. prompt=question; got {item!r}")
        mapping[key.strip()] = value.strip()
    return mapping


def run_inspect(args) -> int:
    from ..data import DataError, inspect_data
    from ..models import ModelError, load_tokenizer, resolve_model

    try:
        data = {"source": args.source, "format": args.format, "mapping": parse_mapping(args.map),
                "template": args.template, "system_prompt": args.system_prompt, "max_length": args.max_length,
                "hub_config": args.hub_config, "split": args.split}
        tokenizer = load_tokenizer(resolve_model(args.model).path)
        result = inspect_data(data, tokenizer, completion_only_loss=not args.full_loss, n_examples=args.examples,
                              sample_size=args.sample_size)
    except (DataError, ConfigError, ModelError) as e:
        if args.json:
            print(json.dumps({"error": str(e)}))
        else:
            print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        print(format_inspection(result))
    return 0


def format_inspection(result) -> str:
    d = result.to_dict()
    lines = [f"Source:    {d['source']} ({d['location']})",
             f"Format:    {d['format']} ({d['reason']})",
             f"Mapping:   {', '.join(f'{k}={v}' for k, v in d['mapping'].items())}",
             f"Template:  {d['template']}",
             f"Rows:      {d['rows_scanned']} read, {d['rows_valid']} usable, {d['bad_rows']['total']} bad"
             + ("" if d["complete"] else " (scan stopped early)")]
    bad = d["bad_rows"]
    if bad["total"]:
        lines.append("Bad rows:  " + ", ".join(f"{n} {k}" for k, n in bad["by_reason"].items()))
        for entry in bad["rows"][:50]:
            lines.append(f"  - {entry['reason']}")
        if bad["total"] > 50:
            lines.append(f"  ... and {bad['total'] - 50} more (use --json for the full list)")
    s = d["token_stats"]
    if s.get("count"):
        lines.append(f"Tokens:    min {s['min']}, median {s['median']}, mean {s['mean']}, p95 {s['p95']}, "
                     f"max {s['max']}; {s['truncated']} of {s['count']} longer than max_length {s['max_length']} "
                     "(truncated, not dropped)")
        if s.get("note"):
            lines.append(f"           {s['note']}; estimated truncated rows: {s['truncated_estimate']}")
    for example in result.examples:
        lines += ["", f"--- {example.where}: {example.n_tokens} tokens, {example.n_trained} in the loss "
                  "(between « ») ---", example.marked_text()]
    return "\n".join(lines)
