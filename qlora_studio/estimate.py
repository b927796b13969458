"""Before a run starts: how many parameters LoRA trains, and whether the run fits in memory.

Everything here works from a model's config.json (no weights are loaded), so the Train tab
can recompute it on every form change. Parameter counts are exact for the decoder layouts
below and for anything transformers can build on the meta device; memory is an estimate:

    total = quantized base weights + LoRA parameters + their gradients + optimizer state
            + activations for one micro-batch + framework overhead

Activations are the least certain part. Per decoder layer and token we count the tensors
autograd keeps for the backward pass - roughly 8*hidden + 4*intermediate values (residual,
norm outputs, q/k/v and attention output; the MLP's gate, up, activation and product), plus
the dropout copy of each adapted layer's input when LoRA dropout > 0 - in the compute dtype.
Attention is assumed to run through SDPA/flash kernels, so no seq x seq score matrix is kept.
With gradient checkpointing only each layer's input is kept, plus one layer's full set while
it is recomputed. The logits add batch*seq*vocab values in the compute dtype plus the fp32
copy and log-softmax the loss keeps. Expect the total to be within ~25% of the real peak.
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import EMBEDDED_MODEL, ConfigError, LoraSettings, StudioConfig

GIB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Decoder families whose layers are exactly q/k/v/o + gate/up/down (Llama layout); anything
# else is measured from a meta-device model instead.
LLAMA_LAYOUT = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite", "smollm3"}
CUDA_CONTEXT_BYTES = int(0.5 * GIB)   # CUDA context + cuBLAS workspaces, before any tensor
CPU_RUNTIME_BYTES = int(1.0 * GIB)    # torch + transformers + tokenizer + data in the training process
FRAGMENTATION = 0.10                  # the caching allocator rarely packs tensors perfectly


class EstimateError(ValueError):
    """The estimate cannot be made (unknown architecture, config not available offline...)."""


@dataclass(frozen=True)
class LinearLayer:
    name: str        # module path with layer numbers replaced by '*', e.g. model.layers.*.self_attn.q_proj
    in_features: int
    out_features: int
    count: int       # how many modules share this path (one per decoder layer)
    has_bias: bool = False

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a causal LM, read from its config.json."""
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    linears: tuple[LinearLayer, ...]   # every nn.Linear except the output head (what 'all-linear' adapts)
    embed_params: int                  # input embeddings
    head_params: int                   # output head; 0 when tied to the embeddings
    other_params: int                  # norms, biases, anything not above
    bias_params: int = 0               # the part of other_params that bias='all' trains

    @property
    def linear_params(self) -> int:
        return sum(l.in_features * l.out_features * l.count for l in self.linears)

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embed_params + self.head_params + self.other_params

    def module_names(self) -> list[str]:
        """Short names of the adaptable linear layers, in model order (q_proj, k_proj, ...)."""
        return list(dict.fromkeys(l.short_name for l in self.linears))


# -- model config -> shape ------------------------------------------------------------

def load_model_config(name: str, revision: str = "", *, allow_download: bool = True) -> dict:
    """config.json of a model name as the config spells it ('embedded', a folder, a Hub id).

    For a Hub id only config.json is fetched (a few KB), never the weights.
    """
    # The form asks on every change: remember answers, failures included, for a few minutes,
    # so a gated or mistyped Hub id is not fetched again on each keystroke.
    ok, text = _config_cached(name.strip(), revision.strip(), allow_download, int(time.monotonic() // 300))
    if not ok:
        raise EstimateError(text)
    return json.loads(text)


@functools.lru_cache(maxsize=64)
def _config_cached(name: str, revision: str, allow_download: bool, _period: int) -> tuple[bool, str]:
    try:
        return True, _config_text(name, revision, allow_download)
    except EstimateError as e:
        return False, str(e)
    except Exception as e:  # e.g. the embedded model cannot be converted
        return False, f"{type(e).__name__}: {e}"


def _config_text(name: str, revision: str, allow_download: bool) -> str:
    from .models import EMBEDDED_DISPLAY, embedded_model_dir, is_offline

    if name in (EMBEDDED_MODEL, EMBEDDED_DISPLAY, "SmolLM2-135M-Instruct"):
        return (embedded_model_dir() / "config.json").read_text()
    local = Path(name).expanduser()
    if local.exists() or name.startswith((".", "/", "~")):
        if not (local / "config.json").exists():
            raise EstimateError(f"{name} has no config.json")
        return (local / "config.json").read_text()
    if name.count("/") != 1:
        raise EstimateError(f"'{name}' is neither 'embedded', a folder, nor a Hub id like 'org/model'")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, "config.json", revision=revision or None, local_files_only=True)).read_text()
    except Exception:
        pass
    if not allow_download or is_offline():
        raise EstimateError(f"config.json of '{name}' is not in the local Hugging Face cache (offline)")
    try:
        return Path(hf_hub_download(name, "config.json", revision=revision or None)).read_text()
    except Exception as e:
        raise EstimateError(f"could not fetch config.json of '{name}': {type(e).__name__}") from None


def model_shape(model_config: dict) -> ModelShape:
    """The parameter layout of a causal LM from its config.json contents."""
    cfg = dict(model_config.get("text_config") or model_config)  # multimodal wrappers nest the LM
    return _shape_cached(json.dumps(cfg, sort_keys=True, default=str))


@functools.lru_cache(maxsize=16)
def _shape_cached(cfg_json: str) -> ModelShape:
    cfg = json.loads(cfg_json)
    if cfg.get("model_type") in LLAMA_LAYOUT:
        return _llama_layout(cfg)
    return _meta_shape(cfg)


def _get(cfg: dict, *names, default=None):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    if default is not None:
        return default
    raise EstimateError(f"model config lacks {names[0]}")


def _llama_layout(cfg: dict) -> ModelShape:
    h = int(_get(cfg, "hidden_size"))
    layers = int(_get(cfg, "num_hidden_layers"))
    heads = int(_get(cfg, "num_attention_heads"))
    kv_heads = int(_get(cfg, "num_key_value_heads", default=heads))
    head_dim = int(_get(cfg, "head_dim", default=h // heads))
    inter = int(_get(cfg, "intermediate_size"))
    vocab = int(_get(cfg, "vocab_size"))
    q, kv = heads * head_dim, kv_heads * head_dim
    model_type = cfg.get("model_type", "llama")
    qkv_bias = bool(cfg.get("attention_bias")) or model_type == "qwen2"  # Qwen2 always biases q/k/v
    o_bias = bool(cfg.get("attention_bias")) and model_type != "qwen2"
    mlp_bias = bool(cfg.get("mlp_bias"))
    prefix = "model.layers.*."
    linears = tuple(LinearLayer(prefix + n, i, o, layers, b) for n, i, o, b in (
        ("self_attn.q_proj", h, q, qkv_bias), ("self_attn.k_proj", h, kv, qkv_bias),
        ("self_attn.v_proj", h, kv, qkv_bias), ("self_attn.o_proj", q, h, o_bias),
        ("mlp.gate_proj", h, inter, mlp_bias), ("mlp.up_proj", h, inter, mlp_bias),
        ("mlp.down_proj", inter, h, mlp_bias)))
    norms_per_layer = {"gemma2": 4}.get(model_type, 2) * h
    if model_type == "qwen3":
        norms_per_layer += 2 * head_dim  # q_norm and k_norm
    biases = sum(l.out_features * l.count for l in linears if l.has_bias)
    tied = bool(cfg.get("tie_word_embeddings", model_type in ("gemma", "gemma2")))
    return ModelShape(model_type=model_type, hidden=h, intermediate=inter, layers=layers, vocab=vocab,
                      linears=linears, embed_params=vocab * h, head_params=0 if tied else vocab * h,
                      other_params=layers * norms_per_layer + h + biases, bias_params=biases)


def _meta_shape(cfg: dict) -> ModelShape:
    """Any architecture transformers knows: build it on the meta device (no memory) and look."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model_type = cfg.get("model_type")
    if not model_type:
        raise EstimateError("model config has no model_type")
    try:
        config = AutoConfig.for_model(**cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise EstimateError(f"cannot size a '{model_type}' model ({type(e).__name__}: {str(e)[:120]})") from None
    head = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    groups: dict[tuple, int] = {}
    for name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, torch.nn.Linear):
            key = (re.sub(r"\.\d+\.", ".*.", name), module.in_features, module.out_features,
                   module.bias is not None)
        elif isinstance(module, Conv1D):
            key = (re.sub(r"\.\d+\.", ".*.", name), module.weight.shape[0], module.nf, True)
        else:
            continue
        groups[key] = groups.get(key, 0) + 1
    linears = tuple(LinearLayer(n, i, o, c, b) for (n, i, o, b), c in groups.items())
    total = sum(p.numel() for p in model.parameters())
    embed = inp.weight.numel() if inp is not None else 0
    tied = head is None or inp is None or head.weight is inp.weight
    head_params = 0 if tied else head.weight.numel()
    linear = sum(l.in_features * l.out_features * l.count for l in linears)
    h = int(_get(cfg, "hidden_size", "n_embd", "d_model"))
    return ModelShape(model_type=model_type, hidden=h,
                      intermediate=int(_get(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * h)),
                      layers=int(_get(cfg, "num_hidden_layers", "n_layer", "num_layers")),
                      vocab=int(_get(cfg, "vocab_size")), linears=linears, embed_params=embed,
                      head_params=head_params, other_params=total - linear - embed - head_params,
                      bias_params=sum(p.numel() for n, p in model.named_parameters() if "bias" in n))


# -- LoRA parameter count ---------------------------------------------------------------

def targeted(shape: ModelShape, target_modules: list[str]) -> list[LinearLayer]:
    """The linear layers LoRA adapts, matched the way peft matches names (by the last part)."""
    if target_modules == ["all-linear"]:
        return list(shape.linears)
    wanted = set(target_modules)
    return [l for l in shape.linears if l.short_name in wanted or l.name in wanted]


def unknown_targets(shape: ModelShape, target_modules: list[str]) -> list[str]:
    if target_modules == ["all-linear"]:
        return []
    known = set(shape.module_names())
    return [t for t in target_modules if t not in known and not any(l.name == t for l in shape.linears)]


@dataclass
class ParamCount:
    trainable: int
    total: int       # base + adapter, the way peft's print_trainable_parameters counts

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def count_parameters(shape: ModelShape, lora: LoraSettings) -> ParamCount:
    layers = targeted(shape, lora.target_modules)
    adapter = sum(lora.r * (l.in_features + l.out_features) * l.count for l in layers)
    if lora.use_dora:
        adapter += sum(l.out_features * l.count for l in layers)  # one magnitude per output row
    trainable = adapter
    if lora.bias == "all":
        trainable += shape.bias_params
    elif lora.bias == "lora_only":
        trainable += sum(l.out_features * l.count for l in layers if l.has_bias)
    return ParamCount(trainable=trainable, total=shape.total_params + adapter)


# -- memory -----------------------------------------------------------------------------

@dataclass
class MemoryEstimate:
    weights: int          # frozen base: quantized linears + 16/32-bit embeddings, head, norms
    adapter: int          # LoRA parameters
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    available: int        # GPU memory (per device) or system RAM
    device: str
    params: ParamCount
    compute_dtype: str
    notes: list[str] = field(default_factory=list)
    load_peak: int = 0    # memory needed while loading, when that is more than training (FSDP, see below)

    @property
    def total(self) -> int:
        training = self.weights + self.adapter + self.gradients + self.optimizer + self.activations + self.overhead
        return max(training, self.load_peak)

    @property
    def fits(self) -> bool:
        return self.total <= self.available

    @property
    def level(self) -> str:
        """'ok', 'tight' (over 85% of memory) or 'too_big'."""
        if not self.fits:
            return "too_big"
        return "tight" if self.total > 0.85 * self.available else "ok"

    def breakdown(self) -> list[tuple[str, int]]:
        return [("Base weights", self.weights), ("LoRA parameters", self.adapter), ("Gradients", self.gradients),
                ("Optimizer state", self.optimizer), ("Activations", self.activations),
                ("Runtime overhead", self.overhead)]

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(total=self.total, fits=self.fits, level=self.level)
        return out


def _weight_bytes_per_param(quant_type: str, double_quant: bool, dtype_bytes: int) -> float:
    if quant_type in ("nf4", "fp4"):
        # 4 bits per weight + one absmax per 64-weight block: fp32 (0.5 bit/weight), or with
        # double quantization 8-bit absmax + one fp32 per 256 blocks (~0.127 bit/weight).
        constants = (1 + 4 / 256) / 64 if double_quant else 4 / 64
        return 0.5 + constants
    if quant_type == "int8":
        return 1.0  # plus one fp32 scale per output row, added by the caller
    return float(dtype_bytes)


def _optimizer_bytes(optimizer: str, trainable: int, param_bytes: int, layers: list[LinearLayer], r: int) -> int:
    if optimizer in ("adamw_torch", "adamw_torch_fused"):
        return 2 * trainable * param_bytes   # exp_avg and exp_avg_sq, in the parameters' dtype
    if optimizer == "paged_adamw_32bit":
        return 2 * trainable * 4
    if optimizer in ("paged_adamw_8bit", "adamw_8bit"):
        return 2 * trainable * 1
    if optimizer == "adafactor":
        # factored second moment: one row and one column vector per matrix, in fp32
        return 4 * sum(((r + l.in_features) + (l.out_features + r)) * l.count for l in layers)
    return 0  # sgd without momentum keeps no state


def estimate_memory(shape: ModelShape, config: StudioConfig, hardware, *, gpus: int = 1,
                    fsdp: bool = False) -> MemoryEstimate:
    """Peak memory per device of training `config` on `hardware` (a models.Hardware).

    With `gpus` > 1 each GPU runs one process on its own micro-batches. DDP keeps a whole copy
    of the model on each GPU, plus its gradient buckets (a second copy of the LoRA gradients);
    FSDP shards the base, adapter, gradients and optimizer state across the GPUs and gathers
    one decoder layer at a time (two with prefetching) for its forward and backward.
    """
    from .models import resolve_compute_dtype

    notes = []
    try:
        dtype = resolve_compute_dtype(config.quant.compute_dtype, hardware)
    except ConfigError:
        dtype = config.quant.compute_dtype  # reported by validation; size it as asked
    act_bytes = DTYPE_BYTES[dtype]
    q = config.quant
    # Unquantized tensors (embeddings, head, norms) load in the compute dtype.
    plain = (shape.embed_params + shape.head_params + shape.other_params) * act_bytes
    if q.type == "none":
        weights = shape.linear_params * act_bytes + plain
    else:
        weights = int(shape.linear_params * _weight_bytes_per_param(q.type, q.double_quant, act_bytes)) + plain
        if q.type == "int8":
            weights += sum(4 * l.out_features * l.count for l in shape.linears)

    params = count_parameters(shape, config.lora)
    # TRL casts adapters of a quantized base to bf16; peft keeps them fp32 on an unquantized one.
    param_bytes = 2 if q.type != "none" else 4
    adapter = params.trainable * param_bytes
    gradients = adapter
    layers = targeted(shape, config.lora.target_modules)
    optimizer = _optimizer_bytes(config.train.optimizer, params.trainable, param_bytes, layers, config.lora.r)

    t, d = config.train, config.data
    tokens = t.batch_size * d.max_length
    per_layer = 8 * shape.hidden + 4 * shape.intermediate
    if config.lora.dropout > 0:
        per_layer += sum(l.in_features * l.count for l in layers) // max(shape.layers, 1)
    layer_full = tokens * per_layer * act_bytes
    if t.gradient_checkpointing:
        activations = tokens * shape.hidden * act_bytes * shape.layers + layer_full
    else:
        activations = layer_full * shape.layers
    activations += tokens * shape.vocab * (act_bytes + 8)

    gpus = max(int(gpus or 1), 1)
    load_peak = 0
    if gpus > 1 and fsdp:
        # Each GPU loads the whole 4-bit base before FSDP shards it (transformers quantizes onto
        # the rank's device): that much must fit on one GPU, however many share the training.
        load_peak = int(weights + (CUDA_CONTEXT_BYTES if hardware.device == "cuda" else CPU_RUNTIME_BYTES))
        layer = (weights - plain) / max(shape.layers, 1)  # one decoder layer's quantized weights
        weights = weights / gpus + 2 * layer
        adapter, gradients, optimizer = adapter / gpus, gradients / gpus, optimizer / gpus
        notes.append(f"FSDP over {gpus} GPUs: base, adapter, gradients and optimizer state are sharded; "
                     "the figure is per GPU")
    elif gpus > 1:
        gradients *= 2
        notes.append(f"DDP over {gpus} GPUs: each GPU holds the whole model; the figure is per GPU, and the "
                     f"effective batch is {gpus}x train.batch_size x train.grad_accum")
    subtotal = weights + adapter + gradients + optimizer + activations
    if hardware.device == "cuda":
        overhead = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * subtotal)
    else:
        overhead = CPU_RUNTIME_BYTES
    if load_peak > subtotal + overhead:
        notes.append(f"loading needs more than training: each GPU first holds the whole 4-bit base "
                     f"({format_bytes(load_peak)} with the runtime), then keeps its shard")
    if t.packing:
        notes.append("packing fills every sequence to max_length, so activations are at the estimate")
    return MemoryEstimate(weights=int(weights), adapter=int(adapter), gradients=int(gradients),
                          optimizer=int(optimizer), activations=int(activations), overhead=int(overhead),
                          available=int(hardware.memory_gb * GIB), device=hardware.device, params=params,
                          compute_dtype=dtype, notes=notes, load_peak=load_peak)


def memory_advice(estimate: MemoryEstimate, config: StudioConfig) -> list[str]:
    """What would shrink the biggest parts, most effective first."""
    tips = []
    t, d = config.train, config.data
    if estimate.activations > 0.25 * estimate.total:
        if not t.gradient_checkpointing:
            tips.append("turn on train.gradient_checkpointing")
        if t.batch_size > 1:
            tips.append(f"lower train.batch_size (now {t.batch_size}) and raise train.grad_accum to keep the "
                        "effective batch")
        tips.append(f"lower data.max_length (now {d.max_length})")
    if config.quant.type in ("none", "int8"):
        tips.append("store the base in 4 bit (quant.type=nf4)")
    if estimate.device == "cuda" and t.optimizer in ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit"):
        tips.append("use an 8-bit optimizer (train.optimizer=paged_adamw_8bit)")
    if config.lora.r > 16 and estimate.optimizer + estimate.adapter > 0.2 * estimate.total:
        tips.append(f"lower lora.r (now {config.lora.r})")
    return tips


# -- hardware checks ----------------------------------------------------------------------

def hardware_problems(config: StudioConfig, hardware) -> list[ConfigError]:
    """Settings this machine cannot run, each naming its field (the trainer would refuse them too)."""
    from .models import resolve_compute_dtype

    problems = []
    try:
        resolve_compute_dtype(config.quant.compute_dtype, hardware)
    except ConfigError as e:
        problems.append(e)
    if hardware.device == "cpu":
        if config.quant.type == "int8":
            problems.append(ConfigError("quant.type", "8-bit (LLM.int8) training needs a CUDA GPU; on CPU use "
                                        "nf4, fp4 or none"))
        if config.train.optimizer in ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit"):
            problems.append(ConfigError("train.optimizer", f"{config.train.optimizer} needs bitsandbytes' CUDA "
                                        "kernels; on CPU use adamw_torch"))
    return problems


def scale_problems(config: StudioConfig, hardware, gpus: int, fsdp: bool = False) -> list[ConfigError]:
    """A launch on `gpus` processes (one per GPU; CPU processes on a machine without GPUs) that cannot run."""
    problems = []
    if gpus < 1:
        problems.append(ConfigError("gpus", f"must be 1 or more, got {gpus}"))
    elif hardware.device == "cuda" and gpus > max(hardware.gpu_count, 1):
        problems.append(ConfigError("gpus", f"{gpus} GPUs asked for, {hardware.gpu_count} visible"))
    if fsdp:
        if gpus < 2:
            problems.append(ConfigError("fsdp", "FSDP shards the model across GPUs: use 2 or more"))
        problems += fsdp_problems(config, hardware)
    return problems


def fsdp_problems(config: StudioConfig, hardware) -> list[ConfigError]:
    """Settings FSDP + QLoRA cannot train (see the README's "Several GPUs"), each naming its field.

    FSDP shards only floating-point tensors of one dtype, so the 4-bit weights are stored in the
    compute dtype (bnb_4bit_quant_storage, set in models.quantization_config) and the model
    loads in it too: that has to be bf16, as fp16 storage would need fp32 for stable mixed precision.
    """
    from .models import resolve_compute_dtype

    problems = []
    if hardware.device != "cuda":
        problems.append(ConfigError("fsdp", "FSDP needs CUDA GPUs"))
        return problems
    if config.quant.type == "int8":
        problems.append(ConfigError("quant.type", "8-bit (LLM.int8) layers cannot be sharded by FSDP; use nf4, "
                                    "fp4 or none"))
    try:
        dtype = resolve_compute_dtype(config.quant.compute_dtype, hardware)
    except ConfigError:
        dtype = None  # hardware_problems reports it
    if dtype is not None and dtype != "bf16" and config.quant.type != "none":
        problems.append(ConfigError("quant.compute_dtype", f"FSDP + QLoRA stores the 4-bit weights in the compute "
                                    f"dtype and needs bf16 (Ampere or newer GPUs), not {dtype}"))
    if config.train.optimizer == "paged_adamw_8bit":
        problems.append(ConfigError("train.optimizer", "paged_adamw_8bit fails to save FSDP checkpoints; use "
                                    "adamw_torch or paged_adamw_32bit"))
    return problems


def format_bytes(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2**20:.0f} MiB"


def format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.{2 if n < 10 * size else 1}f}{unit}"
    return str(n)

