"""Exports of a real trained run (the shared `trained_run`: nf4 QLoRA of the embedded model on sample:persona)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile

import pytest
import yaml

from qlora_studio.config import StudioConfig, iter_fields
from qlora_studio.export import export_adapter, export_merged, import_bundle
from qlora_studio.export_verify import verify_bundle

pytestmark = pytest.mark.slow

REQUIRED = ("adapter_model.safetensors", "adapter_config.json", "config.yaml", "metrics.jsonl", "loss_curve.png",
            "README.md")


@pytest.fixture(scope="module")
def bundle(trained_run, tmp_path_factory):
    return export_adapter(trained_run, tmp_path_factory.mktemp("export") / "persona-adapter", make_zip=True)


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_bundle_holds_adapter_config_metrics_curve_and_card(bundle, trained_run):
    folder = bundle.path
    assert set(REQUIRED) <= {p.name for p in folder.iterdir()}
    for name in ("adapter_model.safetensors", "metrics.jsonl"):
        src = trained_run / ("adapter" if name.startswith("adapter") else "") / name
        assert (folder / name).read_bytes() == src.read_bytes(), name
    assert StudioConfig.load(folder / "config.yaml") == StudioConfig.load(trained_run)
    assert (folder / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "tokenizer_config.json").exists()  # with the training chat template: see the fresh-load test
    import hashlib
    manifest = json.loads((folder / "export.json").read_text())
    assert manifest["kind"] == "adapter" and manifest["run"] == trained_run.name
    for name, meta in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == meta["sha256"], name
    with zipfile.ZipFile(bundle.zip_path) as zf:
        assert sorted(zf.namelist()) == sorted(f"{folder.name}/{n}" for n in [*manifest["files"], "export.json"])
        weights = (folder / "adapter_model.safetensors").read_bytes()
        assert zf.read(f"{folder.name}/adapter_model.safetensors") == weights


def test_model_card_names_everything_the_issue_lists(bundle, trained_run):
    card = (bundle.path / "README.md").read_text()
    info = json.loads((trained_run / "run.json").read_text())
    cfg = StudioConfig.load(trained_run)
    meta = _front_matter(card)
    assert meta["base_model"] == info["model"]["display_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "peft" and meta["license"] == info["model"]["license"] == "apache-2.0"
    assert {"qlora", "lora", "peft", "trl", "sft"} <= set(meta["tags"])
    data = info["data"]
    assert f"`{cfg.data.source}`: {data['rows_used']} of {data['rows_total']} rows used" in card
    assert f"({data['rows_train']} train, {data['rows_eval']} eval)" in card
    assert f"`{data['format']}`" in card and "Chat template | `model`" in card
    for dotted, _f, _t in iter_fields():
        if dotted not in ("run_name", "output_dir"):
            assert f"| `{dotted}` |" in card, dotted
    assert "4-bit NF4 (bitsandbytes), double quantization, compute dtype" in card
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in rows if r["type"] == "train"][-1]
    last_eval = [r for r in rows if r["type"] == "eval"][-1]
    assert f"Final train loss | {last_train['loss']:.4f}" in card
    assert f"Final eval loss | {last_eval['eval_loss']:.4f}" in card
    assert f"Hardware | CPU ({info['hardware']['name']}" in card or info["hardware"]["device"] == "cuda"
    assert re.search(r"Training time \| .*\d+ s", card)
    assert "PeftModel.from_pretrained(model, adapter)" in card and "BitsAndBytesConfig(" in card
    assert "released under `apache-2.0`" in card
    assert info["model"]["path"] not in card  # no local cache paths in what may be published


def test_imported_zip_loads_with_plain_peft_in_a_fresh_process_like_in_the_studio(bundle, trained_run, tmp_path):
    from qlora_studio.chat import resolve_adapter

    imported = import_bundle(bundle.zip_path, tmp_path / "imports")
    # The Chat tab sees the import as it sees the run: same base, template, system prompt, quantization.
    as_run, as_import = resolve_adapter(str(trained_run)), resolve_adapter(str(imported))
    for attr in ("base_model", "template", "system_prompt", "quant", "compute_dtype", "config"):
        assert getattr(as_import, attr) == getattr(as_run, attr), attr
    assert as_import.adapter_path == str(imported)
    # The studio side loads the run with the Chat tab's loader; the fresh process loads the import with plain peft.
    check = verify_bundle(imported, reference=trained_run)
    assert check["same_tokens"], "the bundle's chat template renders prompts differently"
    assert not check["fresh_process_imported_studio"]  # plain transformers + peft only
    # Same 4-bit load path on the same machine: identical up to kernel nondeterminism. In bf16 on a
    # CPU, bitsandbytes repacks 4-bit weights in place on first use and the two processes may round
    # through different kernels, so there a bf16-sized gap (logits ~20, 8-bit mantissa) is allowed.
    tolerance = 1e-2 if "float32" in check["loaded_with"] else 0.1 * check["adapter_effect"]
    assert check["max_abs_logit_diff"] <= tolerance, check
    # And the comparison means something: the adapter moves the logits by far more than that.
    assert check["adapter_effect"] > 0.5, check


def test_card_snippet_runs_with_plain_transformers_and_peft(bundle, embedded_path):
    card = (bundle.path / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    # The Hub id stands for the base; offline, point it at the same weights on disk.
    snippet = snippet.replace('base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"', f'base_model = "{embedded_path}"')
    snippet = snippet.replace("max_new_tokens=40", "max_new_tokens=4")  # it runs; how well it answers is chat's job
    assert str(embedded_path) in snippet and "max_new_tokens=4)" in snippet
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=bundle.path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip(), "the snippet generated nothing"


def test_merged_model_matches_base_plus_adapter(trained_run, tmp_path, embedded_path):
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qlora_studio.export_verify import DEFAULT_PROMPTS, _encode, _logits, _max_abs_diff, conversations
    from qlora_studio.models import load_tokenizer

    result = export_merged(trained_run, tmp_path / "merged")
    report = result.manifest["merge"]
    assert report["dtype"] == "bf16" and report["prompts"] == len(DEFAULT_PROMPTS)
    # The tolerance is bf16 itself: base+adapter run in bf16 instead of fp32 moves the logits this much.
    ids = _encode(load_tokenizer(str(trained_run / "adapter")), "model", conversations("", DEFAULT_PROMPTS))

    def unmerged(dtype):
        base = AutoModelForCausalLM.from_pretrained(embedded_path, dtype=dtype)
        return _logits(PeftModel.from_pretrained(base, str(trained_run / "adapter")).eval(), ids)

    bf16_noise = _max_abs_diff(unmerged(torch.float32), unmerged(torch.bfloat16))
    assert 0 < report["max_abs_logit_diff"] <= 2 * bf16_noise, (report, bf16_noise)
    assert report["top1_agreement"] >= 0.9, report
    folder = result.path
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert (folder / "chat_template.jinja").exists() and (folder / "tokenizer.json").exists()
    assert not (folder / "adapter_config.json").exists()
    with safe_open(str(folder / "model.safetensors"), "pt") as merged, \
            safe_open(str(embedded_path / "model.safetensors"), "pt") as base:
        assert all(merged.get_slice(k).get_dtype() == "BF16" for k in merged.keys())
        assert not any("lora" in k for k in merged.keys())
        q = "model.layers.0.self_attn.q_proj.weight"
        emb = "model.embed_tokens.weight"
        # LoRA layers changed, untouched ones are the base's own weights in bf16 (not a 4-bit round trip).
        assert not torch.equal(merged.get_tensor(q), base.get_tensor(q).to(torch.bfloat16))
        assert torch.equal(merged.get_tensor(emb), base.get_tensor(emb).to(torch.bfloat16))
    card = (folder / "README.md").read_text()
    assert _front_matter(card)["library_name"] == "transformers" and "Merge check" in card


def test_cli_export_and_overwrite_protection(trained_run, tmp_path, capsys):
    from qlora_studio.cli import main

    out = tmp_path / "cli-bundle"
    assert main(["export", str(trained_run), "--out", str(out), "--zip"]) == 0
    printed = capsys.readouterr().out
    assert f"exported adapter: {out}" in printed and f"zip: {out}.zip" in printed
    assert main(["export", str(trained_run), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(trained_run), "--out", str(out), "--zip", "--force"]) == 0
    assert main(["export", str(tmp_path / "missing")]) == 1
    assert "not a folder" in capsys.readouterr().err
