"""Where a chat adapter comes from: a run folder, an adapter folder or zip, or a Hub adapter id.

Whatever the source, the answer names the base model (the run's config, else the adapter's
adapter_config.json), the template and system prompt the adapter was trained with, and how the
base was quantized, so chat shows the model the same prompt format it learned.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .config import EMBEDDED_MODEL, ConfigError, QuantConfig, StudioConfig
from .models import EMBEDDED_DISPLAY, is_offline, studio_home

ADAPTER_CONFIG = "adapter_config.json"
_EMBEDDED_ALIASES = (EMBEDDED_MODEL, EMBEDDED_DISPLAY, "SmolLM2-135M-Instruct")
# What a Hub adapter repo needs for chat; model weights of a full checkpoint are not fetched.
_HUB_PATTERNS = [ADAPTER_CONFIG, "adapter_model.safetensors", "adapter_model.bin", "tokenizer*", "*.jinja",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "*.model", "config.yaml", "README.md"]


class ChatError(ValueError):
    """Chat cannot go on; the message says why and what to do."""


class PoolBusy(ChatError):
    """Another session holds the loaded model right now."""


@dataclass
class AdapterInfo:
    adapter_path: str                 # folder holding adapter_config.json and the adapter weights
    base_model: str                   # what resolve_model() receives
    label: str                        # how the UI and the CLI name this adapter
    recorded_base: str = ""           # base_model_name_or_path from adapter_config.json
    template: str = "model"           # the template it was trained with
    system_prompt: str = ""           # the system prompt added during training
    quant: QuantConfig = field(default_factory=QuantConfig)
    compute_dtype: str = "auto"
    revision: str = ""
    trust_remote_code: bool = False
    run_dir: str | None = None
    config: StudioConfig | None = None  # the run's config, when there is one (its data gives the eval split)
    notes: list = field(default_factory=list)

    @property
    def base_display(self) -> str:
        return EMBEDDED_DISPLAY if self.base_model in _EMBEDDED_ALIASES else self.base_model


def same_model(a: str, b: str) -> bool:
    """Whether two model names mean the same weights ('embedded' and its Hub name are one model)."""
    def canonical(name: str) -> str:
        name = (name or "").strip().rstrip("/")
        if name in _EMBEDDED_ALIASES:
            return EMBEDDED_DISPLAY
        path = Path(name).expanduser()
        return str(path.resolve()) if path.exists() else name
    return canonical(a) == canonical(b)


def resolve_adapter(source: str | os.PathLike, *, base: str = "") -> AdapterInfo:
    """A run folder, adapter folder, adapter .zip or Hub adapter id -> what chat needs to load it.

    `base` overrides the base model recorded with the adapter (for adapters whose recorded base
    is a folder on another machine); a base that does not fit fails at load with both names.
    """
    text = str(source or "").strip()
    if not text:
        raise ChatError("Choose an adapter: a run, an adapter folder or .zip, or a Hub adapter id (org/name).")
    path = Path(text).expanduser()
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise ChatError(f"{text} is a file but not a .zip; give a run folder, an adapter folder or an adapter .zip")
        info = _from_folder(_find_adapter(_extract_zip(path), text), label=path.name)
    elif path.is_dir():
        info = _from_folder(path, label=path.resolve().name)
    elif text.count("/") == 1 and not text.startswith((".", "/", "~")):
        info = _from_folder(_hub_adapter(text), label=text)
    else:
        raise ChatError(f"{text} is neither an existing run/adapter folder, a .zip, nor a Hub id like 'org/name'")
    if base.strip():
        if not same_model(base, info.base_model):
            info.notes.append(f"The adapter was trained on {info.recorded_base or info.base_model}; "
                              f"running it on {base.strip()} as asked.")
        info.base_model, info.revision = base.strip(), ""
    return info


def _from_folder(folder: Path, label: str) -> AdapterInfo:
    run_dir = None
    if (folder / "config.yaml").exists() and (folder / "adapter").is_dir():
        run_dir, adapter = folder, folder / "adapter"
    elif (folder / ADAPTER_CONFIG).exists():
        adapter = folder
        if (folder.parent / "config.yaml").exists():
            run_dir = folder.parent  # the adapter/ folder of a run: the run's config still applies
    elif (folder / "config.yaml").exists() and (folder / "status.json").exists():
        raise ChatError(f"Run {folder.name} has no adapter yet ({_run_state(folder)}); "
                        "wait until it finishes or pick another run")
    else:
        adapter = _find_adapter(folder, label)
    if not (adapter / ADAPTER_CONFIG).exists():
        raise ChatError(f"Run {folder.name} has no adapter yet ({_run_state(folder)}); "
                        "wait until it finishes or pick another run")
    recorded = _read_adapter_config(adapter).get("base_model_name_or_path") or ""
    config = None
    for candidate in ([run_dir] if run_dir else []) + [adapter, adapter.parent]:
        if (candidate / "config.yaml").exists():
            try:
                config = StudioConfig.load(candidate / "config.yaml")
            except ConfigError as e:
                raise ChatError(f"{candidate / 'config.yaml'} is not a valid QLoRA Studio config ({e})") from None
            break
    if run_dir is not None:
        label = run_dir.name
    info = AdapterInfo(adapter_path=str(adapter), base_model=recorded, label=label, recorded_base=recorded,
                       run_dir=str(run_dir) if run_dir else None, config=config)
    if config is not None:
        if recorded and not same_model(recorded, config.model.name) and not _is_path(recorded) \
                and not _is_path(config.model.name):
            raise ChatError(f"{label}: the adapter says its base is {recorded} ({ADAPTER_CONFIG}) but the run was "
                            f"configured with {config.model.name} (config.yaml); this adapter does not belong to "
                            "this run folder")
        info.base_model = config.model.name
        info.revision = config.model.revision
        info.trust_remote_code = config.model.trust_remote_code
        info.template = config.data.template
        info.system_prompt = config.data.system_prompt
        info.quant = config.quant
        info.compute_dtype = config.quant.compute_dtype
    if not info.base_model:
        raise ChatError(f"{adapter / ADAPTER_CONFIG} does not name its base model (base_model_name_or_path); "
                        "pass the base explicitly")
    return info


def _is_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _read_adapter_config(adapter: Path) -> dict:
    try:
        data = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ChatError(f"{adapter / ADAPTER_CONFIG} cannot be read: {e}") from None
    if data.get("peft_type", "LORA") != "LORA":
        raise ChatError(f"{adapter} holds a {data.get('peft_type')} adapter; side-by-side chat needs a LoRA adapter")
    return data


def _run_state(run_dir: Path) -> str:
    from .runs import read_status

    status = read_status(run_dir)
    state = status.get("state", "unknown state")
    if status.get("max_steps"):
        return f"{state}, step {status.get('step', 0)}/{status['max_steps']}"
    return state


def _find_adapter(root: Path, label: str) -> Path:
    """The folder holding adapter_config.json: the root, or one folder a level or two down."""
    if (root / ADAPTER_CONFIG).exists():
        return root
    found = sorted(p.parent for p in root.glob(f"*/{ADAPTER_CONFIG}")) or \
        sorted(p.parent for p in root.glob(f"*/*/{ADAPTER_CONFIG}"))
    # A run folder also holds checkpoints/checkpoint-N/adapter_config.json; the final adapter/ wins.
    found = [p for p in found if "checkpoints" not in p.parts] or found
    if not found:
        raise ChatError(f"{label} holds no {ADAPTER_CONFIG}, so it is not a LoRA adapter (nor a finished run)")
    return found[0]


def _extract_zip(path: Path) -> Path:
    """Unpack once into the studio cache, keyed by content, refusing paths that escape the folder."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    target = studio_home() / "adapters" / digest.hexdigest()[:16]
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unzip-", dir=target.parent))
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                dest = (tmp / member).resolve()
                if not str(dest).startswith(str(tmp.resolve()) + os.sep) and dest != tmp.resolve():
                    raise ChatError(f"{path.name}: refusing the entry {member!r}, which points outside the archive")
            archive.extractall(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if target.is_dir():  # another process unpacked the same zip meanwhile
            return target
        raise
    return target


def _hub_adapter(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception:
        if is_offline():
            raise ChatError(f"Hub adapter '{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                            "set, so it cannot be downloaded. Use a run or an adapter folder/zip, or go online."
                            ) from None
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, etag_timeout=10))
        except Exception as e:
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ChatError(f"Could not download the Hub adapter '{repo_id}': {detail}") from None
    if not (folder / ADAPTER_CONFIG).exists():
        raise ChatError(f"Hub repo '{repo_id}' has no {ADAPTER_CONFIG}: it is not a LoRA adapter")
    return folder
