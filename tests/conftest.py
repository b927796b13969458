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
