"""`qlora-studio`: the command line over the same core the app uses.

Each subcommand lives in its own module here with a `register(subparsers)` function.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("train", "runs", "data", "ui", "export", "chat")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-studio", description="Fine-tune language models with QLoRA.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
