"""Side-by-side chat: memory and speed of one base + adapter answering twice vs one model answering once.

    python bench/bench_chat.py [--device cpu|cuda] [--adapter RUN_OR_ADAPTER] [--quant nf4|none]
                               [--max-new-tokens 64] [--repeats 3]

Each setup is loaded in its own process, so one setup's memory never counts towards another's:
  base alone    the base model, loaded as chat loads it;
  side-by-side  chat's loaded pair: that base + the LoRA adapter, answering for both columns;
  two copies    the naive compare: a second copy of the base for the base column.
"MB" is the memory a setup adds once loaded and warmed up (tensor bytes held in brackets). The
≤1.1x target compares the peak while answering side by side with the peak while giving one
adapted answer, from the same loaded pair. Times: a single answer (adapter on, one row, plain
generate) vs a side-by-side answer (both rows in one batched generate, streamed), both forced to
exactly --max-new-tokens tokens; plus the fallback that runs the base side with the adapter
disabled and then the adapted side. Time to first token per side is from the streamed answer.
Without --adapter, a random non-zero LoRA adapter (r=16 on all linear layers, like the quick-cpu
preset) is made on the embedded model. Prints the results and appends a row to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import append_result, command_line  # noqa: E402

PROMPT = "Tell me about the history of sailing ships."


def make_adapter(folder: Path, quant: str) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_studio.config import StudioConfig
    from qlora_studio.models import EMBEDDED_DISPLAY, resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("embedded").path, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(folder / "adapter")
    config = folder / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": EMBEDDED_DISPLAY}))
    StudioConfig().with_overrides([f"quant.type={quant}"]).save(folder / "config.yaml")
    return folder


# -- memory -------------------------------------------------------------------------------

def memory_now(device: str):
    """A function returning memory in MiB: resident set on CPU, allocated tensors on CUDA."""
    import psutil
    import torch

    process = psutil.Process()

    def now() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated() / 2**20
        return process.memory_info().rss / 2**20

    return now


def trim() -> None:
    """Collect garbage and hand freed heap back to the OS, so RSS shows what is still held
    (loading a 4-bit model briefly holds full-precision weights, which glibc would otherwise keep)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakSampler:
    """The highest memory reading while a block runs (polled every 2 ms on CPU; CUDA tracks its own)."""

    def __init__(self, device: str, now):
        self.device, self.now, self.peak = device, now, 0.0

    def __enter__(self):
        if self.device == "cuda":
            import torch
            torch.cuda.reset_peak_memory_stats()
            return self
        self.done = threading.Event()

        def poll():
            while not self.done.is_set():
                self.peak = max(self.peak, self.now())
                time.sleep(0.002)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            import torch
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.done.set()
            self.thread.join()
            self.peak = max(self.peak, self.now())


def torch_module(model):
    """The module itself: a LoadedPair holds its PeftModel in .model."""
    from qlora_studio.chat import LoadedPair

    return model.model if isinstance(model, LoadedPair) else model


def weights_mb(models) -> float:
    """Bytes of the distinct parameter and buffer storages the models hold (shared ones once)."""
    seen, total = set(), 0
    for model in models:
        for tensor in [*torch_module(model).parameters(), *torch_module(model).buffers()]:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total / 2**20


# -- one worker per process ---------------------------------------------------------------

def worker(kind: str, adapter: str, device: str, quant: str, max_new_tokens: int, repeats: int) -> dict:
    import peft  # noqa: F401  (imported before the baseline: libraries are not model memory)
    import torch
    import transformers  # noqa: F401

    from qlora_studio.chat import GenerationSettings, chat_compute_dtype, load_pair, render_prompt, resolve_adapter
    from qlora_studio.chat_engine import ADAPTED, BASE, Generation
    from qlora_studio.models import detect_hardware, load_base_model, load_tokenizer, resolve_model

    info = resolve_adapter(adapter)
    if quant:
        info.quant.type = quant
    now = memory_now(device)
    hw = detect_hardware(device)
    base_path = resolve_model(info.base_model).path
    tokenizer = load_tokenizer(base_path)
    prompt = render_prompt(tokenizer, [{"role": "user", "content": PROMPT}], info.template)
    trim()
    before = now()
    if kind == "base":
        models = [load_base_model(base_path, info.quant, chat_compute_dtype(info.compute_dtype, hw), hw)]
    else:
        pair = load_pair(info, device)
        models = [pair]
        if kind == "two":
            models.append(load_base_model(base_path, info.quant, pair.dtype, hw))
    # Weights may be memory-mapped from the checkpoint and become resident only when touched:
    # one short answer per model touches them all before memory is read.
    warm = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    for model in models:
        net = torch_module(model)
        with torch.inference_mode():
            net.generate(**{k: v.to(net.device) for k, v in warm.items()}, max_new_tokens=2, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    trim()
    result = {"kind": kind, "resident_mb": round(now() - before, 1), "weights_mb": round(weights_mb(models), 1)}
    if kind != "pair":
        return result

    settings = GenerationSettings(greedy=True, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    peaks: dict = {}

    def timed(sides: list[int], mixed: bool) -> tuple[float, dict]:
        pair.mixed_batch = mixed
        generation = Generation(pair, [prompt] * len(sides), sides, settings, threading.Event())
        trim()
        with PeakSampler(device, now) as sampler:
            start = time.perf_counter()
            final = None
            for final in generation.run():
                pass
            wall = time.perf_counter() - start
        key = (tuple(sides), mixed)
        peaks[key] = max(peaks.get(key, 0.0), sampler.peak - before)
        stats = final[2]
        counts = [stats["base_tokens"] if BASE in sides else None, stats["adapted_tokens"] if ADAPTED in sides else None]
        assert all(c in (None, max_new_tokens) for c in counts), f"unequal lengths: {counts}"
        return wall, stats

    timed([BASE, ADAPTED], True)  # warm-up: first calls pay one-time costs
    single, both, sequential, ttft_base, ttft_adapted = [], [], [], [], []
    for _ in range(repeats):
        # The single answer is a plain generate with the adapter on: what a one-model chat does.
        single.append(timed([ADAPTED], False)[0])
        wall, stats = timed([BASE, ADAPTED], True)
        both.append(wall)
        ttft_base.append(stats["ttft_base_s"])
        ttft_adapted.append(stats["ttft_adapted_s"])
        sequential.append(timed([BASE, ADAPTED], False)[0])

    def median(values):
        return round(statistics.median(values), 3)

    result.update(single_s=median(single), side_by_side_s=median(both), sequential_s=median(sequential),
                  ttft_base_s=median(ttft_base), ttft_adapted_s=median(ttft_adapted), dtype=pair.dtype,
                  quant=info.quant.type, peak_single_mb=round(peaks[((ADAPTED,), False)], 1),
                  peak_side_by_side_mb=round(peaks[((BASE, ADAPTED), True)], 1))
    return result


def run_worker(kind: str, args, adapter: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--adapter", adapter, "--device", args.device,
           "--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats)]
    if args.quant:
        cmd += ["--quant", args.quant]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--adapter", default="",
                        help="Run folder or adapter (default: a random one on the embedded model)")
    parser.add_argument("--quant", default="", choices=("", "nf4", "fp4", "none"),
                        help="Override the base's quantization (default: the run's; nf4 for the made adapter)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.adapter, args.device, args.quant, args.max_new_tokens,
                                args.repeats)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-chat-") as tmp:
        adapter = args.adapter or str(make_adapter(Path(tmp) / "run", args.quant or "nf4"))
        base = run_worker("base", args, adapter)
        pair = run_worker("pair", args, adapter)
        two = run_worker("two", args, adapter)
    mem_ratio = pair["peak_side_by_side_mb"] / pair["peak_single_mb"]
    time_ratio = pair["side_by_side_s"] / pair["single_s"]
    header = ["setup", "new tokens", "base alone MB", "side-by-side MB", "two copies MB",
              "peak answering: single / side-by-side MB", "mem ratio (≤1.1)", "single answer s", "side-by-side s",
              "time ratio (≤1.3)", "base-then-adapted s", "TTFT base / adapted s"]

    def mb(r):
        return f"{r['resident_mb']:.0f} ({r['weights_mb']:.0f})"

    setup = f"adapter {Path(args.adapter).name}" if args.adapter else "random r=16 all-linear"
    row = [f"{setup} on SmolLM2-135M {pair['quant']}/{pair['dtype']}", args.max_new_tokens, mb(base), mb(pair),
           mb(two), f"{pair['peak_single_mb']:.0f} / {pair['peak_side_by_side_mb']:.0f}", f"{mem_ratio:.3f}",
           pair["single_s"], pair["side_by_side_s"], f"{time_ratio:.2f}", pair["sequential_s"],
           f"{pair['ttft_base_s']} / {pair['ttft_adapted_s']}"]
    print("MB: memory a setup adds once loaded and warm (in brackets: tensor bytes it holds)")
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join(str(v) for v in row) + " |")
    line = append_result("Chat compare", args.device, header, row, command_line())
    print(f"\nappended to {BENCH / 'RESULTS.md'}:\n{line}")


if __name__ == "__main__":
    main()
