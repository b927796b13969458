"""Several processes, one run: two CPU ranks (torchrun, gloo) train the embedded model together.

The same code runs one process per GPU under accelerate launch; on CPU, torchrun starts the
ranks and gloo carries the gradients. Each rank loads its own 4-bit base and trains on half of
every global batch; rank 0 alone writes the run folder, and a rank that dies ends the run
"failed" naming it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from qlora_studio.config import StudioConfig
from qlora_studio.models import Hardware
from qlora_studio.runs import checkpoints, read_metrics, read_status

REPO = Path(__file__).resolve().parent.parent
QUICK = REPO / "presets" / "quick-cpu.yaml"
ROWS, BATCH, RANKS = 16, 2, 2
STEPS_PER_EPOCH = ROWS // (BATCH * RANKS)  # 4: one process alone would take 8
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CPU = Hardware("cpu", "test CPU", False, False, 16.0, 0)
TWO_GPUS = Hardware("cuda", "Test GPU", True, True, 24.0, 2)


def small_config(tmp_path: Path, name: str, *extra: str) -> StudioConfig:
    """The quick preset on the first 16 persona rows, batch 2, no eval: one epoch is a few steps."""
    data = tmp_path / "persona16.jsonl"
    if not data.exists():
        rows = (REPO / "assets" / "samples" / "persona.jsonl").read_text().splitlines(keepends=True)
        data.write_text("".join(rows[:ROWS]))
    return StudioConfig.load(QUICK).with_overrides([
        f"output_dir={tmp_path / 'runs'}", f"run_name={name}", f"data.source={data}", f"train.batch_size={BATCH}",
        "data.max_length=128", "data.eval_fraction=0", "train.eval_steps=0", "train.save_steps=100",
        "train.max_steps=0", "train.epochs=1", *extra])


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS), *args]


def wait_for_steps(run_dir: Path, count: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len([r for r in read_metrics(run_dir)[0] if r["type"] == "train"]) >= count:
            return
        assert proc.poll() is None, f"training ended early with {proc.returncode}"
        time.sleep(0.2)
    raise TimeoutError(f"{count} steps not logged in {timeout}s")


def rank_process(launcher_pid: int, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "qlora_studio.cli" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    raise LookupError(f"no rank {rank} under {launcher_pid}")


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir)[0] if r["type"] == "train"]


@pytest.mark.slow
def test_two_ranks_share_one_epoch_and_rank_zero_writes_one_run(tmp_path, embedded_path):
    import torch
    from peft import PeftModel

    from qlora_studio.models import detect_hardware, load_base_model

    # No run name: the ranks must agree on the one rank 0 picks.
    config_path = tmp_path / "config.yaml"
    small_config(tmp_path, "").save(config_path)
    result = subprocess.run(torchrun("-m", "qlora_studio.cli", "train", str(config_path)), env=ENV,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    runs = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    run_dir = runs[0]

    status = read_status(run_dir)
    assert status["state"] == "completed", status
    info = json.loads((run_dir / "run.json").read_text())
    assert (info["world_size"], info["parallelism"]) == (RANKS, "ddp")
    # Both ranks took part: the global batch doubled, so the epoch took half the steps, and the
    # tokens both ranks trained on add up to every row of the data once.
    assert status["max_steps"] == STEPS_PER_EPOCH
    assert train_steps(run_dir) == list(range(1, STEPS_PER_EPOCH + 1))  # one metrics file, no step twice
    rows = read_metrics(run_dir)[0]
    assert rows[-1]["epoch"] == 1.0
    assert info["data"]["rows_train"] == ROWS
    assert rows[-1]["num_tokens"] == info["data"]["tokens_total"]
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("adapter")) == ["adapter"]
    assert not list(run_dir.glob("failed-rank-*.json"))
    assert [c.name for c in checkpoints(run_dir)] == [f"checkpoint-{STEPS_PER_EPOCH}"]
    assert "[rank" not in (run_dir / "train.log").read_text()  # the other rank logged no error

    saved = StudioConfig.load(run_dir)
    base = load_base_model(str(embedded_path), saved.quant, saved.quant.compute_dtype, detect_hardware())
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b)  # lora_B starts at zero: it trained


@pytest.mark.slow
def test_a_rank_that_fails_ends_the_run_failed_naming_it(tmp_path, embedded_path):
    # Rank 1 looks for its models in a folder that cannot exist (a path through a file), as on a
    # node whose model cache is missing; rank 0 loads fine and must not report its own shutdown.
    (tmp_path / "a-file").write_text("")
    wrapper = tmp_path / "rank.sh"
    wrapper.write_text(f'#!/bin/sh\nif [ "$RANK" = 1 ]; then export QLORA_STUDIO_HOME={tmp_path}/a-file/home; fi\n'
                       f'exec {sys.executable} -m qlora_studio.cli train "$@"\n')
    wrapper.chmod(0o755)
    config_path = tmp_path / "config.yaml"
    small_config(tmp_path, "broken").save(config_path)
    result = subprocess.run(torchrun("--no-python", str(wrapper), str(config_path)), env=ENV,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode != 0
    run_dir = tmp_path / "runs" / "broken"
    status = read_status(run_dir)
    assert status["state"] == "failed", status
    assert status["reason"].startswith("rank 1: NotADirectoryError"), status
    assert not (run_dir / "adapter").exists()
    assert "[rank 1]" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_failed_naming_it(tmp_path, embedded_path):
    # The kernel's out-of-memory killer leaves no note: rank 0 sees gloo fail and finds rank 1 gone.
    config_path = tmp_path / "config.yaml"
    small_config(tmp_path, "killed", "train.epochs=5").save(config_path)
    proc = subprocess.Popen(torchrun("-m", "qlora_studio.cli", "train", str(config_path)), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "runs" / "killed"
    try:
        wait_for_steps(run_dir, 1, proc)
        rank_process(proc.pid, 1).send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    status = read_status(run_dir)
    assert status["state"] == "failed", (status, output[-3000:])
    assert status["reason"].startswith("rank 1: its process ended unexpectedly"), status
    assert status["step"] < 5 * STEPS_PER_EPOCH


@pytest.mark.slow
def test_the_app_trains_on_two_processes_stops_them_at_one_step_and_resumes(tmp_path, embedded_path):
    from qlora_studio.supervisor import TrainerSupervisor

    runs = tmp_path / "runs"
    supervisor = TrainerSupervisor(runs)
    # `qlora-studio train --gpus 2` (CPU processes here): the app's launch on several GPUs.
    run_dir = supervisor.start(small_config(tmp_path, "stopme", "train.epochs=3"), extra_env=ENV, gpus=RANKS)
    parent = supervisor._children[supervisor.active()["pid"]]
    try:
        wait_for_steps(run_dir, 2, parent)
        assert "Stopping" in supervisor.stop(run_dir)
        supervisor.wait(timeout=300)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 3, (run_dir / "console.log").read_text()[-3000:]
    status = read_status(run_dir)
    assert status["state"] == "stopped", status
    stopped_at = status["step"]
    assert 2 <= stopped_at < 3 * STEPS_PER_EPOCH
    # Every rank stopped at the same step (otherwise DDP would have hung), with a checkpoint there.
    assert checkpoints(run_dir)[-1].name == f"checkpoint-{stopped_at}"
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert train_steps(run_dir) == list(range(1, stopped_at + 1))

    supervisor.resume(run_dir, extra_env=ENV)  # on as many processes as it ran on
    supervisor.wait(timeout=900)
    status = read_status(run_dir)
    assert status["state"] == "completed", (status, (run_dir / "console.log").read_text()[-3000:])
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == RANKS
    assert train_steps(run_dir) == list(range(1, 3 * STEPS_PER_EPOCH + 1))


# -- without training: checks, estimate, launch commands, the Train tab's controls ---------------

def test_launches_on_several_gpus_are_checked_before_they_start():
    from qlora_studio.estimate import scale_problems

    config = StudioConfig()
    assert scale_problems(config, TWO_GPUS, 2) == []
    assert scale_problems(config, TWO_GPUS, 2, fsdp=True) == []
    assert [p.field for p in scale_problems(config, TWO_GPUS, 4)] == ["gpus"]
    assert [p.field for p in scale_problems(config, TWO_GPUS, 1, fsdp=True)] == ["fsdp"]
    assert [p.field for p in scale_problems(config, CPU, 2, fsdp=True)] == ["fsdp"]
    assert scale_problems(config, CPU, 2) == []  # CPU processes (gloo): how the tests above run
    fp16 = config.with_overrides(["quant.compute_dtype=fp16"])
    assert [p.field for p in scale_problems(fp16, TWO_GPUS, 2, fsdp=True)] == ["quant.compute_dtype"]
    paged = config.with_overrides(["train.optimizer=paged_adamw_8bit"])
    assert [p.field for p in scale_problems(paged, TWO_GPUS, 2, fsdp=True)] == ["train.optimizer"]
    assert scale_problems(paged, TWO_GPUS, 2) == []


def test_the_memory_estimate_is_per_gpu_and_fsdp_shards_it():
    from qlora_studio.estimate import estimate_memory, model_shape

    shape = model_shape({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
                         "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                         "vocab_size": 128256})
    config = StudioConfig()
    one = estimate_memory(shape, config, TWO_GPUS)
    ddp = estimate_memory(shape, config, TWO_GPUS, gpus=2)
    fsdp = estimate_memory(shape, config, TWO_GPUS, gpus=2, fsdp=True)
    assert ddp.weights == one.weights and ddp.activations == one.activations  # a whole copy per GPU
    assert ddp.gradients == 2 * one.gradients  # plus DDP's gradient buckets
    assert fsdp.weights < 0.6 * one.weights and fsdp.optimizer == one.optimizer / 2
    assert fsdp.total < one.total < ddp.total
    assert any("per GPU" in note for note in ddp.notes) and any("FSDP" in note for note in fsdp.notes)
    # Each GPU loads the whole 4-bit base before FSDP shards it: with little else, that is the peak.
    light = config.with_overrides(["train.batch_size=1", "data.max_length=64"])
    wide = estimate_memory(shape, light, TWO_GPUS, gpus=8, fsdp=True)
    assert wide.total == wide.load_peak > one.weights
    assert any("loading needs more than training" in note for note in wide.notes)


def test_gpus_launch_through_accelerate_with_the_shipped_configs():
    from qlora_studio.cli.train import launcher_command

    ddp = launcher_command(4, False, cuda=True)
    assert ddp[1:3] == ["-m", "accelerate.commands.launch"] and ddp[ddp.index("--num_processes") + 1] == "4"
    fsdp = launcher_command(2, True, cuda=True)
    for command, name in ((ddp, "ddp.yaml"), (fsdp, "fsdp_qlora.yaml")):
        path = Path(command[command.index("--config_file") + 1])
        assert path.name == name and path.exists()
    assert "fsdp_use_orig_params: false" in (REPO / "presets" / "accelerate" / "fsdp_qlora.yaml").read_text()
    assert launcher_command(2, False, cuda=False)[1:4] == ["-m", "torch.distributed.run", "--standalone"]


def test_cli_refuses_more_gpus_than_visible_and_gpus_under_a_launcher(tmp_path):
    config_path = tmp_path / "config.yaml"
    small_config(tmp_path, "refused").save(config_path)
    fsdp_on_cpu = subprocess.run([sys.executable, "-m", "qlora_studio.cli", "train", str(config_path), "--gpus", "2",
                                  "--fsdp"], capture_output=True, text=True, timeout=120)
    assert fsdp_on_cpu.returncode == 2 and "FSDP needs CUDA GPUs" in fsdp_on_cpu.stderr
    nested = subprocess.run([sys.executable, "-m", "qlora_studio.cli", "train", str(config_path), "--gpus", "2"],
                            env={**ENV, "WORLD_SIZE": "2"}, capture_output=True, text=True, timeout=120)
    assert nested.returncode == 2 and "leave it out" in nested.stderr
    assert not (tmp_path / "runs" / "refused").exists()


class FakeTrainer:
    def __init__(self, runs: Path):
        self.runs, self.calls = runs, []

    def start(self, config, **scale):
        self.calls.append(scale)
        run_dir = self.runs / config.run_name
        run_dir.mkdir(parents=True)
        return run_dir


def test_train_tab_offers_gpus_only_with_several_and_launches_on_them(tmp_path, embedded_path):
    from qlora_studio.ui import train_form as form
    from qlora_studio.ui import train_tab as tab
    from qlora_studio.ui.context import AppSettings, StudioContext

    assert not tab.scale_controls_visible(CPU)
    assert not tab.scale_controls_visible(Hardware("cuda", "One GPU", True, True, 24.0, 1))
    assert tab.scale_controls_visible(TWO_GPUS)

    runs = tmp_path / "runs"
    settings = AppSettings(runs_root=runs, uploads_dir=tmp_path / "u", allowed_data_dirs=[])
    ctx = StudioContext(settings=settings, trainer=FakeTrainer(runs), hardware=TWO_GPUS)
    # The quick preset computes in fp32 (fastest on CPU); FSDP + QLoRA needs bf16, as on a GPU box.
    values = tab.config_values(ctx, form.load_preset("quick-cpu").with_overrides(
        ["run_name=wide", "quant.compute_dtype=auto"]))
    _, one_gpu, _, command = tab.preview(ctx, values, "quick-cpu")
    assert "each of" not in one_gpu and "--gpus" not in command
    validation, two_gpus, _, command = tab.preview(ctx, values, "quick-cpu", 2, True)
    assert "Config is valid" in validation
    assert "each of 2 × Test GPU" in two_gpus and "FSDP over 2 GPUs" in two_gpus
    assert command.endswith("--gpus 2 --fsdp")
    assert "gpus" in tab.preview(ctx, values, None, 3, False)[0]  # more than are visible

    tab.start_training(ctx, values, "quick-cpu")
    tab.start_training(ctx, form.set_value(values, "run_name", "wider"), "quick-cpu", 2, True)
    assert ctx.trainer.calls == [{}, {"gpus": 2, "fsdp": True}]  # one GPU: the launch is unchanged
