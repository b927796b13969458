"""Train tab handlers, called directly: form <-> config, checks, presets, real runs, stop/resume, history."""

import asyncio
import inspect
import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from qlora_studio.config import StudioConfig, get_value, iter_fields
from qlora_studio.models import Hardware, detect_hardware
from qlora_studio.runs import FINAL_STATES, read_status, request_stop, write_json_atomic
from qlora_studio.supervisor import TrainerSupervisor
from qlora_studio.ui import train_form as form
from qlora_studio.ui import train_tab as tab
from qlora_studio.ui.context import AppSettings, SessionStates, StudioContext
from qlora_studio.ui.train_live import loss_figure, progress_html, smooth, traces

REPO = Path(__file__).resolve().parent.parent
SKIP = gr.skip()


def is_skip(value) -> bool:
    return isinstance(value, dict) and value == SKIP
TINY = ["train.max_steps=4", "train.batch_size=2", "data.max_length=128", "data.eval_fraction=0",
        "train.eval_steps=0", "train.save_steps=100"]


@pytest.fixture
def ctx(tmp_path):
    runs = tmp_path / "runs"
    settings = AppSettings(runs_root=runs, uploads_dir=tmp_path / "u", allowed_data_dirs=[REPO / "assets" / "samples"])
    context = StudioContext(settings=settings, trainer=TrainerSupervisor(runs), model_pool=None,
                            hardware=detect_hardware())
    yield context
    # Never leave a training behind a failed test: ask every run to stop, then make sure.
    for run in runs.iterdir():
        if run.is_dir() and read_status(run).get("state") == "running":
            request_stop(run)
    try:
        context.trainer.wait(timeout=120)
    except subprocess.TimeoutExpired:
        for proc in context.trainer._children.values():
            proc.kill()


def tiny_values(ctx, name, *extra):
    config = form.load_preset("quick-cpu").with_overrides([f"run_name={name}", *TINY, *extra])
    return tab.config_values(ctx, config)


def changed_config() -> StudioConfig:
    """A config where every field differs from its default, so a round trip proves each one travels."""
    default = StudioConfig()
    data: dict = {}
    for name, f, ftype in iter_fields():
        value = get_value(default, name)
        m = f.metadata
        if ftype is bool:
            new = not value
        elif m.get("choices"):
            new = next(c for c in m["choices"] if c != value)
        elif ftype is int:
            new = value + 3
        elif ftype is float:
            new = value / 2 if value else 0.05
        elif ftype is list:
            new = ["q_proj", "v_proj"]
        elif ftype is dict:
            new = {"prompt": "question", "completion": "answer"}
        else:
            new = f"{value}-changed" if value else "changed"
        node = data
        *sections, leaf = name.split(".")
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = new
    config = StudioConfig.from_dict(data)
    assert all(get_value(config, n) != get_value(default, n) for n, _, _ in iter_fields())
    return config


def watch_until(ctx, watch, done, timeout=420):
    """Look at the run like the page's stream until done(watch, outputs); return (watch, every look's outputs)."""
    history = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = tab.tick(ctx, watch)
        history.append(out)
        if not is_skip(out[0]):
            watch = out[0]
        if done(watch, out):
            return watch, history
        time.sleep(0.25)
    raise AssertionError(f"timed out; status {watch['status'] if watch else None}\n{tab.log_tail(watch['run'])}")


def n_train(watch) -> int:
    return len([r for r in watch["rows"] if r["type"] == "train"])


def finished(watch, out) -> bool:
    return watch["status"].get("state") in FINAL_STATES


# -- form <-> config ----------------------------------------------------------------------

def test_every_config_field_has_one_form_value_and_round_trips():
    assert form.FIELD_NAMES == tuple(n for n, _, _ in iter_fields())
    config = changed_config()
    values = form.config_to_form(config)
    assert form.form_to_config(values) == config
    assert values[form.FIELD_NAMES.index("data.mapping")] == "prompt: question, completion: answer"
    # Number boxes hand whole numbers over as floats; the config keeps them whole.
    values = form.set_value(values, "train.batch_size", 6.0)
    assert form.form_to_config(values).train.batch_size == 6
    specs = {s.name: s for s in form.FIELDS}
    assert specs["train.batch_size"].kind == "int" and specs["train.batch_size"].minimum == 1
    assert specs["data.eval_fraction"].bounds == "≥ 0 and < 0.9" and specs["data.eval_fraction"].maximum == 0.9
    assert specs["quant.type"].choices == ("nf4", "fp4", "int8", "none")
    assert specs["lora.use_dora"].advanced and not specs["lora.r"].advanced
    assert "train.batch_size" in specs["train.batch_size"].info and "Rows per device" in specs["train.batch_size"].info


def test_validation_messages_name_the_field(ctx):
    base = tiny_values(ctx, "v")
    cpu = Hardware("cpu", "no-bf16 cpu", bf16=False, fp16=False, memory_gb=16)
    ctx.hardware = cpu
    cases = {
        "train.batch_size": form.set_value(base, "train.batch_size", 0),
        "lora.target_modules": form.set_value(base, "lora.target_modules", ["all-linear", "q_proj"]),
        "data.mapping": form.set_value(base, "data.mapping", "prompt question"),
        "train.learning_rate": form.set_value(base, "train.learning_rate", None),
        "quant.compute_dtype": form.set_value(base, "quant.compute_dtype", "bf16"),
        "quant.type": form.set_value(base, "quant.type", "int8"),
        "train.optimizer": form.set_value(base, "train.optimizer", "paged_adamw_8bit"),
    }
    for field, values in cases.items():
        validation, *_ = tab.preview(ctx, values, "quick-cpu")
        assert f"<b>{field}</b>" in validation, (field, validation)
        message, watch, _ = tab.start_training(ctx, values, None)
        assert "Not started" in message and field in message and watch == SKIP
    wrong = form.set_value(base, "lora.target_modules", ["q_proj", "c_attn"])
    assert "c_attn not in this model" in tab.preview(ctx, wrong, None)[0]
    assert "Config is valid" in tab.preview(ctx, base, None)[0]
    assert list(ctx.runs_root.iterdir()) == [], "nothing may start from an invalid form"


def test_preview_shows_trainable_params_memory_yaml_and_command(ctx):
    ctx.hardware = Hardware("cpu", "test", bf16=True, fp16=False, memory_gb=16)
    values = tiny_values(ctx, "")
    _, estimate, yaml_text, command = tab.preview(ctx, values, "quick-cpu")
    assert 'data-trainable="4884480"' in estimate and "4.88M" in estimate and "3.50%" in estimate
    assert "fits" in estimate and "of CPU RAM (16.00 GiB)" in estimate
    assert StudioConfig.from_yaml(yaml_text) == form.form_to_config(values)
    # The command runs the same config through the real CLI parser.
    from qlora_studio.cli import build_parser
    from qlora_studio.cli.train import load_config

    assert command.startswith("qlora-studio train presets/quick-cpu.yaml --set")
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert load_config(str(REPO / args.config), args.overrides, False) == form.form_to_config(values)
    # Too little memory: a warning with what would help, and the run may still be started.
    ctx.hardware = Hardware("cpu", "test", bf16=True, fp16=False, memory_gb=1)
    estimate = tab.preview(ctx, form.set_value(values, "train.batch_size", 16), None)[1]
    assert "will not fit" in estimate and "lower train.batch_size" in estimate
    no_model = form.set_value(values, "model.name", "no-such-org/no-such-model-xyz")
    assert "No estimate for no-such-org/no-such-model-xyz" in tab.preview(ctx, no_model, None)[1]


def test_module_checklist_offers_the_models_linear_layers():
    assert tab.module_choices("embedded") == ["all-linear", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                              "up_proj", "down_proj"]
    assert tab.module_choices("no-such-org/no-such-model-xyz", "", ["c_attn"]) == ["all-linear", "c_attn"]


def test_presets_load_keep_the_chosen_data_and_save_safely(ctx, tmp_path):
    presets = tmp_path / "presets"
    presets.mkdir()
    shutil.copy(REPO / "presets" / "quick-cpu.yaml", presets / "quick-cpu.yaml")
    data = {"source": "sample:instructions", "format": "alpaca", "mapping": {"prompt": "instruction"},
            "max_length": 300}
    values = tab.on_preset(ctx, "quick-cpu", data, presets)
    modules = values[form.FIELD_NAMES.index("lora.target_modules")]
    assert modules["value"] == ["all-linear"] and "q_proj" in modules["choices"]
    plain = [v["value"] if isinstance(v, dict) else v for v in values]
    config = form.form_to_config(plain)
    assert config.train.max_steps == 40 and config.data.source == "sample:instructions"
    assert config.data.max_length == 300 and config.data.mapping == {"prompt": "instruction"}
    assert config.output_dir == str(ctx.runs_root)
    data_out = tab.on_data_change(data)
    assert data_out[[s.name for s in form.DATA_FIELDS].index("data.format")] == "alpaca"
    assert tab.on_data_change(None) == [SKIP] * len(form.DATA_FIELDS)

    for bad in ("", "../evil", "a b", "-x"):
        message, update = tab.on_save_preset(bad, plain, presets)
        assert "not allowed" in message and update == SKIP
    message, _ = tab.on_save_preset("quick-cpu", plain, presets)
    assert "shipped preset" in message
    assert form.load_preset("quick-cpu", presets).data.source == "sample:persona"
    message, update = tab.on_save_preset("mine", form.set_value(plain, "run_name", "x"), presets)
    assert "Saved" in message and update["value"] == "mine" and "mine" in update["choices"]
    text = (presets / "mine.yaml").read_text()
    assert text.splitlines()[0] == "# qlora-studio train presets/mine.yaml"
    saved = form.load_preset("mine", presets)
    assert saved.data.source == "sample:instructions" and saved.run_name == "" and saved.output_dir == "runs"
    assert "Saved" in tab.on_save_preset("mine", plain, presets)[0]  # a user preset may be replaced
    bad_form = form.set_value(plain, "lora.r", 0)
    assert "<b>lora.r</b>" in tab.on_save_preset("other", bad_form, presets)[0]


def test_demo_mode_refuses_to_train(ctx):
    ctx.settings.demo = True
    message, watch, run = tab.start_training(ctx, tiny_values(ctx, "demo"), None)
    assert "Duplicate" in message and watch == SKIP and run == SKIP
    assert "Duplicate" in tab.resume_training(ctx, "demo")[0]
    assert not (ctx.runs_root / "demo").exists()


# -- fabricated run folders: history, failures, compare ---------------------------------------------

def fake_run(ctx, name, state, losses, reason="", pid=None, preset="quick-cpu", started="2026-01-01T00:00:00"):
    run = ctx.runs_root / name
    run.mkdir(parents=True)
    config = form.load_preset("quick-cpu").with_overrides([f"run_name={name}", f"output_dir={ctx.runs_root}",
                                                          "quant.compute_dtype=bf16", "lora.r=8"])
    config.save(run / "config.yaml")
    write_json_atomic(run / "run.json", {"requested_compute_dtype": "auto", "dataset": "sample:persona",
                                         "model": {"display_name": "HuggingFaceTB/SmolLM2-135M-Instruct"}})
    write_json_atomic(run / "launch.json", {"preset": preset})
    rows = [{"type": "train", "step": i + 1, "epoch": 0.1 * (i + 1), "loss": loss, "learning_rate": 1e-4,
             "elapsed_s": 10.0 * (i + 1), "eta_s": 5.0, "tokens_per_s": 100.0, "max_steps": 40}
            for i, loss in enumerate(losses)]
    rows.append({"type": "eval", "step": len(losses), "epoch": 0.5, "eval_loss": losses[-1] + 0.1})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_json_atomic(run / "status.json", {"state": state, "reason": reason, "step": len(losses), "max_steps": 40,
                                            "pid": pid, "started_at": started})
    (run / "train.log").write_text("\n".join(f"line {i}" for i in range(100)) + "\n")
    return run


def test_history_table_compare_and_load_config(ctx):
    fake_run(ctx, "alpha", "completed", [3.0, 2.5, 2.0])
    fake_run(ctx, "beta", "stopped", [3.1, 2.9], reason="stopped at step 2 of 40")
    table, names = tab.history(ctx)
    assert list(table.columns) == tab.HISTORY_COLUMNS and sorted(names) == ["alpha", "beta"]
    row = table[table["name"] == "alpha"].iloc[0]
    assert (row["status"], row["steps"], row["train loss"], row["eval loss"], row["preset"], row["duration"]) == \
        ("completed", "3/40", "2.0000", "2.1000", "quick-cpu", "0m 30s")
    assert row["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and row["dataset"] == "sample:persona"

    fig = tab.compare_runs(ctx, ["alpha", "beta"])
    names_drawn = [t["name"] for t in traces(fig)]
    assert names_drawn == ["alpha · train", "alpha · eval", "beta · train", "beta · eval"]
    assert traces(fig)[0]["x"] == [1, 2, 3]

    values = tab.load_run_config(ctx, "alpha")
    plain = [v["value"] if isinstance(v, dict) else v for v in values]
    loaded = form.form_to_config(plain)
    assert loaded.lora.r == 8 and loaded.run_name == "" and loaded.quant.compute_dtype == "auto"
    with pytest.raises(gr.Error):
        tab.load_run_config(ctx, "../alpha")

    watch, session_run, figure, progress, status, log = tab.select_run(ctx, "beta")
    assert session_run == str(ctx.runs_root / "beta") and watch["run"] == session_run
    assert [t["name"] for t in traces(figure)] == ["train loss", "train loss (smoothed)", "eval loss"]
    assert 'data-step="2" data-total="40"' in progress and 'data-state="stopped"' in status
    assert log.splitlines() == [f"line {i}" for i in range(70, 100)]
    table_update = tab.refresh_history(ctx, "beta", ["alpha", "gone"])
    assert table_update[1]["value"] == "beta" and table_update[2]["value"] == ["alpha"]


def test_failed_runs_show_their_reason_and_what_to_do(ctx):
    fake_run(ctx, "oom", "failed", [3.0], reason="out of memory: lower train.batch_size (now 8) and raise "
             "train.grad_accum; lower data.max_length (now 256)")
    status = tab.select_run(ctx, "oom")[4]
    assert "ran out of memory" in status and "lower train.batch_size (now 8)" in status
    # A process killed outright (the OOM killer) never writes its status; the dead pid gives it away.
    fake_run(ctx, "killed", "running", [3.0], pid=2**22 + 12345)
    status = tab.select_run(ctx, "killed")[4]
    assert 'data-state="failed"' in status and "ended unexpectedly" in status and "quant.type=nf4" in status
    message = tab.resume_training(ctx, "alpha-missing")[0]
    assert "Pick a stopped or failed run" in message


# -- real runs through the handlers ----------------------------------------------------------

def test_a_run_streams_stops_and_resumes_through_the_tab_with_two_sessions(ctx, monkeypatch):
    """One real training seen from two browser sessions: live points, busy message, stop, resume."""
    monkeypatch.setattr(tab, "CHART_EVERY_CPU_S", 0.0)  # every look redraws, as on a GPU machine
    message, watch_a, run = tab.start_training(ctx, tiny_values(ctx, "live", "train.max_steps=5"), "quick-cpu")
    assert "Started <code>live</code>" in message and run == str(ctx.runs_root / "live")

    # Session B: its own state, the same machine. Its Train click is turned away, naming the run.
    message_b, watch_b, run_b = tab.start_training(ctx, tiny_values(ctx, "second"), None)
    assert "Another training is running" in message_b and "live" in message_b
    assert is_skip(watch_b) and is_skip(run_b) and not (ctx.runs_root / "second").exists()
    # A page opened (or reloaded) while it runs attaches to it and hands it to Chat/Export.
    attached = tab.tick(ctx, None)
    assert attached[0]["run"] == run and attached[7] == run and attached[6]["value"] == "live"
    watch_b = attached[0]

    points_shown = []

    def two_points(watch, out):
        if not is_skip(out[1]) and watch["status"].get("state") == "running":
            points_shown.append(len(traces(out[1])[0]["x"]))
        return n_train(watch) >= 2 or finished(watch, out)

    watch_a, _ = watch_until(ctx, watch_a, two_points)
    assert max(points_shown) >= 2, points_shown  # the chart grew while the run trained

    # Any session may stop the machine's run; it saves the adapter at the current step.
    assert "Stopping live" in tab.stop_training(ctx, watch_b)
    watch_a, _ = watch_until(ctx, watch_a, finished)
    assert watch_a["status"]["state"] == "stopped", watch_a["status"]
    stopped_at = watch_a["status"]["step"]
    assert 2 <= stopped_at < 5
    assert (Path(run) / "adapter" / "adapter_model.safetensors").exists()
    assert "Resume continues" in tab.status_html(watch_a["status"], "live")

    message, resumed, session_run = tab.resume_training(ctx, "live")
    assert "Resuming" in message and session_run == run
    # A second click, before the new process has even written its status, is turned away.
    assert "Another training is running" in tab.resume_training(ctx, "live")[0]

    # Session A keeps its watch across the resume, which rewrites metrics.jsonl.
    watch_a, outputs = watch_until(ctx, watch_a, lambda w, o: w["status"].get("state") == "completed")
    watch_b, _ = watch_until(ctx, watch_b, finished, timeout=60)
    resumed, _ = watch_until(ctx, resumed, finished, timeout=60)
    for w in (watch_a, watch_b, resumed):
        assert [r["step"] for r in w["rows"] if r["type"] == "train"] == [1, 2, 3, 4, 5]
    last = {i: next(o[i] for o in reversed(outputs) if not is_skip(o[i])) for i in (1, 2, 3, 4, 5)}
    assert traces(last[1])[0]["x"] == [1, 2, 3, 4, 5]
    assert 'data-step="5" data-total="5"' in last[2] and 'data-state="completed"' in last[3]
    assert "step 5/5" in last[4] and "resuming" in last[4]
    row = last[5][last[5]["name"] == "live"].iloc[0]
    assert row["status"] == "completed" and row["steps"] == "5/5" and row["preset"] == "quick-cpu"
    assert float(row["train loss"]) > 0
    # Nothing new: the next tick redraws nothing.
    assert all(is_skip(o) for o in tab.tick(ctx, watch_a))
    assert "only a stopped or failed run" in tab.resume_training(ctx, "live")[0]
    assert "Nothing is training." in tab.stop_training(ctx, watch_a)


def test_the_loss_chart_is_lean_plotly_json_and_survives_a_diverged_step():
    rows = [{"type": "train", "step": step, "loss": loss, "learning_rate": 1e-4}
            for step, loss in ((1, 3.0), (2, float("nan")), (3, 2.0))]
    rows.append({"type": "eval", "step": 3, "eval_loss": 2.5})
    figure = loss_figure(rows, "run-a")

    def no_nan(constant):
        raise AssertionError(f"{constant} is not JSON the browser can parse")

    spec = json.loads(figure.plot, parse_constant=no_nan)
    raw, smoothed, evals = spec["data"]
    assert raw["y"] == [3.0, None, 2.0] and smoothed["y"][1] is None and 2.0 < smoothed["y"][2] < 3.0
    assert evals["x"] == [3] and evals["y"] == [2.5]
    # Sent on every step: no plotly template for the browser to merge, the user's zoom kept per run.
    assert "template" not in spec["layout"] and spec["layout"]["uirevision"] == "run-a"
    assert smooth([1.0, float("inf"), 1.0])[2] == pytest.approx(1.0)
    # The learning rate is a number in the progress line, not a panel redrawn on every step.
    assert "<b>learning rate</b> 1.00e-04" in progress_html(rows, {"state": "running", "step": 3, "max_steps": 3})


def test_the_page_looks_at_a_run_less_often_where_it_trains_on_the_cpu():
    on = lambda device: SimpleNamespace(hardware=SimpleNamespace(device=device))  # noqa: E731
    assert tab.running_poll_s(on("cuda")) == tab.POLL_RUNNING_S < tab.running_poll_s(on("cpu"))
    assert tab.running_poll_s(SimpleNamespace(hardware=None)) == tab.POLL_RUNNING_CPU_S
    assert tab.chart_every_s(on("cuda")) == 0 < tab.chart_every_s(on("cpu")) == tab.CHART_EVERY_CPU_S


def test_on_a_cpu_machine_the_chart_lags_the_progress_line_by_at_most_its_interval(ctx, monkeypatch):
    monkeypatch.setattr(tab, "CHART_EVERY_CPU_S", 60.0)
    run = fake_run(ctx, "live", "running", [3.0], pid=os.getpid())
    watch = tab.select_run(ctx, "live")[0]

    def log_step(step):
        with (run / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"type": "train", "step": step, "loss": 3.0 - step / 10, "learning_rate": 1e-4}) + "\n")

    log_step(2)
    watch, figure, progress, *_ = tab.tick(ctx, watch)
    assert is_skip(figure) and 'data-step="2"' in progress  # the progress line moves; the chart waits
    assert all(is_skip(o) for o in tab.tick(ctx, watch))  # nothing new and not due: nothing is sent
    watch["drawn_at"] -= 60  # its interval has passed: the chart catches up with nothing new logged
    watch, figure, progress, *_ = tab.tick(ctx, watch)
    assert traces(figure)[0]["x"] == [1, 2] and is_skip(progress)

    log_step(3)  # the run ends within the interval: every point is shown at once
    write_json_atomic(run / "status.json", {"state": "completed", "step": 3, "max_steps": 3, "pid": None})
    watch, figure, progress, status, *_ = tab.tick(ctx, watch)
    assert traces(figure)[0]["x"] == [1, 2, 3] and 'data-state="completed"' in status


def test_the_live_stream_sends_only_changes_and_one_stream_per_session(ctx, monkeypatch):
    """follow() is what the page listens to: a first (empty) update, then one per change, none while
    nothing changes; a session's newer stream ends its older one."""

    monkeypatch.setattr(tab, "POLL_RUNNING_S", 0.05)
    monkeypatch.setattr(tab, "POLL_RUNNING_CPU_S", 0.05)
    monkeypatch.setattr(tab, "POLL_IDLE_S", 0.05)
    monkeypatch.setattr(tab, "CHART_EVERY_CPU_S", 0.0)
    run = fake_run(ctx, "live", "running", [3.0], pid=os.getpid())
    watch = tab.select_run(ctx, "live")[0]

    async def scenario():
        stream = tab.follow(ctx, watch, "session-a")
        first = await asyncio.wait_for(anext(stream), 5)
        assert len(first) == 7 and all(is_skip(o) for o in first)  # already shown by select_run
        with pytest.raises(asyncio.TimeoutError):  # nothing changed: nothing is sent
            await asyncio.wait_for(asyncio.shield(pending := asyncio.ensure_future(anext(stream))), 0.5)
        with (run / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"type": "train", "step": 2, "loss": 2.5, "learning_rate": 1e-4}) + "\n")
        figure, progress, status, log, table, dropdown, session_run = await asyncio.wait_for(pending, 5)
        assert traces(figure)[0]["x"] == [1, 2] and 'data-step="2"' in progress
        assert all(is_skip(o) for o in (status, log, table, dropdown, session_run))

        # A new step in status.json moves the progress bar only: the status line shows the state,
        # and redrawing it on every step costs the browser (bench/bench_ui.py).
        stepped = {**json.loads((run / "status.json").read_text()), "step": 3}
        write_json_atomic(run / "status.json", stepped)
        figure, progress, status, *rest = await asyncio.wait_for(anext(stream), 5)
        assert 'data-step="3"' in progress and is_skip(status) and is_skip(figure)
        assert all(is_skip(o) for o in rest)

        write_json_atomic(run / "status.json", {"state": "completed", "step": 2, "max_steps": 2, "pid": None})
        out = await asyncio.wait_for(anext(stream), 5)
        assert 'data-state="completed"' in out[2] and out[5]["value"] == "live"  # history follows the state
        assert out[4][out[4]["name"] == "live"].iloc[0]["status"] == "completed"

        newer = tab.follow(ctx, None, "session-a")  # the page showed something else
        await asyncio.wait_for(anext(newer), 5)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(stream), 5)
        other = tab.follow(ctx, None, "session-b")  # another page's stream lives on its own
        await asyncio.wait_for(anext(other), 5)
        assert set(ctx.followers) == {"session-a", "session-b"}
        await newer.aclose()
        await other.aclose()
        assert ctx.followers == {}

    asyncio.run(scenario())


# -- wiring ------------------------------------------------------------------------------------------------

async def first_update(stream):
    try:
        return await anext(stream)
    finally:
        await stream.aclose()


def test_build_tab_wires_handlers_to_matching_outputs(ctx):
    ctx.settings.demo = True  # a stray Train event in this test must not start anything
    with gr.Blocks() as demo:
        session = SessionStates.create()
        tab.build_tab(ctx, session)
    called = 0
    for fn in demo.fns.values():
        if fn.fn is None or any(isinstance(i, gr.Dataframe) for i in fn.inputs):
            continue  # the table's select handler needs a click event
        args = [getattr(i, "value", None) for i in fn.inputs]
        try:
            if inspect.isasyncgenfunction(fn.fn):  # the live stream: its first update
                result = asyncio.run(first_update(fn.fn(*args, SimpleNamespace(session_hash="wiring"))))
            else:
                result = fn.fn(*args)
        except gr.Error:
            continue  # e.g. "Load config" with no run picked
        n = len(fn.outputs)
        got = len(result) if isinstance(result, (tuple, list)) and n > 1 else 1
        assert got == n, (fn.name, got, n)
        called += 1
    assert called >= 12
    assert not any(ctx.runs_root.iterdir())
