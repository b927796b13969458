"""Real QLoRA training of the embedded model on this CPU: the Foundation's promises."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qlora_studio.config import ConfigError, StudioConfig
from qlora_studio.runs import last_checkpoint, read_metrics, read_status
from qlora_studio.train import TrainingFailed, run_training

REPO = Path(__file__).resolve().parent.parent
QUICK = REPO / "presets" / "quick-cpu.yaml"
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def tiny_config(tmp_path, *extra):
    return StudioConfig.load(QUICK).with_overrides([
        f"output_dir={tmp_path}", "train.batch_size=2", "data.max_length=128", "train.eval_steps=0",
        "data.eval_fraction=0", "train.save_steps=100", *extra])


def test_quick_preset_leaves_a_complete_run_folder(trained_run):
    status = read_status(trained_run)
    assert status["state"] == "completed", status
    config = StudioConfig.load(trained_run)
    info = json.loads((trained_run / "run.json").read_text())
    preset = StudioConfig.load(Path(__file__).resolve().parent.parent / "presets" / "quick-cpu.yaml")
    assert info["requested_compute_dtype"] == preset.quant.compute_dtype
    assert config.quant.compute_dtype == info["compute_dtype"] in ("bf16", "fp32")
    assert info["model"]["display_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info["data"]["rows_used"] > 100
    rows, _ = read_metrics(trained_run)
    train = [r for r in rows if r["type"] == "train"]
    evals = [r for r in rows if r["type"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, config.train.max_steps + 1))
    for key in ("step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s", "elapsed_s", "eta_s"):
        assert key in train[-1]
    assert train[-1]["eta_s"] == 0
    assert evals and evals[-1]["step"] == config.train.max_steps
    first = sum(r["loss"] for r in train[:5]) / 5
    last = sum(r["loss"] for r in train[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    adapter = trained_run / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert saved["r"] == config.lora.r
    assert last_checkpoint(trained_run) is not None
    assert "loss" in (trained_run / "train.log").read_text()


def test_lora_learns_base_stays_frozen_and_adapter_reloads_in_a_new_process(tmp_path):
    from qlora_studio.runs import now_iso  # noqa: F401
    from qlora_studio.train import RunStatus, _StopFlag, build_trainer, prepare_run, save_adapter_atomically

    config, run_dir = prepare_run(tiny_config(tmp_path, "run_name=frozen", "train.max_steps=3"), resume=False)
    trainer, tokenizer, config = build_trainer(config, run_dir, RunStatus(run_dir), _StopFlag(run_dir), 0, {})
    model = trainer.model
    # Bytes, not values: 4-bit weights stored as bf16 hold bit patterns that read as NaN.
    base_before = {n: _raw(p).clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}
    trainer.train()
    after = dict(model.named_parameters())
    changed = [n for n, before in lora_before.items() if not torch.equal(before, after[n].detach())]
    assert len(changed) > 0.9 * len(lora_before)
    changed_base = [n for n, before in base_before.items() if not torch.equal(before, _raw(after[n]))]
    assert changed_base == []

    save_adapter_atomically(model, tokenizer, run_dir / "adapter", "HuggingFaceTB/SmolLM2-135M-Instruct")
    # Without accelerate's mixed-precision autocast wrapper: the reload below runs without it too.
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    model.eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
    script = (
        "import sys, torch\n"
        "from peft import PeftModel\n"
        "from qlora_studio.config import StudioConfig\n"
        "from qlora_studio.models import detect_hardware, load_base_model, resolve_model\n"
        "cfg = StudioConfig.load(sys.argv[1])\n"
        "base = load_base_model(resolve_model('embedded').path, cfg.quant, cfg.quant.compute_dtype, detect_hardware())\n"
        "model = PeftModel.from_pretrained(base, sys.argv[2]).eval()\n"
        "ids = torch.load(sys.argv[3])\n"
        "with torch.no_grad():\n"
        "    torch.save(model(input_ids=ids).logits.float(), sys.argv[4])\n")
    config.save(tmp_path / "cfg.yaml")
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "cfg.yaml"), str(run_dir / "adapter"),
                    str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")], check=True, timeout=300)
    reloaded = torch.load(tmp_path / "out.pt")
    assert torch.allclose(reloaded, expected, atol=1e-3), (reloaded - expected).abs().max()


def _raw(tensor):
    return tensor.detach().contiguous().view(torch.uint8) if tensor.is_floating_point() else tensor


def _cli(*args):
    return [sys.executable, "-m", "qlora_studio.cli", *args]


def test_stop_then_resume_continues_steps_and_optimizer_state(tmp_path):
    config = tiny_config(tmp_path, "run_name=stopme", "train.max_steps=8")
    config.save(tmp_path / "config.yaml")
    run_dir = tmp_path / "stopme"
    proc = subprocess.Popen(_cli("train", str(tmp_path / "config.yaml")), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        rows, _ = read_metrics(run_dir)
        if len([r for r in rows if r["type"] == "train"]) >= 2:
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, output
    status = read_status(run_dir)
    assert status["state"] == "stopped", status
    stopped_at = status["step"]
    assert 2 <= stopped_at < 8
    assert last_checkpoint(run_dir).name == f"checkpoint-{stopped_at}"
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()

    resumed = subprocess.run(_cli("train", str(run_dir), "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_status(run_dir)["state"] == "completed"
    steps = [r["step"] for r in read_metrics(run_dir)[0] if r["type"] == "train"]
    assert steps == list(range(1, 9)), steps
    assert "resuming" in (run_dir / "train.log").read_text()
    # Adam counts its updates: 8 means the resumed optimizer carried the first run's state.
    optimizer = torch.load(last_checkpoint(run_dir) / "optimizer.pt", weights_only=False)
    assert last_checkpoint(run_dir).name == "checkpoint-8"
    assert {int(s["step"]) for s in optimizer["state"].values()} == {8}


def test_bad_data_fails_naming_the_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ahoy"}]})
    data.write_text(good + "\n" + good + "\n{not json\n")
    config = tiny_config(tmp_path, "run_name=bad", f"data.source={data}", "data.bad_rows=stop", "train.max_steps=2")
    with pytest.raises(TrainingFailed, match="line 3"):
        run_training(config)
    status = read_status(tmp_path / "bad")
    assert status["state"] == "failed" and "line 3" in status["reason"]
    assert not (tmp_path / "bad" / "adapter").exists()


def test_nan_loss_stops_the_run_without_checkpointing(tmp_path):
    from transformers import TrainerControl, TrainerState

    from qlora_studio.train import RunStatus, _make_callback, _StopFlag

    status = RunStatus(tmp_path)
    callback = _make_callback(tmp_path, status, _StopFlag(tmp_path), 0)
    state, control = TrainerState(global_step=4, max_steps=10, epoch=0.4), TrainerControl(should_save=True)
    callback.on_log(None, state, control, logs={"loss": float("nan"), "learning_rate": 1e-4})
    assert control.should_training_stop and not control.should_save
    assert callback.bad_loss[0] == 4


def test_an_existing_run_is_never_overwritten(trained_run):
    config = StudioConfig.load(trained_run).with_overrides(
        [f"output_dir={trained_run.parent}", f"run_name={trained_run.name}"])
    with pytest.raises(ConfigError, match="already holds a run"):
        run_training(config)


def test_cli_reports_bad_overrides_with_the_field_name():
    result = subprocess.run(_cli("train", str(QUICK), "--set", "lora.r=0"), capture_output=True, text=True)
    assert result.returncode == 2
    assert "lora.r" in result.stderr and ">= 1" in result.stderr


def test_the_core_never_imports_gradio():
    code = ("import sys, qlora_studio.config, qlora_studio.models, qlora_studio.train, qlora_studio.runs, "
            "qlora_studio.data, qlora_studio.cli\n"
            "assert 'gradio' not in sys.modules, 'gradio imported by the core'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_python_caller_gets_its_signal_handlers_back(trained_run):
    # trained_run called run_training in this very process; Ctrl-C must behave normally again.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
