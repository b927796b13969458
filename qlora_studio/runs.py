"""Run folders: the contract between a training process and everything that watches it.

A run folder holds config.yaml, run.json, metrics.jsonl, status.json, train.log,
checkpoints/ and adapter/. Readers here never assume the writer is alive: a run whose
process died without saying so is reported as failed ("process ended unexpectedly").
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

STATES = ("running", "completed", "stopped", "failed")
FINAL_STATES = ("completed", "stopped", "failed")
STOP_FILE = "STOP"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: dict) -> None:
    """Readers polling the file never see it half-written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0): look at its state where /proc exists.
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def read_status(run_dir: str | Path) -> dict:
    """status.json, with a dead 'running' process reported as failed."""
    status = read_json(Path(run_dir) / "status.json")
    if status.get("state") == "running" and status.get("pid") and not pid_alive(status["pid"]):
        status = {**status, "state": "failed", "reason": "the training process ended unexpectedly "
                  "(killed, or out of memory); see train.log"}
    return status


def read_metrics(run_dir: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """Rows of metrics.jsonl from byte `offset` on, and the offset to continue from.

    Only complete lines are returned, so a reader racing the writer never sees half a row.
    """
    path = Path(run_dir) / "metrics.jsonl"
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
    except OSError:
        return [], offset
    end = chunk.rfind(b"\n") + 1
    rows = []
    for line in chunk[:end].splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows, offset + end


def adapter_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "adapter"


def checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.name.startswith("checkpoint-") and child.name.split("-")[-1].isdigit():
            if (child / "trainer_state.json").exists():  # a checkpoint cut off mid-write lacks it
                found.append(child)
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def last_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def request_stop(run_dir: str | Path) -> None:
    """Ask a running training to save and stop at the end of its current step."""
    (Path(run_dir) / STOP_FILE).write_text(now_iso())


@dataclass
class RunSummary:
    name: str
    path: str
    state: str
    reason: str = ""
    model: str = ""
    dataset: str = ""
    preset: str = ""
    step: int = 0
    max_steps: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    duration_s: float | None = None
    started_at: str = ""
    has_adapter: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize_run(run_dir: str | Path) -> RunSummary:
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    info = read_json(run_dir / "run.json")
    rows, _ = read_metrics(run_dir)
    train_rows = [r for r in rows if r.get("type") == "train" and r.get("loss") is not None]
    eval_rows = [r for r in rows if r.get("type") == "eval" and r.get("eval_loss") is not None]
    # elapsed_s restarts with each resumed process; run.json adds the sessions up.
    duration = info.get("train_seconds")
    if duration is None and train_rows:
        duration = train_rows[-1].get("elapsed_s")
    return RunSummary(
        name=run_dir.name, path=str(run_dir), state=status.get("state", "unknown"), reason=status.get("reason", ""),
        model=info.get("model", {}).get("display_name", ""), dataset=info.get("dataset", ""),
        preset=info.get("preset") or read_json(run_dir / "launch.json").get("preset", ""), step=int(status.get("step") or 0), max_steps=int(status.get("max_steps") or 0),
        train_loss=train_rows[-1]["loss"] if train_rows else None,
        eval_loss=eval_rows[-1]["eval_loss"] if eval_rows else None,
        duration_s=duration, started_at=status.get("started_at", ""),
        has_adapter=(adapter_dir(run_dir) / "adapter_config.json").exists(),
    )


def list_runs(root: str | Path) -> list[RunSummary]:
    """Every run folder under root, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [summarize_run(p) for p in root.iterdir() if p.is_dir() and (p / "status.json").exists()]
    return sorted(runs, key=lambda r: r.started_at, reverse=True)


def wait_for_state(run_dir: str | Path, states=FINAL_STATES, timeout: float = 600, poll: float = 0.2) -> dict:
    """Block until the run reaches one of `states` (used by tests and the CLI)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = read_status(run_dir)
        if status.get("state") in states:
            return status
        time.sleep(poll)
    raise TimeoutError(f"run {run_dir} did not reach {states} within {timeout}s")
