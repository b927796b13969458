"""One `generate` over rows that belong to the base or the adapted side, streamed row by row.

transformers' TextIteratorStreamer handles batch size 1 only; the streamer here splits each
step's new tokens per row, so both sides of a mixed-adapter batch stream from one call.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from .chat import GenerationSettings, LoadedPair

BASE, ADAPTED = 0, 1
PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


def _is_mixed_batch_error(error: BaseException) -> bool:
    text = str(error)
    return "adapter_names" in text or "mixed adapter" in text


def _remove_adapter_name_hooks(model) -> None:
    """PEFT 0.21 registers one forward pre-hook per LoRA layer to pass `adapter_names` and removes
    them only when generate returns normally; after an exception they stay and would inject the
    failed call's names into every later forward. Remove them before running any other way."""
    from peft.tuners.lora.model import _adapter_names_pre_forward_hook

    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, "func", None) is _adapter_names_pre_forward_hook:
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)


class Generation:
    """Rows (prompt strings, each assigned to a side) -> their answers, as they grow.

    Prompts are tokenized here, in the caller's thread, and all decoding happens in the
    generation thread: a fast tokenizer must not be used from two threads at once.
    """

    def __init__(self, pair: "LoadedPair", prompts: list[str], sides: list[int], settings: "GenerationSettings",
                 stop: threading.Event, *, plain: bool = False, on_finish: Callable[[], None] | None = None):
        import torch  # noqa: F401  (fail here, in the caller, if torch is missing)

        self.pair, self.sides, self.settings, self.stop, self.on_finish = pair, sides, settings, stop, on_finish
        tokenizer = pair.tokenizer
        # Chat templates write their own special tokens; plain text gets the tokenizer's usual ones.
        encode = lambda texts: tokenizer(texts, return_tensors="pt", padding=True,  # noqa: E731
                                         add_special_tokens=plain)
        self.batch = encode(prompts)
        self.groups = {side: [i for i, s in enumerate(sides) if s == side] for side in (BASE, ADAPTED)}
        self.group_batches = {side: encode([prompts[i] for i in rows]) for side, rows in self.groups.items() if rows}
        eos = pair.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.texts: list[str] = ["" for _ in prompts]
        self.finished = [False] * len(prompts)
        self.first_token_s: list[float | None] = [None] * len(prompts)
        self.events: queue.Queue = queue.Queue()
        self.mode = "mixed-batch" if pair.mixed_batch else "sequential"
        self.started = 0.0
        self.elapsed = 0.0

    # -- the generation thread ----------------------------------------------------
    def _generate(self, encoded, rows: list[int], adapter_names: list[str] | None) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        owner = self

        class RowStreamer(BaseStreamer):
            def put(self, value):
                if value.dim() > 1:  # generate hands over the prompt first
                    return
                owner._append(rows, value.tolist())

            def end(self):
                pass

        class StopOnEvent(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), owner.stop.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        device = next(self.pair.model.parameters()).device
        kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
        torch.manual_seed(self.settings.seed)  # same seed for both sides, and for every rerun
        with torch.inference_mode():
            self.pair.model.generate(**{k: v.to(device) for k, v in encoded.items()}, streamer=RowStreamer(),
                                     stopping_criteria=StoppingCriteriaList([StopOnEvent()]),
                                     pad_token_id=self.pair.tokenizer.pad_token_id,
                                     **self.settings.generate_kwargs(), **kwargs)

    def _append(self, rows: list[int], new_tokens: list[int]) -> None:
        now = time.monotonic() - self.started
        tokenizer = self.pair.tokenizer
        for row, token in zip(rows, new_tokens):
            if self.finished[row]:
                continue
            if token in self.eos_ids:
                self.finished[row] = True
                continue
            self.tokens[row].append(token)
            if self.first_token_s[row] is None:
                self.first_token_s[row] = now
            text = tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                self.texts[row] = text
        self.events.put(("update", list(self.texts)))

    def _sequential(self) -> None:
        """Base rows with the adapter disabled, then adapted rows: for adapters that PEFT cannot mix."""
        for side in (BASE, ADAPTED):
            rows = self.groups[side]
            if not rows or self.stop.is_set():
                continue
            if side == BASE:
                with self.pair.model.disable_adapter():
                    self._generate(self.group_batches[side], rows, None)
            else:
                self._generate(self.group_batches[side], rows, None)

    def _work(self) -> None:
        self.started = time.monotonic()
        try:
            if self.pair.mixed_batch:
                names = [PEFT_BASE if side == BASE else self.pair.adapter_name for side in self.sides]
                try:
                    self._generate(self.batch, list(range(len(self.sides))), names)
                except (TypeError, ValueError) as e:
                    _remove_adapter_name_hooks(self.pair.model)
                    if any(self.tokens) or not _is_mixed_batch_error(e):
                        raise
                    self.pair.mixed_batch = False  # remember for this loaded pair
                    self.pair.notes.append(f"mixed-adapter batches unavailable ({e}); sides run one after another")
                    self.mode = "sequential"
                    self._sequential()
            else:
                self._sequential()
            self.texts = [self.pair.tokenizer.decode(t, skip_special_tokens=True) for t in self.tokens]
            self.events.put(("update", list(self.texts)))
        except BaseException as e:  # noqa: BLE001  (reported to the consumer, which raises it)
            self.events.put(("error", e))
        finally:
            self.elapsed = time.monotonic() - self.started
            if self.on_finish is not None:
                self.on_finish()
            self.events.put(("end", None))

    # -- the consumer ---------------------------------------------------------------
    def stats(self) -> dict:
        def first(side):
            times = [self.first_token_s[i] for i in self.groups[side] if self.first_token_s[i] is not None]
            return round(min(times), 4) if times else None

        return {"mode": self.mode, "elapsed_s": round(self.elapsed or time.monotonic() - self.started, 4),
                "ttft_base_s": first(BASE), "ttft_adapted_s": first(ADAPTED),
                "base_tokens": sum(len(self.tokens[i]) for i in self.groups[BASE]),
                "adapted_tokens": sum(len(self.tokens[i]) for i in self.groups[ADAPTED]),
                "stopped": self.stop.is_set()}

    def _side_texts(self, texts: list[str]) -> tuple[str, str]:
        return tuple("".join(texts[i] for i in self.groups[side]) for side in (BASE, ADAPTED))

    def start(self) -> None:
        """Generate in a thread of its own; `stream()` follows it."""
        self.worker = threading.Thread(target=self._work, name="chat-generate", daemon=True)
        self.worker.start()

    def run(self) -> Iterator[tuple[tuple[str, str], bool, dict]]:
        self.start()
        yield from self.stream()

    def stream(self) -> Iterator[tuple[tuple[str, str], bool, dict]]:
        """(base text, adapted text) as they grow; the last item has done=True.

        Each side is expected to have one row here (the chat case); updates that pile up while
        the consumer is busy are merged, so a slow browser never lags behind the model.
        """
        worker = self.worker
        latest, error = None, None
        while True:
            kind, payload = self.events.get()
            pending = [(kind, payload)]
            while True:
                try:
                    pending.append(self.events.get_nowait())
                except queue.Empty:
                    break
            ended = False
            for kind, payload in pending:
                if kind == "update":
                    latest = payload
                elif kind == "error":
                    error = payload
                else:
                    ended = True
            if error is not None:
                worker.join()
                raise error
            if ended:
                worker.join()
                yield self._side_texts(latest or self.texts), True, self.stats()
                return
            if latest is not None:
                yield self._side_texts(latest), False, self.stats()

    def run_to_end(self) -> list[str]:
        """Every row's answer, generated in this thread (batch compare)."""
        self._work()
        while True:
            kind, payload = self.events.get()
            if kind == "error":
                raise payload
            if kind == "end":
                return self.texts
