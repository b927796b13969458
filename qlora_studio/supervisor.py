"""The one training process of this machine: started, watched and stopped from here.

A run is launched as `python -m qlora_studio.cli train ...`, the same command a user types,
in its own process group: an out-of-memory kill or a crash ends the run, not the app, and
an app restart or closed browser leaves it running. On several GPUs it is the same command with
`--gpus N [--fsdp]`, which starts one process per GPU through accelerate launch and stays their
parent, so the pid watched here still lives exactly as long as the run. A small JSON file in the
runs folder names the active run, so every app process and browser session sees the same trainer.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import threading
from pathlib import Path

from .config import StudioConfig
from .runs import FINAL_STATES, now_iso, pid_alive, read_json, read_status, request_stop, write_json_atomic
from .train import default_run_name


class TrainerBusy(RuntimeError):
    """Another training is running on this machine; the message says which."""


class TrainerSupervisor:
    def __init__(self, runs_root: str | Path):
        self.runs_root = Path(runs_root)
        self.runs_root.mkdir(parents=True, exist_ok=True)
        self._active_file = self.runs_root / ".active-run.json"
        self._thread_lock = threading.Lock()
        self._children: dict[int, subprocess.Popen] = {}

    @contextlib.contextmanager
    def _locked(self):
        """Serialize starts across threads and app processes sharing this runs folder."""
        with self._thread_lock, open(self.runs_root / ".supervisor.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _reap(self) -> None:
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]

    def active(self) -> dict | None:
        """{"run_dir", "pid", "started_at"} of the running training, or None."""
        self._reap()
        info = read_json(self._active_file)
        if not info or not pid_alive(info.get("pid")):
            return None
        status = read_status(info["run_dir"])
        # Train tab (issue #4): a resumed run's status.json keeps the previous process's final
        # state until the new process writes its own, so only a final state written by this
        # pid ends it; otherwise a second Resume click launched a second trainer on the run.
        if status.get("state") in FINAL_STATES and status.get("pid") in (None, info.get("pid")):
            return None
        return info

    def busy_message(self, info: dict) -> str:
        status = read_status(info["run_dir"])
        step = f" (step {status.get('step', 0)}/{status.get('max_steps') or '?'})" if status else ""
        return (f"Another training is running on this machine: {Path(info['run_dir']).name}{step}, "
                f"started {info.get('started_at', '')}. Wait for it, or stop it from the Train tab.")

    def start(self, config: StudioConfig, *, extra_env: dict | None = None, gpus: int = 1,
              fsdp: bool = False) -> Path:
        """Launch a new run of `config` in runs_root; raise TrainerBusy if one is running.

        `gpus` > 1 trains on that many GPUs (DDP), `fsdp` shards the model across them.
        """
        with self._locked():
            info = self.active()
            if info:
                raise TrainerBusy(self.busy_message(info))
            name = config.run_name or default_run_name(config)
            config = config.with_overrides([f"output_dir={self.runs_root}", f"run_name={name}"])
            run_dir = self.runs_root / name
            if (run_dir / "status.json").exists():
                raise TrainerBusy(f"A run named {name} already exists; pick another name or resume it")
            run_dir.mkdir(parents=True, exist_ok=True)
            config.save(run_dir / "config.yaml")
            return self._launch(run_dir, ["train", str(run_dir / "config.yaml"), *_scale_args(gpus, fsdp)],
                                extra_env)

    def resume(self, run_dir: str | Path, *, extra_env: dict | None = None, gpus: int | None = None,
               fsdp: bool | None = None) -> Path:
        """Continue a stopped or failed run; by default on as many GPUs (and FSDP or not) as it ran on."""
        run_dir = Path(run_dir)
        ran = read_json(run_dir / "run.json")
        gpus = int(ran.get("world_size") or 1) if gpus is None else gpus
        fsdp = ran.get("parallelism") == "fsdp" if fsdp is None else fsdp
        with self._locked():
            info = self.active()
            if info:
                raise TrainerBusy(self.busy_message(info))
            state = read_status(run_dir).get("state")
            if state == "completed":
                raise TrainerBusy(f"{run_dir.name} already completed; nothing to resume")
            return self._launch(run_dir, ["train", str(run_dir), "--resume", *_scale_args(gpus, fsdp)], extra_env)

    def _launch(self, run_dir: Path, args: list[str], extra_env: dict | None) -> Path:
        env = {**os.environ, **(extra_env or {}), "PYTHONUNBUFFERED": "1"}
        with open(run_dir / "console.log", "ab") as console:
            proc = subprocess.Popen([sys.executable, "-m", "qlora_studio.cli", *args], stdout=console,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        self._children[proc.pid] = proc
        write_json_atomic(self._active_file, {"run_dir": str(run_dir), "pid": proc.pid, "started_at": now_iso()})
        return run_dir

    def stop(self, run_dir: str | Path | None = None) -> str:
        """Ask the run to save its adapter and stop after the current step."""
        info = self.active()
        target = Path(run_dir) if run_dir else (Path(info["run_dir"]) if info else None)
        if target is None:
            return "Nothing is training."
        status = read_status(target)
        launched_here = info is not None and Path(info["run_dir"]) == target
        # Just after a resume, status.json still holds the previous process's final state.
        if status.get("state") in FINAL_STATES and not (launched_here and status.get("pid") != info.get("pid")):
            return f"{target.name} is not running."
        request_stop(target)
        return f"Stopping {target.name}: the adapter is saved at the end of the current step."

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the processes this supervisor started (tests, CLI)."""
        for proc in list(self._children.values()):
            proc.wait(timeout=timeout)
        self._reap()


def _scale_args(gpus: int, fsdp: bool) -> list[str]:
    """`qlora-studio train` options for a launch on several GPUs; none for one."""
    gpus = int(gpus or 1)
    if gpus <= 1 and not fsdp:
        return []
    return ["--gpus", str(gpus), *(["--fsdp"] if fsdp else [])]
