"""`qlora-studio train CONFIG.yaml|RUN_DIR [--set key=value ...] [--resume]`."""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="Run a QLoRA training from a config or preset.",
                              description="Train a LoRA adapter. Exit code: 0 completed, 3 stopped, 1 failed, "
                                          "2 invalid config.")
    p.add_argument("config", help="A config/preset YAML, or a run folder (with --resume).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override a config field by its dotted name, e.g. --set train.max_steps=5 (repeatable).")
    p.add_argument("--resume", action="store_true", help="Continue the run from its last checkpoint.")
    p.set_defaults(func=run)


def load_config(path: str, overrides: list[str], resume: bool):
    from ..config import StudioConfig

    source = Path(path)
    config = StudioConfig.load(source)
    if source.is_dir():
        # A run folder: its parent is the output dir and its name the run name.
        overrides = [f"output_dir={source.resolve().parent}", f"run_name={source.name}", *overrides]
    return config.with_overrides(overrides)


def preset_name(path: str) -> str:
    """The preset's name when the config is one of the shipped presets, else ''."""
    from ..paths import PRESETS_DIR

    source = Path(path).resolve()
    return source.stem if source.parent == PRESETS_DIR.resolve() and source.suffix == ".yaml" else ""


def run(args) -> int:
    from ..config import ConfigError
    from ..models import ModelError
    from ..train import EXIT_COMPLETED, EXIT_FAILED, EXIT_STOPPED, TrainingFailed, TrainingStopped, run_training

    try:
        config = load_config(args.config, args.overrides, args.resume)
        run_dir = run_training(config, resume=args.resume, preset=preset_name(args.config))
    except ConfigError as e:
        print(f"error: invalid config: {e}", file=sys.stderr)
        return 2
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except TrainingFailed as e:
        print(f"failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"completed: {run_dir}")
    return EXIT_COMPLETED
