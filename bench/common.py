"""Shared by the benchmark scripts: machine description and the results table."""

from __future__ import annotations

import importlib.metadata as md
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine(device: str) -> str:
    if device == "cuda":
        import torch
        return f"{torch.cuda.get_device_name(0)}"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    import os
    return f"CPU {model}, {os.cpu_count()} cores"


def versions() -> str:
    names = ("torch", "transformers", "peft", "trl", "bitsandbytes", "gradio")
    out = []
    for name in names:
        try:
            out.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(out)


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=RESULTS.parent).stdout.strip()
    except OSError:
        return ""


def append_result(section: str, device: str, header: list[str], row: list, command: str) -> str:
    """Append one row under '## <section> (<CPU|GPU>)', creating the table if needed; return the row text."""
    heading = f"## {section} ({'GPU' if device == 'cuda' else 'CPU'})"
    cols = ["date", "machine", *header, "versions", "commit", "command"]
    values = [datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), machine(device), *row, versions(), git_rev(),
              f"`{command}`"]
    line = "| " + " | ".join(str(v) for v in values) + " |"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nEach script appends its rows here.\n"
    if heading not in text:
        text = text.rstrip() + f"\n\n{heading}\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
        text += line + "\n"
    else:
        start = text.index(heading)
        nxt = text.find("\n## ", start + len(heading))
        end = len(text) if nxt == -1 else nxt
        block = text[start:end].rstrip("\n") + "\n" + line + "\n"
        text = text[:start] + block + text[end:]
    RESULTS.write_text(text)
    return line


def alternate(repeat: int, ours, theirs) -> tuple:
    """Run `ours()` and `theirs()`, ours first in even repeats and theirs first in odd ones, since this
    machine's speed drifts over minutes; return (ours' result, theirs' result)."""
    if repeat % 2 == 0:
        first = ours()
        return first, theirs()
    second = theirs()
    return ours(), second


def command_line() -> str:
    return " ".join(["python", *[a if " " not in a else repr(a) for a in sys.argv]])
