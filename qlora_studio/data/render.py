"""Render an example to the exact token ids the trainer sees, and mark the ones in the loss.

The full conversation is rendered once with the chat template and tokenized once. Which
characters are assistant content is found by rendering the conversation up to each
assistant turn (with the generation prompt) and through it: the text between the two is
that turn, including its end-of-turn token, so the model learns to stop. Tokens whose
characters fall in such a span get mask 1. Trailing newlines after the end-of-turn token
are not trained: they belong to the template's layout, not the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..templates import render_chat
from .formats import Example


@dataclass
class Rendered:
    text: str
    input_ids: list
    mask: list       # 1 = counts in the loss
    offsets: list    # (start, end) character span of each token in `text`

    def segments(self) -> list[tuple[str, bool]]:
        """The text cut where the mask changes: [(text, counts_in_loss), ...], exactly covering `text`."""
        if not self.input_ids:
            return [(self.text, False)] if self.text else []
        cuts, flags = [0], [bool(self.mask[0])]
        for i in range(1, len(self.mask)):
            if bool(self.mask[i]) != flags[-1]:
                cuts.append(self.offsets[i][0])
                flags.append(bool(self.mask[i]))
        cuts.append(len(self.text))
        return [(self.text[a:b], flag) for a, b, flag in zip(cuts, cuts[1:], flags) if b > a]

    @property
    def n_trained(self) -> int:
        return sum(self.mask)


def render_example(example: Example, tokenizer, template: str = "model", *, completion_only_loss: bool = True) -> Rendered:
    if example.kind == "text":
        return _render_text(example.text, tokenizer)
    text = render_chat(tokenizer, example.messages, template)
    spans = _trained_spans(example, tokenizer, template, text)
    ids, offsets = _tokenize(tokenizer, text)
    if completion_only_loss:
        mask = [1 if any(s < end and start < e for s, e in spans) else 0 for start, end in offsets]
    else:
        mask = [1] * len(ids)
    return Rendered(text, ids, mask, offsets)


def _render_text(text: str, tokenizer) -> Rendered:
    # Mirrors SFTTrainer on plain text: the tokenizer's own special tokens, then EOS so the model learns to stop.
    eos = tokenizer.eos_token or ""
    full = text if (not eos or text.endswith(eos)) else text + eos
    encoded = tokenizer(full, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    return Rendered(full, ids, [1] * len(ids), offsets)


def _tokenize(tokenizer, text: str) -> tuple[list, list]:
    # The template already wrote every special token; apply_chat_template(tokenize=True) adds none either.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def _trained_spans(example: Example, tokenizer, template: str, full: str) -> list[tuple[int, int]]:
    spans, search_from = [], 0
    for i, (message, trained) in enumerate(zip(example.messages, example.trained)):
        if not trained:
            continue
        before = render_chat(tokenizer, example.messages[:i], template, add_generation_prompt=True) if i else ""
        through = render_chat(tokenizer, example.messages[: i + 1], template)
        if full.startswith(before) and full.startswith(through) and len(through) > len(before):
            start, end = len(before), len(through.rstrip("\n"))
        else:
            # Templates that render earlier turns differently once later ones exist (e.g. ones that
            # strip reasoning): find the content itself and the end-of-turn token right after it.
            start = full.find(message["content"], search_from)
            if start < 0:
                continue
            end = start + len(message["content"])
            eos = tokenizer.eos_token or ""
            if eos and full.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
        search_from = end
    return spans
