"""`qlora-studio chat ADAPTER --prompt TEXT [--system TEXT] [--max-new-tokens N] [--greedy] [--json]`.

Prints the base model's answer and the adapted model's answer to the same prompt, generated
from one loaded copy of the base weights (the same code the Chat tab runs).
"""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    from ..chat import CHAT_TEMPLATES

    p = subparsers.add_parser("chat", help="Answer one prompt with the base model and with the adapter, side by side.",
                              description="Compare base and adapted answers. Exit code: 0 ok, 2 bad input, 1 failed.")
    p.add_argument("adapter", help="A run folder, an adapter folder or .zip, or a Hub adapter id (org/name).")
    p.add_argument("--prompt", required=True, help="The user message.")
    p.add_argument("--system", default=None, help="System prompt (default: the one the adapter was trained with).")
    p.add_argument("--template", default=None, choices=CHAT_TEMPLATES,
                   help="Chat template (default: the one the adapter was trained with).")
    p.add_argument("--base", default="", help="Base model to run the adapter on, overriding the recorded one.")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--greedy", action="store_true", help="Greedy decoding (deterministic).")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="Print one JSON object with 'base' and 'adapted' keys.")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..chat import ChatError, GenerationSettings, ModelPool, compare, resolve_adapter

    try:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, top_k=args.top_k,
                                      repetition_penalty=args.repetition_penalty, seed=args.seed, greedy=args.greedy)
        info = resolve_adapter(args.adapter, base=args.base)
    except ChatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    system = info.system_prompt if args.system is None else args.system
    template = args.template or info.template
    for note in info.notes:
        print(f"note: {note}", file=sys.stderr)
    try:
        step = compare(ModelPool(device=args.device), info, args.prompt, system=system, template=template,
                       settings=settings)
    except ChatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"base": step.base, "adapted": step.adapted, "base_model": info.base_display,
                          "adapter": info.adapter_path, "template": template, "system": system,
                          "prompts": {"base": step.base_prompt, "adapted": step.adapted_prompt},
                          "settings": settings.to_dict(), "stats": step.stats}, ensure_ascii=False))
    else:
        print(f"=== base ({info.base_display}) ===\n{step.base}\n\n=== adapted ({info.label}) ===\n{step.adapted}")
    return 0
