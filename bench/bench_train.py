"""Training throughput: the studio's CLI with a preset vs the tutorial recipe, same model, data and steps.

    python bench/bench_train.py [--device cpu|cuda] [--preset quick-cpu] [--steps 30] [--batch 8] [--repeats 1]

Both train from the same rows for the same number of optimizer steps at the same batch size.
Then both adapters are scored the same way, by this script: the loss on the answers of held-out rows.
With --repeats N the two alternate (studio first in even repeats, recipe first in odd ones) and the
speedup is the median of the N pairs: on a shared 2-core VM the same run's tokens/s drifts by up
to a third over minutes, so one pair can land in different phases.
Prints a summary and appends a row to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import alternate, append_result, command_line  # noqa: E402

REPO = BENCH.parent


def split_rows(source: Path, out: Path, eval_count: int, seed: int = 0) -> tuple[Path, Path]:
    rows = [line for line in source.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    train, held = rows[eval_count:], rows[:eval_count]
    (out / "train.jsonl").write_text("\n".join(train) + "\n")
    (out / "eval.jsonl").write_text("\n".join(held) + "\n")
    return out / "train.jsonl", out / "eval.jsonl"


def run_measured(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS MB of the process tree, polled)."""
    peak = [0.0]
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
        ps = psutil.Process(proc.pid)

        def poll():
            while proc.poll() is None:
                try:
                    rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                    peak[0] = max(peak[0], rss / 2**20)
                except psutil.Error:
                    pass
                time.sleep(0.2)

        watcher = threading.Thread(target=poll, daemon=True)
        start = time.perf_counter()
        watcher.start()
        proc.wait()
        wall = time.perf_counter() - start
        watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}")
    return wall, peak[0]


def studio_command(preset: Path, out: Path, train_file: Path, batch: int, *overrides: str) -> list[str]:
    """The studio's CLI on `preset`, trained on `train_file` (no eval split) into out/studio."""
    sets = [f"output_dir={out}", "run_name=studio", f"data.source={train_file}", "data.eval_fraction=0",
            f"train.batch_size={batch}", "train.grad_accum=1", *overrides]
    return [sys.executable, "-m", "qlora_studio.cli", "train", str(preset), *sum((["--set", o] for o in sets), [])]


def run_studio(command: list[str], out: Path) -> tuple[dict, float, float]:
    """Run a studio_command; return (its run.json, wall seconds, peak RSS MB)."""
    print("studio:", " ".join(command), flush=True)
    wall, rss = run_measured(command, out / "studio.log")
    return json.loads((out / "studio" / "run.json").read_text()), wall, rss


def heldout_loss(adapter: Path, eval_file: Path, device: str) -> float:
    """Mean loss on the assistant tokens of held-out rows, identical for every adapter scored."""
    import torch
    from peft import PeftModel

    from qlora_studio.config import DataConfig, QuantConfig
    from qlora_studio.data import prepare_training_data
    from qlora_studio.models import (detect_hardware, load_base_model, load_tokenizer, resolve_compute_dtype,
                                     resolve_model)

    hw = detect_hardware(device)
    path = resolve_model("embedded").path
    tokenizer = load_tokenizer(path)
    data = prepare_training_data(DataConfig(source=str(eval_file), eval_fraction=0.0, max_length=1024), tokenizer,
                                 seed=0, completion_only_loss=True)
    base = load_base_model(path, QuantConfig(), resolve_compute_dtype("auto", hw), hw)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in data.train:
            ids = torch.tensor([row["input_ids"]], device=model.device)
            labels = ids.clone()
            labels[0, torch.tensor(row["assistant_masks"]) == 0] = -100
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((labels[0, 1:] != -100).sum())
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--preset", default="quick-cpu")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="extra overrides for the studio run (e.g. to apply GPU preset settings)")
    p.add_argument("--eval-rows", type=int, default=20)
    p.add_argument("--repeats", type=int, default=1, help="studio/recipe pairs, alternating which runs first")
    p.add_argument("--no-record", action="store_true", help="print only; don't append to RESULTS.md")
    args = p.parse_args()

    from qlora_studio.data import resolve_source
    from qlora_studio.models import resolve_model

    out = BENCH / "out" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    train_file, eval_file = split_rows(Path(resolve_source("sample:persona")), out, args.eval_rows)
    model_path = resolve_model("embedded").path

    pairs = []
    for repeat in range(args.repeats):
        where = out / f"r{repeat}" if args.repeats > 1 else out
        where.mkdir(exist_ok=True)
        studio_cmd = studio_command(REPO / "presets" / f"{args.preset}.yaml", where, train_file, args.batch,
                                    f"train.max_steps={args.steps}", f"train.save_steps={args.steps}", *args.overrides)
        recipe_cmd = [sys.executable, str(BENCH / "tutorial_recipe.py"), "--model", model_path, "--train",
                      str(train_file), "--steps", str(args.steps), "--batch", str(args.batch), "--out",
                      str(where / "recipe"), "--device", args.device]

        def recipe_run():
            print("recipe:", " ".join(recipe_cmd), flush=True)
            return run_measured(recipe_cmd, where / "recipe.log")

        (studio, studio_wall, studio_rss), (recipe_wall, recipe_rss) = alternate(
            repeat, lambda: run_studio(studio_cmd, where), recipe_run)
        recipe = json.loads((where / "recipe" / "summary.json").read_text())
        pairs.append((where, studio, recipe, studio_wall, recipe_wall, studio_rss, recipe_rss))
        print(f"repeat {repeat + 1}: studio {studio['tokens_per_s']} tok/s, recipe {recipe['tokens_per_s']:.1f} tok/s",
              flush=True)

    # Held-out loss of the first pair (the same seed and config train the same adapters each time).
    where, studio, recipe, studio_wall, recipe_wall, _, _ = pairs[0]
    studio_loss = heldout_loss(where / "studio" / "adapter", eval_file, args.device)
    recipe_loss = heldout_loss(where / "recipe" / "adapter", eval_file, args.device)
    studio_tps = [p[1]["tokens_per_s"] for p in pairs]
    recipe_tps = [round(p[2]["tokens_per_s"], 1) for p in pairs]
    speedups = [round(a / b, 2) for a, b in zip(studio_tps, recipe_tps)]
    speedup = statistics.median(speedups)
    if args.device == "cuda":
        studio_mem = max(p[1]["peak_memory_mb"] for p in pairs)
        recipe_mem = max(p[2]["peak_mb"] for p in pairs)
    else:
        studio_mem, recipe_mem = max(p[5] for p in pairs), max(p[6] for p in pairs)
    summary = {
        "studio_tokens_per_s": studio_tps, "recipe_tokens_per_s": recipe_tps, "speedups": speedups,
        "speedup": round(speedup, 2),
        "studio_peak_mb": round(studio_mem), "recipe_peak_mb": round(recipe_mem),
        "studio_heldout_loss": round(studio_loss, 4), "recipe_heldout_loss": round(recipe_loss, 4),
        "loss_ratio": round(studio_loss / recipe_loss, 3) if recipe_loss and math.isfinite(recipe_loss) else None,
        "studio_train_s": [p[1]["train_seconds"] for p in pairs],
        "recipe_train_s": [round(p[2]["seconds"], 1) for p in pairs],
        "steps": args.steps, "batch": args.batch, "preset": args.preset, "out": str(out),
    }
    print(json.dumps(summary, indent=2))
    if not args.no_record:
        row = append_result(
            "Training throughput: studio preset vs tutorial recipe", args.device,
            ["preset", "steps x batch", "studio tok/s", "recipe tok/s", "speedup", "studio peak MB",
             "recipe peak MB", "studio held-out loss", "recipe held-out loss"],
            [args.preset + (" " + " ".join(args.overrides) if args.overrides else ""),
             f"{args.steps}x{args.batch}" + (f" x {args.repeats}" if args.repeats > 1 else ""),
             " / ".join(map(str, studio_tps)), " / ".join(map(str, recipe_tps)),
             f"{summary['speedup']}x" + (f" (median of {', '.join(f'{x}x' for x in speedups)})"
                                         if args.repeats > 1 else ""), summary["studio_peak_mb"],
             summary["recipe_peak_mb"], summary["studio_heldout_loss"], summary["recipe_heldout_loss"]],
            command_line())
        print(row)


if __name__ == "__main__":
    main()
