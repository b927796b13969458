"""The quick preset vs LLaMA-Factory's own CLI: same data, one epoch, same batch size and LoRA/optimizer settings.

    python bench/bench_llamafactory.py --lf-python /path/to/venv/bin/python [--device cpu|cuda] [--batch 8] [--seeds 42]

LLaMA-Factory pins older transformers/peft/trl than the studio, so it lives in a virtual env of its own:

    python -m venv lfenv && lfenv/bin/pip install torch==2.13.0 && lfenv/bin/pip install --no-deps llamafactory
    lfenv/bin/pip install <its requirements except torchvision/torchaudio> bitsandbytes

On a CPU-only machine there is no torchvision/torchaudio build; LLaMA-Factory imports torchaudio at
start-up (text training never calls it), so this script puts an empty `torchaudio` module on its path.

Both train one epoch over the same rows (held-out rows removed) with the same hyperparameters; speed
settings are each tool's own defaults. Both process the same tokens, so time decides tokens/s.
Both adapters are scored by bench_train.heldout_loss on the same held-out answers.

Rows without a system message get, in the training file both tools read, the system prompt the
model's own chat template adds to such rows: LLaMA-Factory's `smollm2` template has a default of
its own ("... by Hugging Face." with a final period), which would train half the rows on other
text than the studio does. With --own-default-system LLaMA-Factory keeps its default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from bench_train import heldout_loss, run_measured, run_studio, split_rows, studio_command  # noqa: E402
from common import alternate, append_result, command_line  # noqa: E402

REPO = BENCH.parent


def llamafactory_config(model_path: str, data_dir: Path, out: Path, preset: dict, batch: int, bf16: bool) -> dict:
    lora, train = preset["lora"], preset["train"]
    return {
        "model_name_or_path": model_path, "trust_remote_code": False,
        "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "quantization_bit": 4, "quantization_method": "bnb", "quantization_type": preset["quant"]["type"],
        "double_quantization": preset["quant"]["double_quant"],
        "lora_rank": lora["r"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"], "lora_target": "all",
        "dataset": "persona", "dataset_dir": str(data_dir), "template": "smollm2",
        "cutoff_len": preset["data"]["max_length"], "overwrite_cache": True, "preprocessing_num_workers": 1,
        "output_dir": str(out), "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1,
        "learning_rate": train["learning_rate"], "num_train_epochs": 1.0, "lr_scheduler_type": train["scheduler"],
        "warmup_ratio": train["warmup_ratio"], "weight_decay": train["weight_decay"],
        "max_grad_norm": train["max_grad_norm"], "seed": train["seed"], "bf16": bf16,
        "use_cpu": not _cuda(), "dataloader_num_workers": 0,
    }


def template_default_system(tokenizer) -> str:
    """The system prompt the model's chat template adds to a conversation without one ('' if none)."""
    probe, user = "SYSTEM-PROBE-7f3a", [{"role": "user", "content": "USER-PROBE-7f3a"}]
    plain = tokenizer.apply_chat_template(user, tokenize=False)
    with_system = tokenizer.apply_chat_template([{"role": "system", "content": probe}, *user], tokenize=False)
    head, rest = with_system.split(probe, 1)
    if not plain.startswith(head) or not plain.endswith(rest):
        return ""
    return plain[len(head):len(plain) - len(rest)]


def with_system_prompt(source: Path, target: Path, system: str) -> int:
    """Copy messages rows, giving `system` to those without a system message; return how many got it."""
    rows, added = [], 0
    for line in source.read_text().splitlines():
        row = json.loads(line)
        if system and row["messages"][0]["role"] != "system":
            row["messages"] = [{"role": "system", "content": system}, *row["messages"]]
            added += 1
        rows.append(json.dumps(row))
    target.write_text("\n".join(rows) + "\n")
    return added


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lf-python", required=True, help="python of the virtual env with llamafactory installed")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--preset", default="quick-cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval-rows", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[42],
                   help="one pair of runs per seed; held-out losses are averaged, the speedup is the median")
    p.add_argument("--own-default-system", action="store_true",
                   help="leave rows without a system message to LLaMA-Factory's template default")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()

    from qlora_studio.data import resolve_source
    from qlora_studio.models import detect_hardware, load_tokenizer, resolve_compute_dtype, resolve_model

    out = BENCH / "out" / ("lf-" + time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True)
    train_file, eval_file = split_rows(Path(resolve_source("sample:persona")), out, args.eval_rows)
    model_path = resolve_model("embedded").path
    if not args.own_default_system:
        system = template_default_system(load_tokenizer(model_path))
        added = with_system_prompt(train_file, out / "train-system.jsonl", system)
        train_file = out / "train-system.jsonl"
        print(f"{added} training rows given the model's default system prompt {system!r}", flush=True)
    preset_path = REPO / "presets" / f"{args.preset}.yaml"
    preset = yaml.safe_load(preset_path.read_text())
    bf16 = resolve_compute_dtype(preset["quant"]["compute_dtype"], detect_hardware(args.device)) == "bf16"

    (out / "dataset_info.json").write_text(json.dumps({"persona": {
        "file_name": str(train_file), "formatting": "sharegpt", "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"}}}))
    stub = out / "stub"
    (stub / "torchaudio").mkdir(parents=True)
    (stub / "torchaudio" / "__init__.py").write_text("")

    studio_s, lf_s, studio_losses, lf_losses, studio_rss, lf_rss = [], [], [], [], [], []
    tokens = None
    for i, seed in enumerate(args.seeds):
        where = out / f"seed{seed}"
        where.mkdir()
        config = llamafactory_config(model_path, out, where / "lf", preset, args.batch, bf16)
        lf_config = where / "llamafactory.yaml"
        lf_config.write_text(yaml.safe_dump({**config, "seed": seed}))
        studio_cmd = studio_command(preset_path, where, train_file, args.batch, "train.max_steps=0", "train.epochs=1",
                                    "train.save_steps=100000", f"train.seed={seed}")
        lf_cmd = ["env", f"PYTHONPATH={stub}", "HF_HUB_OFFLINE=1", "DISABLE_VERSION_CHECK=1", args.lf_python, "-m",
                  "llamafactory.cli", "train", str(lf_config)]

        def lf_run():
            print("llamafactory:", " ".join(lf_cmd), flush=True)
            return run_measured(lf_cmd, where / "lf.log")

        (studio, _, s_rss), (_, l_rss) = alternate(i, lambda: run_studio(studio_cmd, where), lf_run)
        lf = json.loads((where / "lf" / "all_results.json").read_text())
        tokens = studio["num_tokens"]  # the same rows, once each, in both
        studio_s.append(studio["train_seconds"])
        lf_s.append(round(lf["train_runtime"], 1))
        studio_rss.append(s_rss)
        lf_rss.append(l_rss)
        studio_losses.append(round(heldout_loss(where / "studio" / "adapter", eval_file, args.device), 4))
        lf_losses.append(round(heldout_loss(where / "lf", eval_file, args.device), 4))
        print(f"seed {seed}: studio {studio_s[-1]} s, loss {studio_losses[-1]}; "
              f"LLaMA-Factory {lf_s[-1]} s, loss {lf_losses[-1]}", flush=True)

    speedups = [round(b / a, 2) for a, b in zip(studio_s, lf_s)]
    summary = {
        "seeds": args.seeds, "tokens": tokens, "studio_train_s": studio_s, "lf_train_s": lf_s,
        "studio_tokens_per_s": [round(tokens / t, 1) for t in studio_s],
        "lf_tokens_per_s": [round(tokens / t, 1) for t in lf_s],
        "speedups": speedups, "speedup": statistics.median(speedups),
        "studio_heldout_losses": studio_losses, "lf_heldout_losses": lf_losses,
        "studio_heldout_loss": round(statistics.mean(studio_losses), 4),
        "lf_heldout_loss": round(statistics.mean(lf_losses), 4),
        "studio_peak_mb": round(max(studio_rss)), "lf_peak_mb": round(max(lf_rss)), "out": str(out),
    }
    print(json.dumps(summary, indent=2))
    if not args.no_record:
        print(append_result(
            "Quick preset vs LLaMA-Factory (1 epoch, same data and hyperparameters)", args.device,
            ["preset", "tokens", "studio tok/s", "LLaMA-Factory tok/s", "speedup", "studio held-out loss",
             "LLaMA-Factory held-out loss", "studio peak MB", "LLaMA-Factory peak MB"],
            [args.preset + (f", seeds {' '.join(map(str, args.seeds))}" if len(args.seeds) > 1 else "")
             + (", LLaMA-Factory's default system prompt" if args.own_default_system else ", same system prompts"),
             tokens,
             " / ".join(map(str, summary["studio_tokens_per_s"])), " / ".join(map(str, summary["lf_tokens_per_s"])),
             f"{summary['speedup']}x" + (f" (median of {', '.join(f'{x}x' for x in speedups)})"
                                         if len(speedups) > 1 else ""),
             _mean_of(studio_losses), _mean_of(lf_losses),
             summary["studio_peak_mb"], summary["lf_peak_mb"]], command_line()))


def _mean_of(values: list[float]) -> str:
    mean = f"{statistics.mean(values):.4f}"
    return mean if len(values) == 1 else f"{mean} ({', '.join(map(str, values))})"


if __name__ == "__main__":
    main()
