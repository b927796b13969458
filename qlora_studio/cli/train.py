"""`qlora-studio train CONFIG.yaml|RUN_DIR [--set key=value ...] [--resume] [--gpus N [--fsdp]]`.

Runs unchanged under `torchrun --nproc_per_node N -m qlora_studio.cli train ...` and
`accelerate launch -m qlora_studio.cli train ...`; `--gpus N` starts it that way itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
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
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="Train on N GPUs of this machine, one process each (DDP: the effective batch is N times "
                        "larger, an epoch N times fewer steps), started through `accelerate launch`. On a machine "
                        "without GPUs: N CPU processes through torchrun (gloo), for testing.")
    p.add_argument("--fsdp", action="store_true",
                   help="With --gpus N: shard the base model across the GPUs (FSDP + QLoRA, "
                        "presets/accelerate/fsdp_qlora.yaml) for a model that does not fit on one; needs bf16.")
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
    if args.gpus != 1 or args.fsdp:
        return run_distributed(args)
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
        # Under torchrun / accelerate launch any other code reads as a crash (and its exit code is
        # its own anyway): a rank that stopped cleanly exits 0; status.json and --gpus say "stopped".
        return EXIT_STOPPED if int(os.environ.get("WORLD_SIZE", "1")) == 1 else EXIT_COMPLETED
    except TrainingFailed as e:
        print(f"failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"completed: {run_dir}")
    return EXIT_COMPLETED


# -- --gpus N: this command again, once per GPU, through accelerate launch (torchrun on CPU) --------

def launcher_command(processes: int, fsdp: bool, cuda: bool) -> list[str]:
    """The launcher that starts `processes` copies of a `-m module ...` command."""
    from ..paths import PRESETS_DIR

    if cuda:
        config = PRESETS_DIR / "accelerate" / ("fsdp_qlora.yaml" if fsdp else "ddp.yaml")
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                "--num_processes", str(processes), "--main_process_port", "0"]
    # accelerate starts several CPU processes only through MPI; torchrun needs nothing.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def run_distributed(args) -> int:
    """Check the config and run folder here, start the ranks, and exit as the run ended (0/3/1/2)."""
    from ..config import ConfigError
    from ..estimate import scale_problems
    from ..models import detect_hardware
    from ..runs import read_status
    from ..train import EXIT_COMPLETED, EXIT_FAILED, EXIT_STOPPED, prepare_run

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("error: --gpus starts the processes itself; under torchrun or accelerate launch leave it out",
              file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, args.overrides, args.resume)
        hardware = detect_hardware()
        problems = scale_problems(config, hardware, args.gpus, args.fsdp)
        if problems:
            raise problems[0]
        # Named here, so every rank and this process agree on the folder to watch.
        config, run_dir = prepare_run(config, args.resume)
    except ConfigError as e:
        print(f"error: invalid config: {e}", file=sys.stderr)
        return 2
    command = [*launcher_command(args.gpus, args.fsdp, hardware.device == "cuda"), "-m", "qlora_studio.cli",
               "train", args.config, *(f"--set={item}" for item in args.overrides),
               f"--set=run_name={config.run_name}", *(["--resume"] if args.resume else [])]
    before = read_status(run_dir)  # a resumed run's last outcome, until rank 0 writes its own
    proc = subprocess.Popen(command)
    # Ctrl-C in a terminal reaches the launcher and the ranks directly; SIGTERM (the app, kill) is passed
    # on. (Set after the start: an ignored SIGINT would be inherited by the launcher.)
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    status = read_status(run_dir)
    if status == before:
        status = {}  # the ranks never got as far as writing a status
    state, reason = status.get("state"), status.get("reason", "")
    if state == "completed":
        print(f"completed: {run_dir}")
        return EXIT_COMPLETED
    if state == "stopped":
        print(f"stopped: {reason}", file=sys.stderr)
        return EXIT_STOPPED
    if state == "failed" and reason.startswith("invalid config"):
        return 2
    print(f"failed: {reason or f'the launcher exited with {code}'}", file=sys.stderr)
    return EXIT_FAILED
