"""Shared fixtures: the real embedded model, and one real short training reused by many tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the network: anything that would download must fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def embedded_path() -> Path:
    from qlora_studio.models import embedded_model_dir
    return embedded_model_dir()


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_path):
    from qlora_studio.models import load_tokenizer
    return load_tokenizer(str(embedded_path))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, embedded_path) -> Path:
    """A completed run of the shipped quick CPU preset on sample:persona (real nf4 QLoRA)."""
    from qlora_studio.config import StudioConfig
    from qlora_studio.train import run_training

    out = tmp_path_factory.mktemp("runs")
    config = StudioConfig.load(REPO / "presets" / "quick-cpu.yaml").with_overrides(
        [f"output_dir={out}", "run_name=persona-quick"])
    return run_training(config)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningApp:
    """`python app.py` in its own process, as a user starts it; stopped at fixture teardown."""

    def __init__(self, tmp: Path, **env):
        import subprocess
        import sys
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.runs = tmp / "runs"
        self.log = open(tmp / "app.log", "w")
        full_env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(self.port),
                    "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "QLORA_STUDIO_RUNS": str(self.runs),
                    "QLORA_STUDIO_UPLOADS": str(tmp / "uploads"), **{k: str(v) for k, v in env.items()}}
        self.proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=full_env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> "RunningApp":
        import time
        import urllib.request
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"app not serving after {timeout}s:\n{self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def running_app(tmp_path_factory, embedded_path):
    app = RunningApp(tmp_path_factory.mktemp("app"), QLORA_STUDIO_MAX_UPLOAD_MB=1).wait_ready()
    yield app
    app.stop()
