"""The fine-tuning script people paste from tutorials, kept plain on purpose as the baseline.

AutoModelForCausalLM + BitsAndBytesConfig(nf4) + LoraConfig + TRL SFTTrainer with the default
SFTConfig; only what a benchmark must pin (steps, batch size, seed, output) is set.
Writes a JSON summary (tokens, training time, peak memory) for bench_train.py.
"""

import argparse
import json
import resource
import time

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    bf16 = torch.cuda.is_bf16_supported() if args.device == "cuda" else True
    compute = torch.bfloat16 if bf16 else torch.float16
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=bnb, dtype=compute,
                                                 device_map={"": 0} if args.device == "cuda" else {"": "cpu"})
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.train, split="train")
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    config = SFTConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                       seed=42, report_to="none", save_strategy="no", logging_steps=1,
                       use_cpu=args.device == "cpu", bf16=bf16, fp16=not bf16)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = max(float(h.get("num_tokens", 0)) for h in trainer.state.log_history)
    trainer.model.save_pretrained(f"{args.out}/adapter")
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    with open(f"{args.out}/summary.json", "w") as handle:
        json.dump({"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_mb": peak,
                   "steps": trainer.state.global_step}, handle)


if __name__ == "__main__":
    main()
