"""The training loss on the trained tokens alone, without the per-step metric passes.

TRL's SFTTrainer projects hidden states through the LM head in tiles, so it never holds the full
[tokens, vocab] logits. Where Triton is missing (every CPU) it scores every position of a batch,
prompt tokens included, and for its logs it also computes each token's entropy and whether the
target was the top-1 guess: several more passes over each [tokens, vocab] tile, forward and
backward. With loss on the answers only, most positions are prompt tokens, and the LM head of a
small model is a large share of its compute (SmolLM2-135M: 28M of 135M parameters, vocab 49152).

`LeanSFTTrainer` computes the same loss from the positions whose label counts, in chunks of
bounded size, and nothing else. It keeps TRL's token count (our tokens/s) and falls back to TRL
for anything this path does not cover (custom loss functions, label smoothing, DFT loss, MoE
auxiliary loss, models that scale or soft-cap their logits, a request for the logits).
tests/test_lean_loss.py checks the loss and the gradients against TRL's.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# At most this many logits in flight per chunk (fp32: 128 MB, plus its gradient). Longer batches are
# split into chunks whose logits are recomputed in backward instead of kept.
CHUNK_LOGITS = 32 * 1024 * 1024
LEAN_KWARG = "studio_lean_head"
_LOGIT_SCALES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                 "logits_scaling")


def _nll_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def nll_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            targets: torch.Tensor, chunk_logits: int = CHUNK_LOGITS) -> torch.Tensor:
    """Sum over rows of -log softmax(hidden @ weight.T + bias)[target], in fp32."""
    rows = hidden.shape[0]
    per_chunk = max(1, chunk_logits // weight.shape[0])
    if rows <= per_chunk:
        return _nll_sum(hidden, weight, bias, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows, per_chunk):
        end = start + per_chunk
        total = total + checkpoint(_nll_sum, hidden[start:end], weight, bias, targets[start:end],
                                   use_reentrant=False)
    return total


def supports_lean_head(model) -> bool:
    """Whether the model's logits are a plain projection of its last hidden state."""
    config = model.config.get_text_config()
    return all(getattr(config, name, None) in (None, 1, 1.0) for name in _LOGIT_SCALES)


def install_lean_head(model) -> bool:
    """Let `model(..., labels=..., studio_lean_head=True)` return (sum of the token losses, tokens counted).

    Patched on the causal LM under any PEFT wrapper, so the call still goes through the wrappers'
    forward (DDP's gradient hooks included). Other calls reach the forward as it was.
    """
    if not supports_lean_head(model):
        return False
    previous = model.forward

    def forward(self, *args, labels=None, **kwargs):
        if not kwargs.pop(LEAN_KWARG, False):
            if labels is not None:
                kwargs["labels"] = labels
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:].to(hidden.device)
        mask = targets != -100
        head = self.get_output_embeddings()
        nll = nll_sum(hidden[mask].to(head.weight.device), head.weight, head.bias, targets[mask].to(head.weight.device))
        return nll, mask.sum()

    model.forward = types.MethodType(forward, model)
    return True


def lean_trainer_class():
    """SFTTrainer with the lean loss (a function, so that importing this module does not import TRL)."""
    from trl import SFTTrainer

    class LeanSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            self.lean = install_lean_head(base)

        def _lean_applies(self, return_outputs: bool) -> bool:
            return (self.lean and not return_outputs and self.compute_loss_func is None
                    and self.label_smoother is None and self.args.loss_type == "nll"
                    and not self.aux_loss_enabled and not _sequence_parallel(self.accelerator))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self._lean_applies(return_outputs):
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            nll, counted = model(**inputs, **{LEAN_KWARG: True})
            num_tokens = counted if num_items_in_batch is None else num_items_in_batch
            loss = nll / torch.as_tensor(num_tokens, device=nll.device).clamp(min=1)
            # As TRL does: num_items_in_batch counts every rank's tokens and DDP averages gradients.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            mode = "train" if model.training else "eval"
            if mode == "train":
                self._count_tokens(inputs)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

        def _count_tokens(self, inputs) -> None:
            # TRL's count: real tokens (padding-free batches have no attention mask, only positions).
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:
                ids = inputs["position_ids"]
                local = torch.tensor(ids.size(1), device=ids.device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size

    return LeanSFTTrainer


def _sequence_parallel(accelerator) -> bool:
    # Context/sequence parallelism splits a sequence across ranks; TRL's loss handles that, this one does not.
    config = getattr(accelerator, "parallelism_config", None)
    return config is not None and bool(getattr(config, "cp_enabled", False) or getattr(config, "sp_enabled", False))
