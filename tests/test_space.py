"""Runs anywhere: Space metadata, offline start, upload limit, secrets kept out of run folders."""

import re
import urllib.request
from pathlib import Path

import gradio
import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent


def _pyproject_dependencies() -> list[str]:
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
    return [line.strip().strip(",").strip('"') for line in block.splitlines() if line.strip()]


def test_space_front_matter_matches_the_pinned_gradio():
    front = yaml.safe_load((REPO / "README.md").read_text().split("---")[1])
    assert front["sdk"] == "gradio" and front["app_file"] == "app.py"
    assert front["sdk_version"] == gradio.__version__
    assert f"gradio=={front['sdk_version']}" in _pyproject_dependencies()
    assert len(front["short_description"]) <= 60 and front["title"]


def test_requirements_txt_equals_pyproject_dependencies():
    lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines == _pyproject_dependencies()


def test_app_starts_offline_and_serves_its_page(running_app):
    with urllib.request.urlopen(running_app.url, timeout=10) as response:
        page = response.read().decode()
    assert "QLoRA Studio" in page
    config = httpx.get(running_app.url + "config", timeout=10).json()
    labels = {c.get("props", {}).get("label") for c in config["components"]}
    assert {"Dataset", "Train", "Chat", "Export"} <= labels
    assert "Traceback" not in running_app.read_log()


def test_oversized_upload_is_refused_with_a_clear_status(running_app):
    big = b"x" * (2 * 1024 * 1024)  # the fixture's limit is 1 MB
    response = httpx.post(running_app.url + "gradio_api/upload", files={"files": ("big.jsonl", big)}, timeout=30)
    assert response.status_code == 413
    assert "maximum allowed size" in response.text
    small = httpx.post(running_app.url + "gradio_api/upload", files={"files": ("ok.jsonl", b"{}\n")}, timeout=30)
    assert small.status_code == 200


def test_a_token_given_to_a_run_never_reaches_its_folder(tmp_path):
    from qlora_studio.config import StudioConfig
    from qlora_studio.runs import wait_for_state
    from qlora_studio.supervisor import TrainerSupervisor

    secret = "hf_studioTestSecret0123456789abcdef"
    supervisor = TrainerSupervisor(tmp_path)
    config = StudioConfig.load(REPO / "presets" / "quick-cpu.yaml").with_overrides(
        ["run_name=secret", "train.max_steps=1", "train.batch_size=2", "data.max_length=96",
         "data.eval_fraction=0"])
    run_dir = supervisor.start(config, extra_env={"HF_TOKEN": secret, "HUGGING_FACE_HUB_TOKEN": secret})
    assert wait_for_state(run_dir, timeout=600)["state"] == "completed"
    supervisor.wait(timeout=60)
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"token leaked into {path}"


def test_two_browser_sessions_keep_their_own_dataset_choice(running_app):
    from gradio_client import Client

    first, second = Client(running_app.url, verbose=False), Client(running_app.url, verbose=False)
    params = first.view_api(return_format="dict", print_info=False)["named_endpoints"]["/on_check"]["parameters"]
    inputs = {p["parameter_name"]: p.get("parameter_default") for p in params}
    sample = next(p["parameter_name"] for p in params if p["label"] == "Sample")
    detection = first.predict(**{**inputs, sample: "instructions"}, api_name="/on_check")[0]
    assert "alpaca" in detection
    # The Train form takes the session's dataset: only the first session chose the instruction set.
    first_form = first.predict("quick-cpu", api_name="/train_load_preset")
    second_form = second.predict("quick-cpu", api_name="/train_load_preset")
    assert "sample:instructions" in first_form and "sample:instructions" not in second_form
    assert "sample:persona" in second_form
