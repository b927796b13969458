"""What the app shares across browser sessions (settings, the one trainer, loaded models)
and what each session keeps for itself (gr.State)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from ..paths import ASSETS_DIR
from ..supervisor import TrainerSupervisor


def _persistent_root() -> Path | None:
    """A Hugging Face Space with persistent storage mounts it at /data."""
    data = Path("/data")
    return data if data.is_dir() and os.access(data, os.W_OK) else None


@dataclass
class AppSettings:
    runs_root: Path
    uploads_dir: Path
    allowed_data_dirs: list[Path]
    demo: bool = False
    max_upload_mb: int = 200
    auth: tuple[str, str] | None = None

    @classmethod
    def from_env(cls, env: dict | None = None) -> "AppSettings":
        env = os.environ if env is None else env
        base = _persistent_root()
        runs_root = Path(env.get("QLORA_STUDIO_RUNS") or (base / "runs" if base else Path("runs"))).resolve()
        uploads = Path(env.get("QLORA_STUDIO_UPLOADS") or (base / "uploads" if base else runs_root.parent /
                                                          "uploads")).resolve()
        allowed = [ASSETS_DIR / "samples", uploads, Path("data").resolve()]
        allowed += [Path(p).resolve() for p in env.get("QLORA_STUDIO_DATA_DIRS", "").split(os.pathsep) if p]
        auth = None
        if env.get("QLORA_STUDIO_AUTH"):
            user, sep, password = env["QLORA_STUDIO_AUTH"].partition(":")
            if not sep or not user or not password:
                raise ValueError("QLORA_STUDIO_AUTH must be user:password")
            auth = (user, password)
        return cls(runs_root=runs_root, uploads_dir=uploads, allowed_data_dirs=allowed,
                   demo=env.get("QLORA_STUDIO_DEMO", "").lower() in ("1", "true", "yes", "on"),
                   max_upload_mb=int(env.get("QLORA_STUDIO_MAX_UPLOAD_MB", "200")), auth=auth)


@dataclass
class StudioContext:
    """Machine-wide resources; guarded, because every browser session shares them."""
    settings: AppSettings
    trainer: TrainerSupervisor
    model_pool: Any = None
    hardware: Any = None
    # browser session -> the token of the one live-view stream it keeps (train_tab.follow)
    followers: dict = field(default_factory=dict)

    @property
    def runs_root(self) -> Path:
        return self.settings.runs_root

    @classmethod
    def create(cls, settings: AppSettings | None = None) -> "StudioContext":
        from ..chat import ModelPool
        from ..models import detect_hardware

        settings = settings or AppSettings.from_env()
        settings.runs_root.mkdir(parents=True, exist_ok=True)
        settings.uploads_dir.mkdir(parents=True, exist_ok=True)
        return cls(settings=settings, trainer=TrainerSupervisor(settings.runs_root), model_pool=ModelPool(),
                   hardware=detect_hardware())


@dataclass
class SessionStates:
    """Per-browser-session state: created inside the Blocks, so each visitor gets their own."""
    data: gr.State = field(default=None)
    run: gr.State = field(default=None)

    @classmethod
    def create(cls) -> "SessionStates":
        return cls(data=gr.State(None), run=gr.State(None))
