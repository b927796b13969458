"""One QLoRA training run from a StudioConfig: quantized base -> LoRA -> TRL SFTTrainer.

The run folder is the only output and the only way others observe the run (see runs.py).
Everything that can end a run - completion, a stop request, a signal, NaN loss, out of
memory, bad data - ends with status.json saying so, and never with a half-written adapter.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

from .config import ConfigError, StudioConfig
from .runs import (STOP_FILE, last_checkpoint, now_iso, read_json, read_metrics, write_json_atomic)

log = logging.getLogger("qlora_studio.train")

EXIT_COMPLETED, EXIT_FAILED, EXIT_STOPPED = 0, 1, 3


class TrainingFailed(RuntimeError):
    """The run ended as failed; str(e) is the reason recorded in status.json."""


class TrainingStopped(RuntimeError):
    """The run was stopped before it could finish."""


def _slug(text: str, limit: int = 24) -> str:
    text = text.rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    text = re.sub(r"\.(jsonl?|csv|tsv|parquet|txt)$", "", text)
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:limit] or "run"


def default_run_name(config: StudioConfig) -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{_slug(config.model.name)}-{_slug(config.data.source)}"


def run_dir_for(config: StudioConfig) -> Path:
    return Path(config.output_dir) / config.run_name


class RunStatus:
    """Writes status.json; every write carries the pid so readers can spot a dead writer."""

    def __init__(self, run_dir: Path, max_steps: int = 0):
        self.path = run_dir / "status.json"
        previous = read_json(self.path)
        self.data = {"state": "running", "reason": "", "step": previous.get("step", 0), "max_steps": max_steps,
                     "pid": os.getpid(), "started_at": previous.get("started_at") or now_iso(),
                     "updated_at": now_iso(), "finished_at": None}
        self.write()

    def update(self, **fields) -> None:
        self.data.update(fields, updated_at=now_iso())
        self.write()

    def finish(self, state: str, reason: str) -> None:
        self.update(state=state, reason=reason, finished_at=now_iso())

    def write(self) -> None:
        write_json_atomic(self.path, self.data)


class _StopFlag:
    """Set by SIGINT/SIGTERM or a STOP file; the training callback checks it every step."""

    def __init__(self, run_dir: Path):
        self.stop_file = run_dir / STOP_FILE
        self.signalled = False
        self.training_started = False
        self.finishing = False  # recording the outcome: a signal now must not cut that short
        self._signalled_at = 0.0
        # In a multi-process run every rank must stop at the same step (or DDP waits forever for
        # the ones that stopped): run_training replaces this with a vote across the ranks.
        self.any_rank = lambda flag: flag

    def install(self) -> None:
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread): rely on the STOP file
                pass

    def uninstall(self) -> None:
        """Give a Python caller (a notebook, a test) its own Ctrl-C back after the run."""
        for sig, handler in getattr(self, "_previous", {}).items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.finishing:
            return
        if self.signalled and time.monotonic() - self._signalled_at < 2:
            return  # the same request twice: a terminal's Ctrl-C, forwarded again by torchrun/accelerate
        if self.signalled or not self.training_started:
            # A second signal, or one before training began, ends the process now.
            raise KeyboardInterrupt
        self.signalled, self._signalled_at = True, time.monotonic()
        log.warning("received %s: saving the adapter at the end of this step", signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.signalled or self.stop_file.exists()

    def agreed(self) -> bool:
        """Stop now? In a multi-process run, a collective every rank calls at the same step."""
        return self.any_rank(self.requested)


def _make_callback(run_dir: Path, status: RunStatus, stop: _StopFlag, resume_step: int):
    from transformers import TrainerCallback

    metrics_path = run_dir / "metrics.jsonl"

    class StudioCallback(TrainerCallback):
        """Streams metrics.jsonl, keeps status.json current, enforces stop and finite loss."""

        def __init__(self):
            self.t0 = time.monotonic()
            self.last_t = self.t0
            self.last_tokens = None
            self.bad_loss = None
            self.primary = True

        def _append(self, row: dict) -> None:
            if not self.primary:
                return  # every rank sees the same gathered metrics; rank 0 alone writes them
            with open(metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")

        def on_train_begin(self, args, state, control, **kwargs):
            stop.training_started = True
            self.t0 = self.last_t = time.monotonic()
            status.update(max_steps=state.max_steps, step=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if stop.agreed():
                control.should_training_stop = True
                control.should_save = True  # a resumable checkpoint at exactly this step

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            self.primary = state.is_world_process_zero
            now = time.monotonic()
            elapsed = now - self.t0
            base = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "elapsed_s": round(elapsed, 2),
                    "max_steps": state.max_steps, "time": now_iso(), "wall_time": round(time.time(), 3)}
            if "loss" in logs:
                loss = float(logs["loss"])
                tokens = logs.get("num_tokens")
                tps = None
                if tokens is not None and self.last_tokens is not None and now > self.last_t:
                    tps = (tokens - self.last_tokens) / (now - self.last_t)
                elif tokens is not None and now > self.t0 and state.global_step > resume_step:
                    tps = tokens / (now - self.t0) if resume_step == 0 else None
                self.last_tokens, self.last_t = tokens, now
                done = state.global_step - resume_step
                eta = elapsed / done * (state.max_steps - state.global_step) if done > 0 else None
                row = {"type": "train", **base, "loss": loss, "learning_rate": logs.get("learning_rate"),
                       "grad_norm": logs.get("grad_norm"), "tokens_per_s": round(tps, 1) if tps else None,
                       "num_tokens": tokens, "eta_s": round(eta, 1) if eta is not None else None}
                self._append(row)
                log.info("step %d/%d loss %.4f lr %.2e%s", state.global_step, state.max_steps, loss,
                         logs.get("learning_rate") or 0, f" {tps:.0f} tok/s" if tps else "")
                if not math.isfinite(loss):
                    self.bad_loss = (state.global_step, loss)
                    control.should_training_stop = True
                    control.should_save = False  # never checkpoint a diverged model
            if "eval_loss" in logs:
                self._append({"type": "eval", **base, "eval_loss": float(logs["eval_loss"])})
                log.info("step %d eval_loss %.4f", state.global_step, logs["eval_loss"])
            status.update(step=state.global_step, max_steps=state.max_steps)

        def on_save(self, args, state, control, **kwargs):
            if self.bad_loss:
                return
            status.update(last_checkpoint=f"checkpoint-{state.global_step}")

    return StudioCallback()


def _setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("qlora_studio", "transformers", "trl", "peft"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        if name == "qlora_studio":
            logger.setLevel(logging.INFO)
            if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                       for h in logger.handlers):
                stream = logging.StreamHandler(sys.stderr)
                stream.setFormatter(logging.Formatter("%(message)s"))
                logger.addHandler(stream)
    return handler


def _teardown_logging(handler: logging.Handler) -> None:
    for name in ("qlora_studio", "transformers", "trl", "peft"):
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def save_adapter_atomically(model, tokenizer, target: Path, base_name: str, state_dict: dict | None = None) -> None:
    """Write the adapter beside its destination, then swap it in: a crash leaves the old one whole.

    `state_dict`: the full weights gathered from an FSDP-sharded model (see _save_final_adapter).
    """
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    tokenizer.save_pretrained(tmp)
    # adapter_config.json should name the public base, not this machine's cache folder.
    config_path = tmp / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base_name
    config_path.write_text(json.dumps(adapter_config, indent=2))
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _versions() -> dict:
    import importlib.metadata as md
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _is_oom(error: BaseException) -> bool:
    import torch
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower()


def _oom_advice(config: StudioConfig) -> str:
    tips = [f"lower train.batch_size (now {config.train.batch_size}) and raise train.grad_accum",
            f"lower data.max_length (now {config.data.max_length})"]
    if config.quant.type in ("none", "int8"):
        tips.append("use 4-bit quantization (quant.type=nf4)")
    if not config.train.gradient_checkpointing:
        tips.append("turn on train.gradient_checkpointing")
    return "out of memory: " + "; ".join(tips)


def prepare_run(config: StudioConfig, resume: bool) -> tuple[StudioConfig, Path]:
    """Pick the run folder; for a resume, the saved config of that folder wins."""
    if not config.run_name:
        if resume:
            raise ConfigError("run_name", "--resume needs the run to continue: pass its folder or set run_name")
        config = config.with_overrides([f"run_name={default_run_name(config)}"])
    run_dir = run_dir_for(config)
    if resume:
        if not (run_dir / "config.yaml").exists():
            raise ConfigError("run_name", f"there is no run to resume at {run_dir}")
    elif (run_dir / "status.json").exists():
        raise ConfigError("run_name", f"{run_dir} already holds a run; resume it (--resume) or pick another run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return config, run_dir


def build_trainer(config: StudioConfig, run_dir: Path, status: RunStatus, stop: _StopFlag, resume_step: int,
                  run_info: dict):
    """Everything up to a ready SFTTrainer; returns (trainer, tokenizer, config as run)."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from .data import prepare_training_data
    from .estimate import hardware_problems
    from .lean_loss import lean_trainer_class
    from .models import (detect_hardware, load_base_model, load_tokenizer, resolve_compute_dtype,
                         resolve_model)

    hw = detect_hardware()
    problems = hardware_problems(config, hw)  # the same rules the Train tab shows before launch
    if problems:
        raise problems[0]
    dtype = resolve_compute_dtype(config.quant.compute_dtype, hw)
    run_info.update(requested_compute_dtype=config.quant.compute_dtype, compute_dtype=dtype,
                    hardware=hw.to_dict())
    config = config.with_overrides([f"quant.compute_dtype={dtype}"])

    resolved = resolve_model(config.model.name, config.model.revision)
    run_info["model"] = {"name": config.model.name, "path": resolved.path, "display_name": resolved.display_name,
                         "license": resolved.license}
    tokenizer = load_tokenizer(resolved.path, config.model.trust_remote_code)
    data = prepare_training_data(config.data, tokenizer, seed=config.train.seed,
                                 completion_only_loss=config.train.completion_only_loss)
    run_info["data"] = data.report.to_dict()
    run_info["dataset"] = config.data.source
    log.info("data: %d train rows, %s eval rows", len(data.train), len(data.eval) if data.eval is not None else 0)

    if config.model.trust_remote_code:
        log.warning("trust_remote_code is on: Python code from %s will run in this process", config.model.name)
    model = load_base_model(resolved.path, config.quant, dtype, hw, trust_remote_code=config.model.trust_remote_code,
                            device_index=int(os.environ.get("LOCAL_RANK", 0)),
                            allow_pickle_weights=config.model.allow_pickle_weights)
    lora = config.lora
    targets = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                             bias=lora.bias, use_rslora=lora.use_rslora, use_dora=lora.use_dora, task_type="CAUSAL_LM")
    t = config.train
    has_eval = data.eval is not None and len(data.eval) > 0
    train_set, eval_set = data.train, data.eval if has_eval else None
    max_length = config.data.max_length
    if t.padding_free and not t.packing:
        # TRL leaves truncation to the caller in padding-free mode; cut rows here exactly as it would
        # (keep the start). The data step already dropped rows with no answer tokens inside max_length.
        train_set = _truncate(train_set, max_length)
        eval_set = _truncate(eval_set, max_length) if eval_set is not None else None
        max_length = None
    args = SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.scheduler,
        optim=t.optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm if t.max_grad_norm > 0 else None,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy=("steps" if t.eval_steps > 0 else "epoch") if has_eval else "no",
        eval_steps=t.eval_steps if t.eval_steps > 0 else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        gradient_checkpointing=t.gradient_checkpointing,
        packing=t.packing,
        padding_free=t.padding_free or t.packing,
        max_length=max_length,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        use_cpu=hw.device == "cpu",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataset_num_proc=None,
        save_only_model=False,
    )
    # Where TRL's LM head has no Triton kernel (CPU) it scores prompt tokens too and computes per-token
    # metrics we never show; the lean loss is the same loss without that work (bench/RESULTS.md).
    trainer_class = lean_trainer_class() if hw.device == "cpu" else SFTTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                            processing_class=tokenizer, peft_config=peft_config,
                            callbacks=[_make_callback(run_dir, status, stop, resume_step)])
    _keep_adapter_in_fp32(trainer.model)
    # peft counts 4-bit packed weights at their real size; a plain numel() would halve them.
    trainable, total = trainer.model.get_nb_trainable_parameters()
    run_info.update(trainable_params=trainable, total_params=total, template=config.data.template)
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return trainer, tokenizer, config


def _keep_adapter_in_fp32(model) -> None:
    """Undo TRL's bf16 cast of the adapter of a quantized model: the adapter trains in fp32.

    bf16 adapter weights lose Adam updates smaller than half their rounding step (at lr 2e-5 most of
    lora_A never moves), are emulated on fp32 CPUs and fp16 GPUs, and make the trained model differ
    from the same adapter loaded by peft, which upcasts it to fp32. The base still computes in the
    run's dtype; the adapter costs ~6% of step time on the quick preset here.
    """
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _truncate(dataset, max_length: int):
    return dataset.map(lambda row: {"input_ids": row["input_ids"][:max_length],
                                    "assistant_masks": row["assistant_masks"][:max_length]})


def run_training(config: StudioConfig, *, resume: bool = False, preset: str = "") -> Path:
    """Train; return the run folder. Raises TrainingFailed/TrainingStopped after recording the outcome.

    `preset` names the preset the config came from, for the run history and model card. Under
    torchrun or accelerate launch every rank runs this; rank 0 alone writes the run folder.
    """
    dist = _Distributed()
    dist.init()
    config, run_dir = dist.agree_on_run(config, resume)
    _clear_stale_stop(run_dir)
    if dist.primary:
        _clear_stale_failures(run_dir)
    handler = _setup_logging(run_dir) if dist.primary else _replica_logging(run_dir, dist.rank)
    status = (_SharedStatus(run_dir) if dist.active else RunStatus(run_dir)) if dist.primary else _ReplicaStatus()
    stop = _StopFlag(run_dir)
    stop.any_rank = dist.any
    stop.install()
    run_info = read_json(run_dir / "run.json") if resume else {}
    run_info.setdefault("started_at", now_iso())
    if preset:
        run_info["preset"] = preset
    run_info["versions"] = _versions()
    run_info.update(world_size=dist.world_size, parallelism=dist.mode)
    checkpoint = last_checkpoint(run_dir) if resume else None
    resume_step = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
    if resume:
        if dist.primary:
            _truncate_metrics(run_dir, resume_step)
        log.info("resuming %s from %s", run_dir, checkpoint.name if checkpoint else "the start (no checkpoint yet)")
    if dist.active:
        log.info("%d processes (%s); rank 0 writes the run folder", dist.world_size, dist.mode)
    trainer = None
    ended_well = False  # completed or stopped: then the ranks leave together (_Distributed.finish)
    try:
        dist.check(config)
        trainer, tokenizer, config = build_trainer(config, run_dir, status, stop, resume_step, run_info)
        if dist.primary:
            config.save(run_dir / "config.yaml",
                        header=f"# qlora-studio train {run_dir} --resume  (continues this run)")
            write_json_atomic(run_dir / "run.json", run_info)
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        _record_cost(run_info, trainer, time.perf_counter() - started)
        callback = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "StudioCallback")
        if callback.bad_loss:
            step, value = callback.bad_loss
            good = last_checkpoint(run_dir)
            raise TrainingFailed(f"loss became {value} at step {step}; try a lower learning rate"
                                 + (f" (last good checkpoint: {good.name})" if good else ""))
        step = trainer.state.global_step
        stopped = stop.agreed() and step < trainer.state.max_steps
        if not stopped and trainer.eval_dataset is not None:
            rows, _ = read_metrics(run_dir)
            # evaluate() is collective: the ranks go by what rank 0 finds in the metrics it wrote.
            if dist.agree(not any(r.get("type") == "eval" and r.get("step") == step for r in rows)):
                trainer.evaluate()
        _save_final_adapter(trainer, tokenizer, run_dir / "adapter", run_info["model"]["display_name"], dist)
        if stopped:
            status.finish("stopped", f"stopped at step {step} of {trainer.state.max_steps}; adapter saved, "
                          "resume to continue")
            ended_well = True
            raise TrainingStopped(status.data["reason"])
        status.finish("completed", f"finished {step} steps")
        log.info("completed: adapter saved to %s", run_dir / "adapter")
        ended_well = True
        return run_dir
    except TrainingStopped:
        raise
    except KeyboardInterrupt:
        stop.finishing = True
        peer = dist.peer_failure(run_dir) if dist.active else None  # a launcher ending us for a failed rank
        if peer:
            status.finish("failed", peer)
            raise TrainingFailed(peer) from None
        status.finish("stopped", "interrupted before training started" if not stop.training_started
                      else "interrupted")
        raise TrainingStopped(status.data["reason"]) from None
    except ConfigError as e:
        status.finish("failed", f"invalid config: {e}")
        raise
    except Exception as e:
        stop.finishing = True
        if isinstance(e, TrainingFailed):
            reason = str(e)
        elif _is_oom(e):
            reason = _oom_advice(config)
        elif type(e).__name__ in ("DataError", "ModelError"):
            reason = str(e)  # already written for the user
        else:
            reason = f"{type(e).__name__}: {e}"
        log.exception("run failed: %s", reason)
        reason = dist.explain_failure(run_dir, e, reason)
        status.finish("failed", reason)
        if isinstance(e, TrainingFailed) and str(e) == reason:
            raise
        raise TrainingFailed(reason) from e
    finally:
        stop.uninstall()
        if run_info.get("model") and dist.primary:
            run_info["finished_at"] = now_iso()
            write_json_atomic(run_dir / "run.json", run_info)
        _teardown_logging(handler)
        if ended_well:
            dist.finish()


def _resolve_run(config: StudioConfig, resume: bool) -> tuple[StudioConfig, Path]:
    """The run folder and the config to run: for a resume, the saved config of that folder wins."""
    config, run_dir = prepare_run(config, resume)
    if resume:
        saved = StudioConfig.load(run_dir)
        # The saved config is the run; only the step budget may be raised when continuing.
        if config.train.max_steps != saved.train.max_steps or config.train.epochs != saved.train.epochs:
            saved = saved.with_overrides([f"train.max_steps={config.train.max_steps}",
                                          f"train.epochs={config.train.epochs}"])
        config = saved
    return config, run_dir


def _clear_stale_stop(run_dir: Path) -> None:
    """A STOP left by an earlier stop must not end this process; one written since it started must."""
    stop_file = run_dir / STOP_FILE
    try:
        if stop_file.stat().st_mtime < _started_at():
            stop_file.unlink()
    except FileNotFoundError:
        pass


def _started_at() -> float:
    """This process's start as wall-clock time. psutil derives it from the boot time in whole
    seconds, which on a VM can read a second or more early: a STOP written just before a quick
    resume then looked newer than the process and stopped it again at once."""
    try:
        with open("/proc/self/stat") as handle:
            ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        return time.time() - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, AttributeError, IndexError):
        import psutil
        return psutil.Process().create_time()


def _record_cost(run_info: dict, trainer, seconds: float) -> None:
    """Training time, tokens and peak memory: for the model card and the benchmarks."""
    import resource

    import torch
    run_info["train_seconds"] = round(run_info.get("train_seconds", 0) + seconds, 2)
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    if tokens:
        run_info["num_tokens"] = max(tokens)
        run_info["tokens_per_s"] = round(max(tokens) / seconds, 1) if seconds > 0 else None
    if torch.cuda.is_available():
        run_info["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        run_info["peak_memory_kind"] = "cuda_allocated"
    else:
        run_info["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        run_info["peak_memory_kind"] = "process_rss"


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint: those steps are trained again."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    rows, _ = read_metrics(run_dir)
    keep = [r for r in rows if int(r.get("step", 0)) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


# -- several processes: torchrun / accelerate launch ---------------------------------------------
# Every rank runs run_training; rank 0 alone writes the run folder. A rank that fails records why
# in failed-rank-N.json (and in status.json when rank 0 has not recorded an outcome yet), so the
# run ends "failed" naming the rank even when rank 0 is stuck in a collective and gets killed.

FAILED_RANK_GLOB = "failed-rank-*.json"


class _Distributed:
    """This process's place in a multi-process run; a no-op stand-in for a single process."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.peers: list = []  # (host, pid) of each rank, for telling which one died

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def primary(self) -> bool:
        return self.rank == 0

    @property
    def mode(self) -> str:
        """'fsdp' under an accelerate FSDP config, 'ddp' for other multi-process runs, else 'single'."""
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            return "fsdp"
        return "ddp" if self.active else "single"

    def init(self) -> None:
        """Join the process group now, as the Trainer would later, so ranks can agree before it exists."""
        if not self.active:
            return
        import socket

        import torch
        import torch.distributed as td
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())  # the backend accelerate picks: nccl, or gloo on CPU
        self.peers = [None] * self.world_size
        td.all_gather_object(self.peers, (socket.gethostname(), os.getpid()))

    def agree(self, value):
        """Rank 0's value, on every rank."""
        if not self.active:
            return value
        import torch.distributed as td
        box = [value]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank."""
        if not self.active:
            return flag
        import torch
        import torch.distributed as td
        from accelerate import PartialState

        vote = torch.tensor([1 if flag else 0], device=PartialState().device)
        td.all_reduce(vote, op=td.ReduceOp.MAX)
        return bool(vote.item())

    def agree_on_run(self, config: StudioConfig, resume: bool) -> tuple[StudioConfig, Path]:
        """Rank 0 picks and checks the run folder and config; the others take its answer, or its error."""
        if not self.active:
            return _resolve_run(config, resume)
        answer = None
        if self.primary:
            try:
                resolved, _ = _resolve_run(config, resume)
                answer = ("ok", resolved.to_dict())
            except ConfigError as e:
                answer = ("error", e.field, e.reason)
        answer = self.agree(answer)
        if answer[0] == "error":
            raise ConfigError(answer[1], answer[2])
        config = StudioConfig.from_dict(answer[1])
        return config, run_dir_for(config)

    def check(self, config: StudioConfig) -> None:
        """Settings FSDP cannot run, refused before any model loads."""
        if self.mode == "fsdp":
            from .estimate import fsdp_problems
            from .models import detect_hardware
            problems = fsdp_problems(config, detect_hardware())
            if problems:
                raise problems[0]

    def finish(self) -> None:
        """The run ended well: wait until rank 0 has written its outcome, then leave the group.

        Without the wait a rank that exits first (with code 3 for a stop) makes the launcher kill
        rank 0 while it is still saving.
        """
        if not self.active:
            return
        import torch.distributed as td
        td.barrier()
        td.destroy_process_group()

    # -- failures

    def explain_failure(self, run_dir: Path, error: BaseException, reason: str) -> str:
        """The reason to record for a failure on this rank: its own, or the failure of a peer it led to."""
        if not self.active or isinstance(error, TrainingFailed):
            return reason  # TrainingFailed (a diverged loss) comes from gathered values: every rank sees it
        if _is_comm_error(error):
            # A collective fails on every rank once one rank is gone: name that rank instead.
            peer = self.peer_failure(run_dir, wait=5.0)
            if peer:
                return peer
        reason = f"rank {self.rank}: {reason}"
        if not self.primary:
            _record_failure(run_dir, self.rank, reason)
        return reason

    def peer_failure(self, run_dir: Path, wait: float = 0.0) -> str | None:
        """'rank N: reason' for a peer that recorded its failure or whose process is gone, else None."""
        import socket

        from .runs import pid_alive

        host = socket.gethostname()
        deadline = time.monotonic() + wait
        while True:
            recorded = _recorded_failure(run_dir, exclude=self.rank)
            if recorded:
                return recorded
            dead = [rank for rank, peer in enumerate(self.peers)
                    if rank != self.rank and peer and peer[0] == host and not pid_alive(peer[1])]
            if dead:
                reason = f"rank {dead[0]}: its process ended unexpectedly (killed, or out of memory)"
                if not self.primary:  # rank 0 may be the one that died: someone must say so
                    _record_failure(run_dir, self.rank, reason)
                return reason
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)


def _is_comm_error(error: BaseException) -> bool:
    """An error a collective raises because another rank went away (gloo, NCCL, the store)."""
    import torch.distributed as td

    if isinstance(error, getattr(td, "DistError", ())):
        return True
    text = f"{type(error).__name__}: {error}".lower()
    return any(mark in text for mark in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe",
                                         "by peer", "timed out"))


def _record_failure(run_dir: Path, rank: int, reason: str) -> None:
    """A rank other than 0 failed: say so where rank 0 (and, if rank 0 is gone, every reader) will see it."""
    write_json_atomic(run_dir / f"failed-rank-{rank}.json", {"rank": rank, "reason": reason, "pid": os.getpid(),
                                                               "time": now_iso()})
    status = read_json(run_dir / "status.json")
    if status.get("state") in (None, "running"):
        status.update(state="failed", reason=reason, finished_at=now_iso(), updated_at=now_iso())
        write_json_atomic(run_dir / "status.json", status)


def _recorded_failure(run_dir: Path, exclude: int | None = None) -> str | None:
    """The earliest failure another rank recorded in this run folder."""
    found = []
    for path in Path(run_dir).glob(FAILED_RANK_GLOB):
        data = read_json(path)
        if data.get("reason") and data.get("rank") != exclude:
            found.append((data.get("time", ""), data["reason"]))
    return min(found)[1] if found else None


def _clear_stale_failures(run_dir: Path) -> None:
    """Failures recorded by an earlier process of this run (before a resume) are not this one's."""
    import psutil
    started = psutil.Process().create_time()
    for path in Path(run_dir).glob(FAILED_RANK_GLOB):
        try:
            if path.stat().st_mtime < started:
                path.unlink()
        except FileNotFoundError:
            pass


class _SharedStatus(RunStatus):
    """status.json of a multi-process run, written by rank 0: a failure another rank recorded wins."""

    def write(self) -> None:
        peer = _recorded_failure(self.path.parent, exclude=0)
        if peer:
            self.data.update(state="failed", reason=peer, finished_at=self.data.get("finished_at") or now_iso())
        super().write()


class _ReplicaStatus:
    """What ranks other than 0 hold instead of RunStatus: they write no status."""

    def __init__(self):
        self.data = {"state": "running", "reason": ""}

    def update(self, **fields) -> None:
        self.data.update(fields)

    def finish(self, state: str, reason: str) -> None:
        self.data.update(state=state, reason=reason)


def _replica_logging(run_dir: Path, rank: int) -> logging.Handler:
    """Ranks other than 0 add only their errors to train.log; rank 0 writes the rest."""
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setLevel(logging.ERROR)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"))
    logging.getLogger("qlora_studio").addHandler(handler)
    return handler


def _save_final_adapter(trainer, tokenizer, target: Path, base_name: str, dist: _Distributed) -> None:
    """Rank 0 writes the adapter; under FSDP every rank first helps gather the sharded weights."""
    state_dict = None
    model = trainer.model
    if getattr(trainer, "is_fsdp_enabled", False):
        state_dict = trainer.accelerator.get_state_dict(trainer.model)  # collective: all ranks call it
        model = trainer.accelerator.unwrap_model(trainer.model)
    if dist.primary:
        save_adapter_atomically(model, tokenizer, target, base_name, state_dict=state_dict)
