"""What users leave with: an adapter bundle with a model card, a merged model, a Hub push, and the way back in.

Every export is written into a hidden folder beside its destination and moved into place
only when complete, so a crash or an interruption never leaves a half-written bundle
under the name the user asked for, and an existing folder is never replaced silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import StudioConfig
from .export_hub import HubError, check_push, push_to_hub  # noqa: F401  (re-exported: the public entry point)
from .model_card import LOSS_CURVE, RunFacts, plot_loss_curve, read_metrics_file, render_card
from .runs import now_iso, pid_alive, read_json, read_status

MANIFEST = "export.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# Everything in a run's adapter/ folder goes into the bundle except peft's stub README: the card replaces it.
_SKIP_FROM_ADAPTER = {"README.md"}
MAX_IMPORT_BYTES = 8 * 2**30


class ExportError(RuntimeError):
    """An export or import cannot go on; the message says why and what to do."""


class DestinationExists(ExportError):
    """The destination is taken and overwriting was not asked for (or is not safe)."""


# -- where an adapter and its run facts live --------------------------------------------------

@dataclass
class AdapterSource:
    """An adapter plus the folder with its config.yaml/run.json/metrics.jsonl (a run folder or a bundle)."""

    adapter_dir: Path
    meta_dir: Path | None
    name: str

    def config(self) -> StudioConfig:
        if self.meta_dir and (self.meta_dir / "config.yaml").exists():
            return StudioConfig.load(self.meta_dir / "config.yaml")
        # A bare adapter folder: the base comes from peft's own record, everything else is default.
        base = read_json(self.adapter_dir / "adapter_config.json").get("base_model_name_or_path") or "embedded"
        return StudioConfig().with_overrides([f"model.name={base}"])

    def info(self) -> dict:
        return read_json(self.meta_dir / "run.json") if self.meta_dir else {}

    def metrics(self) -> list[dict]:
        return read_metrics_file(self.meta_dir / "metrics.jsonl") if self.meta_dir else []

    def facts(self) -> RunFacts:
        state = read_status(self.meta_dir).get("state", "") if self.meta_dir else ""
        return RunFacts(name=self.name, config=self.config(), info=self.info(), metrics=self.metrics(), state=state)


def adapter_source(path: str | Path) -> AdapterSource:
    """Accept a run folder (with adapter/), an exported bundle, or a bare peft adapter folder."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ExportError(f"{path} is not a folder; pick a run folder or an exported adapter bundle")
    if (path / "adapter" / "adapter_config.json").exists():
        return AdapterSource(path / "adapter", path, path.name)
    if (path / "adapter_config.json").exists():
        meta = path if (path / "config.yaml").exists() else None
        manifest = read_json(path / MANIFEST)
        return AdapterSource(path, meta, manifest.get("run") or path.name)
    if (path / "config.yaml").exists():
        state = read_status(path).get("state", "unknown")
        raise ExportError(f"run {path.name} has no adapter yet (state: {state}); an adapter is saved when "
                          "training completes or is stopped")
    raise ExportError(f"{path} holds neither a run (config.yaml + adapter/) nor an adapter (adapter_config.json)")


def validate_adapter_folder(path: str | Path, label: str | None = None) -> Path:
    """Check that a folder holds a loadable peft LoRA adapter; return it, or say what is missing."""
    path = Path(path)
    label = label or path.name
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    config_path = path / "adapter_config.json"
    if not config_path.exists():
        raise ExportError(f"no adapter_config.json in {label} (found: {', '.join(found) or 'nothing'}); "
                          "an adapter bundle needs adapter_config.json and adapter_model.safetensors")
    try:
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"adapter_config.json in {label} is not valid JSON: {e}") from None
    if not isinstance(adapter_config, dict) or "peft_type" not in adapter_config:
        raise ExportError(f"adapter_config.json in {label} has no 'peft_type': it is not a peft adapter config")
    weights = next((path / w for w in WEIGHT_FILES if (path / w).exists()), None)
    if weights is None:
        raise ExportError(f"no adapter weights in {label} (expected adapter_model.safetensors; found: "
                          f"{', '.join(found)})")
    if weights.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(weights), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception as e:
            raise ExportError(f"{weights.name} in {label} is not a readable safetensors file ({e})") from None
        if not any("lora_" in k for k in keys):
            raise ExportError(f"{weights.name} in {label} holds no LoRA weights ({len(keys)} tensors, none "
                              "named lora_*)")
    return path


# -- writing safely ----------------------------------------------------------------------------

def _umask() -> int:
    # Reading it from /proc avoids os.umask's set-and-restore, which races other threads of the app.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _partial_prefix(dest: Path) -> str:
    return f".{dest.name}.partial-"


def _clean_stale_partials(dest: Path) -> None:
    """Remove leftovers of earlier exports to the same place whose process died (e.g. killed -9)."""
    _clean_dead(dest.parent, _partial_prefix(dest))
    _clean_dead(dest.parent, f".{dest.name}.old-")


def _clean_dead(parent: Path, prefix: str) -> None:
    """Remove `<prefix><pid>-*` entries of processes that no longer exist (never a live writer's)."""
    for sibling in parent.glob(prefix + "*"):
        pid = sibling.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            if sibling.is_dir():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)


def check_destination(dest: Path, overwrite: bool) -> None:
    """Refuse an existing destination unless asked, and even then only one that is an earlier export."""
    if not dest.exists() and not dest.is_symlink():
        return
    if not overwrite:
        raise DestinationExists(f"{dest} already exists; choose another destination or allow overwriting "
                                "(overwrite=True, --force on the command line)")
    if dest.is_symlink():
        raise DestinationExists(f"{dest} is a symbolic link; refusing to replace it")
    if dest.is_dir():
        if any(dest.iterdir()) and not (dest / MANIFEST).exists():
            raise DestinationExists(f"{dest} is a folder that was not written by an export (no {MANIFEST}); "
                                    "refusing to replace it even with overwrite")
    elif dest.suffix != ".zip":
        raise DestinationExists(f"{dest} is an existing file that is not a .zip; refusing to replace it")


@contextlib.contextmanager
def staged(dest: Path, overwrite: bool = False, *, is_file: bool = False):
    """Yield a temporary path beside `dest`; move it onto `dest` only if the block finishes."""
    dest = Path(dest).expanduser().absolute()
    check_destination(dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_partials(dest)
    prefix = f"{_partial_prefix(dest)}{os.getpid()}-"
    if is_file:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
    # mkdtemp/mkstemp make owner-only entries; an export should get the user's usual permissions.
    os.chmod(tmp, (0o777 if not is_file else 0o666) & ~_umask())
    try:
        yield tmp
        _swap_in(tmp, dest, overwrite)
    except BaseException:
        # BaseException too: Ctrl-C or a stop mid-export must not leave the partial folder behind.
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _swap_in(tmp: Path, dest: Path, overwrite: bool) -> None:
    check_destination(dest, overwrite)  # something may have appeared while we were writing
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:  # put the previous export back rather than leave nothing
            os.replace(old, dest)
        raise
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path, manifest: dict) -> dict:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {**manifest, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def zip_folder(folder: str | Path, zip_path: str | Path, *, overwrite: bool = False) -> Path:
    """Zip a folder as `<folder name>/...` entries, written beside the target and moved into place."""
    folder, zip_path = Path(folder), Path(zip_path).expanduser().absolute()
    with staged(zip_path, overwrite, is_file=True) as tmp:
        _zip_into(folder, tmp, folder.name)
    return zip_path


def _zip_into(folder: Path, zip_file: Path, root_name: str) -> None:
    with zipfile.ZipFile(zip_file, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, f"{root_name}/{p.relative_to(folder).as_posix()}")


# -- adapter bundle ----------------------------------------------------------------------------

@dataclass
class ExportResult:
    path: Path
    kind: str                                  # "adapter" or "merged"
    zip_path: Path | None = None
    manifest: dict = field(default_factory=dict)

    @property
    def max_abs_logit_diff(self) -> float | None:
        return (self.manifest.get("merge") or {}).get("max_abs_logit_diff")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"], d["zip_path"] = str(self.path), str(self.zip_path) if self.zip_path else None
        return d


def _require_finished(source: AdapterSource) -> None:
    if source.meta_dir is None:
        return
    status = read_status(source.meta_dir)
    if status.get("state") == "running":
        raise ExportError(f"run {source.name} is still training (step {status.get('step', '?')}); wait for it to "
                          "finish or stop it, then export")


def _bundle_tokenizer(source: AdapterSource, config: StudioConfig, into: Path) -> None:
    """Save the tokenizer with the chat template the run trained with, so plain `transformers` renders alike."""
    from .models import load_tokenizer, resolve_model
    from .templates import template_source

    has_own = (source.adapter_dir / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(str(source.adapter_dir) if has_own
                               else resolve_model(config.model.name, config.model.revision).path)
    tokenizer.chat_template = template_source(tokenizer, config.data.template)
    tokenizer.save_pretrained(into)


def _public_run_info(info: dict) -> dict:
    """run.json without this machine's paths: the bundle may be published."""
    info = json.loads(json.dumps(info))
    (info.get("model") or {}).pop("path", None)
    (info.get("data") or {}).pop("location", None)
    return info


def _write_run_files(source: AdapterSource, facts: RunFacts, into: Path) -> bool:
    facts.config.save(into / "config.yaml", header=f"# The training config of run {facts.name} "
                                                   "(qlora-studio train config.yaml repeats it)")
    (into / "run.json").write_text(json.dumps(_public_run_info(facts.info), indent=2), encoding="utf-8")
    metrics = source.meta_dir / "metrics.jsonl" if source.meta_dir else None
    if metrics is not None and metrics.exists():
        shutil.copyfile(metrics, into / "metrics.jsonl")
    else:
        (into / "metrics.jsonl").write_text("", encoding="utf-8")
    return plot_loss_curve(facts.metrics, into / LOSS_CURVE, title=f"{facts.name}: loss")


def _export(run_dir, out, *, kind: str, overwrite: bool, make_zip: bool, fill) -> ExportResult:
    """The shared frame of every export: checks, a staged folder that `fill` writes, manifest, zip.

    `fill(tmp, source, facts)` writes the kind-specific files and returns manifest entries. The
    zip is built from the finished folder; if anything fails, neither the folder nor the zip stays.
    """
    source = adapter_source(run_dir)
    _require_finished(source)
    validate_adapter_folder(source.adapter_dir)
    out = Path(out).expanduser().absolute()
    zip_path = out.with_name(out.name + ".zip") if make_zip else None
    check_destination(out, overwrite)
    if zip_path is not None:
        check_destination(zip_path, overwrite)
    facts = source.facts()
    zip_placed = False
    try:
        with staged(out, overwrite) as tmp:
            extra = fill(tmp, source, facts)
            manifest = _write_manifest(tmp, {"format": "qlora-studio-export", "version": 1, "kind": kind,
                                             "run": facts.name, "base_model": facts.base_model,
                                             "created_at": now_iso(), **extra})
            if zip_path is not None:
                with staged(zip_path, overwrite, is_file=True) as ztmp:
                    _zip_into(tmp, ztmp, out.name)
                zip_placed = True
    except BaseException:
        if zip_placed:  # the folder failed to move in after its zip did: the zip must not outlive it
            zip_path.unlink(missing_ok=True)
        raise
    return ExportResult(out, kind, zip_path, manifest)


def export_adapter(run_dir: str | Path, out: str | Path, *, overwrite: bool = False, make_zip: bool = False,
                   verify: bool = False) -> ExportResult:
    """Write the adapter bundle (adapter, tokenizer, config, metrics, loss curve, model card) to `out`.

    With make_zip, `out`.zip is written too. With verify, the bundle is loaded with plain peft
    in a fresh process before it is moved into place and its logits compared with the studio's.
    """
    def fill(tmp: Path, source: AdapterSource, facts: RunFacts) -> dict:
        for p in sorted(source.adapter_dir.iterdir()):
            if p.is_file() and p.name not in _SKIP_FROM_ADAPTER:
                shutil.copyfile(p, tmp / p.name)
        _bundle_tokenizer(source, facts.config, tmp)
        has_curve = _write_run_files(source, facts, tmp)
        (tmp / "README.md").write_text(render_card(facts, kind="adapter", has_loss_curve=has_curve),
                                       encoding="utf-8")
        if not verify:
            return {}
        from .export_verify import verify_bundle
        return {"verify": verify_bundle(tmp, reference=run_dir)}

    return _export(run_dir, out, kind="adapter", overwrite=overwrite, make_zip=make_zip, fill=fill)


# -- merged model ------------------------------------------------------------------------------

def export_merged(run_dir: str | Path, out: str | Path, *, overwrite: bool = False, make_zip: bool = False,
                  prompts: list[str] | None = None, dtype: str | None = None) -> ExportResult:
    """Merge the adapter into a 16-bit copy of the base and save it, with tokenizer, chat template and card.

    The saved folder is loaded back and its logits compared with base+adapter (unmerged) on a few
    prompts; the largest difference is in the manifest and the card. `run_dir` may also be a bundle.
    `dtype` is "bf16" or "fp16" (default: bf16 where the hardware has it).
    """
    from .export_verify import merge_and_check, merge_dtype
    from .models import detect_hardware

    try:
        dtype = merge_dtype(detect_hardware(), dtype)
    except ValueError as e:
        raise ExportError(str(e)) from None

    def fill(tmp: Path, source: AdapterSource, facts: RunFacts) -> dict:
        report = merge_and_check(source, tmp, prompts=prompts, dtype=dtype)
        has_curve = _write_run_files(source, facts, tmp)
        (tmp / "README.md").write_text(render_card(facts, kind="merged", merge_report=report,
                                                   has_loss_curve=has_curve), encoding="utf-8")
        return {"merge": report}

    return _export(run_dir, out, kind="merged", overwrite=overwrite, make_zip=make_zip, fill=fill)


# -- import ------------------------------------------------------------------------------------

def _safe_members(zf: zipfile.ZipFile, limit: int) -> list[zipfile.ZipInfo]:
    members, total = [], 0
    for info in zf.infolist():
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
            raise ExportError(f"refusing the zip: entry {name!r} points outside the folder it unpacks into")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise ExportError(f"refusing the zip: entry {name!r} is a symbolic link")
        total += info.file_size
        if total > limit:
            raise ExportError(f"refusing the zip: it unpacks to more than {limit / 2**30:.1f} GiB")
        members.append(info)
    return members


def _find_adapter_root(folder: Path) -> Path:
    if (folder / "adapter_config.json").exists():
        return folder
    children = [p for p in folder.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    if len(children) == 1 and children[0].is_dir():
        return _find_adapter_root(children[0])
    return folder


def _unique_child(root: Path, name: str) -> Path:
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".-") or "adapter"
    candidate, n = root / name, 2
    while candidate.exists():
        candidate, n = root / f"{name}-{n}", n + 1
    return candidate


def import_bundle(src: str | Path, dest_root: str | Path, *, max_bytes: int = MAX_IMPORT_BYTES) -> Path:
    """An exported bundle (zip or folder) -> a validated adapter folder the Chat tab can load.

    A folder is validated and used where it is; a zip is unpacked under dest_root into a new folder
    (never over an existing one). Entries with absolute paths, '..' or links are refused.
    """
    src = Path(src).expanduser()
    if src.is_dir():
        return validate_adapter_folder(_find_adapter_root(src)).absolute()
    if not src.exists():
        raise ExportError(f"{src} does not exist")
    if not zipfile.is_zipfile(src):
        raise ExportError(f"{src.name} is neither a folder nor a zip file")
    dest_root = Path(dest_root).expanduser().absolute()
    dest_root.mkdir(parents=True, exist_ok=True)
    stem = src.name[:-4] if src.name.lower().endswith(".zip") else src.stem
    with zipfile.ZipFile(src) as zf:
        members = _safe_members(zf, max_bytes)
        _clean_dead(dest_root, ".import-")
        work = Path(tempfile.mkdtemp(prefix=f".import-{os.getpid()}-", dir=dest_root))
        try:
            zf.extractall(work, members=members)
            root = validate_adapter_folder(_find_adapter_root(work), label=src.name)
            os.chmod(root, 0o777 & ~_umask())
            target = _unique_child(dest_root, stem)
            os.replace(root, target)  # the adapter appears whole, or not at all
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target

