"""Export safety on a tiny run built here (fast): no silent overwrite, nothing half-written, safe imports.

`make_tiny_run` is also used by test_export_tab.py and test_export_hub.py.
"""

from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path

import pytest

from qlora_studio import export as export_mod
from qlora_studio.export import ExportError, adapter_source, export_adapter, import_bundle, zip_folder


def make_tiny_run(root: Path, embedded_path: Path, name: str = "tiny-run", state: str = "completed") -> Path:
    """A run folder per the contract around a tiny random Llama (real tokenizer, real peft adapter)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_studio.config import StudioConfig
    from qlora_studio.models import load_tokenizer
    from qlora_studio.runs import now_iso, write_json_atomic

    tokenizer = load_tokenizer(str(embedded_path))
    base_dir = root / "tiny-base"
    if not (base_dir / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        LlamaForCausalLM(config).save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    run = root / name
    run.mkdir(parents=True)
    torch.manual_seed(1)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                      task_type="CAUSAL_LM"))
    model.save_pretrained(run / "adapter")
    tokenizer.save_pretrained(run / "adapter")
    cfg = StudioConfig().with_overrides([f"model.name={base_dir}", "quant.compute_dtype=bf16", "lora.r=4",
                                         "lora.alpha=8", f"run_name={name}", f"output_dir={root}",
                                         "data.system_prompt=Talk like a pirate."])
    cfg.save(run / "config.yaml")
    rows = [{"type": "train", "step": s, "epoch": s / 4, "loss": 3.0 - 0.25 * s, "learning_rate": 1e-4,
             "elapsed_s": 1.5 * s, "max_steps": 4} for s in range(1, 5)]
    rows.append({"type": "eval", "step": 4, "epoch": 1.0, "eval_loss": 2.4, "elapsed_s": 6.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_json_atomic(run / "status.json", {"state": state, "reason": "", "step": 4, "max_steps": 4,
                                            "pid": os.getpid() if state == "running" else None,
                                            "started_at": now_iso(), "updated_at": now_iso(),
                                            "finished_at": now_iso()})
    write_json_atomic(run / "run.json", {
        "compute_dtype": "bf16", "hardware": {"device": "cpu", "name": "x86_64", "bf16": True, "memory_gb": 16},
        "model": {"name": str(base_dir), "path": str(base_dir), "display_name": "tiny-llama", "license": "mit"},
        "data": {"format": "messages", "rows_total": 10, "rows_used": 9, "rows_train": 8, "rows_eval": 1,
                 "location": str(root / "secret-data.jsonl")},
        "versions": {"torch": torch.__version__}, "trainable_params": 1234, "total_params": 99999})
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, embedded_path) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("tiny"), embedded_path)


def _entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_existing_destination_is_refused_unless_overwrite(tiny_run, tmp_path):
    out = tmp_path / "bundle"
    first = export_adapter(tiny_run, out, make_zip=True)
    stamp = first.manifest["created_at"]
    with pytest.raises(ExportError, match="already exists"):
        export_adapter(tiny_run, out)
    with pytest.raises(ExportError, match="already exists"):
        zip_folder(out, tmp_path / "bundle.zip")
    # An existing zip alone is refused too, before the folder is written.
    (tmp_path / "other.zip").write_bytes(b"mine")
    with pytest.raises(ExportError, match="other.zip already exists"):
        export_adapter(tiny_run, tmp_path / "other", make_zip=True)
    assert not (tmp_path / "other").exists() and (tmp_path / "other.zip").read_bytes() == b"mine"
    (tmp_path / "other.zip").unlink()
    assert json.loads((out / "export.json").read_text())["created_at"] == stamp
    again = export_adapter(tiny_run, out, overwrite=True, make_zip=True)
    assert again.path == out and (out / "adapter_model.safetensors").exists()
    assert _entries(tmp_path) == {"bundle", "bundle.zip"}  # no .old or .partial leftovers


def test_overwrite_never_replaces_a_folder_that_is_not_an_export(tiny_run, tmp_path):
    precious = tmp_path / "my-documents"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ExportError, match="not written by an export"):
        export_adapter(tiny_run, precious, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "years of work"
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(ExportError, match="not a .zip"):
        zip_folder(tiny_run / "adapter", tmp_path / "notes.txt", overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_export_leaves_nothing_half_written(tiny_run, tmp_path, monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(export_mod, "plot_loss_curve", fail)
    with pytest.raises(type(error)):
        export_adapter(tiny_run, tmp_path / "bundle", make_zip=True)
    assert _entries(tmp_path) == set()


def test_interrupted_zip_leaves_neither_folder_nor_zip(tiny_run, tmp_path, monkeypatch):
    real = export_mod._zip_into

    def half_then_fail(folder, zip_file, root_name):
        real(folder, zip_file, root_name)  # the zip is fully written to its temporary name...
        raise OSError("no space left on device")  # ...and then the move fails

    monkeypatch.setattr(export_mod, "_zip_into", half_then_fail)
    with pytest.raises(OSError):
        export_adapter(tiny_run, tmp_path / "bundle", make_zip=True)
    assert _entries(tmp_path) == set()


def test_zip_does_not_outlive_a_folder_that_failed_to_move_in(tiny_run, tmp_path, monkeypatch):
    real = export_mod._swap_in

    def folder_move_fails(tmp, dest, overwrite):
        if dest.suffix != ".zip":
            raise OSError("cross-device link")
        real(tmp, dest, overwrite)

    monkeypatch.setattr(export_mod, "_swap_in", folder_move_fails)
    with pytest.raises(OSError):
        export_adapter(tiny_run, tmp_path / "bundle", make_zip=True)
    assert _entries(tmp_path) == set()


def test_failed_overwrite_keeps_the_previous_export(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    first = export_adapter(tiny_run, out)
    monkeypatch.setattr(export_mod, "render_card", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        export_adapter(tiny_run, out, overwrite=True)
    assert json.loads((out / "export.json").read_text())["created_at"] == first.manifest["created_at"]
    assert _entries(tmp_path) == {"bundle"}


def test_leftovers_of_a_killed_export_are_cleaned_up(tiny_run, tmp_path):
    # What a `kill -9` mid-export leaves: a hidden partial folder named after a dead process.
    stale = tmp_path / ".bundle.partial-999999999-abcd"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    export_adapter(tiny_run, tmp_path / "bundle")
    assert _entries(tmp_path) == {"bundle"}


def test_bundle_permissions_follow_the_umask(tiny_run, tmp_path):
    result = export_adapter(tiny_run, tmp_path / "bundle", make_zip=True)
    assert stat.S_IMODE(result.path.stat().st_mode) & 0o055 == 0o055  # readable by others, like a normal folder
    assert stat.S_IMODE(result.zip_path.stat().st_mode) & 0o044 == 0o044


def test_running_or_adapterless_runs_are_refused_with_a_reason(tmp_path, embedded_path):
    running = make_tiny_run(tmp_path, embedded_path, name="busy", state="running")
    with pytest.raises(ExportError, match="still training"):
        export_adapter(running, tmp_path / "out")
    empty = tmp_path / "fresh"
    empty.mkdir()
    (empty / "config.yaml").write_text("run_name: fresh\n")
    with pytest.raises(ExportError, match="has no adapter yet"):
        adapter_source(empty)
    assert not (tmp_path / "out").exists()


def test_bundle_does_not_leak_local_paths(tiny_run, tmp_path):
    result = export_adapter(tiny_run, tmp_path / "bundle")
    info = json.loads((result.path / "run.json").read_text())
    assert "path" not in info["model"] and "location" not in info["data"]
    assert "secret-data" not in (result.path / "run.json").read_text()


# --- import ---------------------------------------------------------------------------------

def _zip(path: Path, entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def test_import_of_an_exported_zip_gives_a_valid_adapter_folder(tiny_run, tmp_path):
    result = export_adapter(tiny_run, tmp_path / "out" / "pirate", make_zip=True)
    imported = import_bundle(result.zip_path, tmp_path / "imports")
    assert imported.parent == tmp_path / "imports" and imported.name == "pirate"
    for name, meta in result.manifest["files"].items():
        assert (imported / name).read_bytes() == (result.path / name).read_bytes(), name
    # A second import never lands on the first.
    second = import_bundle(result.zip_path, tmp_path / "imports")
    assert second != imported and second.exists() and imported.exists()
    # A folder is validated and used in place.
    assert import_bundle(result.path, tmp_path / "imports") == result.path.absolute()


@pytest.mark.parametrize("bad_name", ["../evil.txt", "/etc/evil.txt", "ok/../../evil.txt", "C:/evil.txt"])
def test_import_refuses_zip_slip(tmp_path, bad_name):
    archive = _zip(tmp_path / "bad.zip", {"adapter_config.json": b"{}", bad_name: b"owned"})
    with pytest.raises(ExportError, match="outside the folder"):
        import_bundle(archive, tmp_path / "imports")
    assert not (tmp_path / "evil.txt").exists()
    assert not any((tmp_path / "imports").iterdir())


def test_import_refuses_symlinks(tmp_path):
    archive = _zip(tmp_path / "link.zip", {"adapter_config.json": b"{}"}, symlinks={"weights": "/etc/passwd"})
    with pytest.raises(ExportError, match="symbolic link"):
        import_bundle(archive, tmp_path / "imports")


def test_import_says_what_is_missing(tiny_run, tmp_path):
    no_config = _zip(tmp_path / "a.zip", {"b/adapter_model.safetensors": b"x", "b/notes.txt": b"hi"})
    with pytest.raises(ExportError, match=r"no adapter_config.json .*found: adapter_model.safetensors, notes.txt"):
        import_bundle(no_config, tmp_path / "imports")
    config = (tiny_run / "adapter" / "adapter_config.json").read_bytes()
    no_weights = _zip(tmp_path / "c.zip", {"adapter_config.json": config})
    with pytest.raises(ExportError, match="no adapter weights"):
        import_bundle(no_weights, tmp_path / "imports")
    broken = _zip(tmp_path / "d.zip", {"adapter_config.json": config, "adapter_model.safetensors": b"garbage"})
    with pytest.raises(ExportError, match="not a readable safetensors"):
        import_bundle(broken, tmp_path / "imports")
    not_peft = _zip(tmp_path / "e.zip", {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b""})
    with pytest.raises(ExportError, match="peft_type"):
        import_bundle(not_peft, tmp_path / "imports")
    (tmp_path / "f.zip").write_text("not a zip")
    with pytest.raises(ExportError, match="neither a folder nor a zip"):
        import_bundle(tmp_path / "f.zip", tmp_path / "imports")
    # Every failed import cleaned up after itself.
    assert not any((tmp_path / "imports").iterdir())


def test_import_refuses_zip_bombs(tiny_run, tmp_path):
    archive = _zip(tmp_path / "big.zip", {"adapter_config.json": b"{}", "pad.bin": b"\0" * 100_000})
    with pytest.raises(ExportError, match="unpacks to more than"):
        import_bundle(archive, tmp_path / "imports", max_bytes=50_000)


def test_cli_refuses_contradictory_flags(tiny_run, tmp_path, capsys):
    from qlora_studio.cli import main

    assert main(["export", str(tiny_run), "--out", str(tmp_path / "x"), "--dtype", "fp16"]) == 2
    assert "add --merge" in capsys.readouterr().err
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "x"), "--merge", "--verify"]) == 2
    # Offline (as conftest sets it), a push is refused before anything is exported.
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "x"), "--push", "me/pirate"]) == 1
    assert "Offline mode is on" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
