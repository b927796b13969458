"""Row formats: detect which one a dataset uses (and say why), map columns, and turn each
row into a conversation, or plain text, checking it on the way.

Every chat-like format (messages, ShareGPT, Alpaca, prompt/completion) becomes a list of
role/content messages rendered later with one chat template, so training sees exactly the
text the Chat tab sends the model. Plain text stays plain text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .errors import DataError

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
FIELDS = {
    "messages": ("messages", "system"),
    "sharegpt": ("conversations", "system"),
    "alpaca": ("instruction", "input", "output", "system"),
    "prompt_completion": ("prompt", "completion", "system"),
    "text": ("text",),
}
REQUIRED = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
            "prompt_completion": ("prompt", "completion"), "text": ("text",)}
# Column names people use for prompt/completion pairs, tried when no standard name is present.
PROMPT_ALIASES = ("question", "query", "input", "user", "human", "source")
COMPLETION_ALIASES = ("answer", "response", "output", "assistant", "reply", "target")
SYSTEM_ALIASES = ("system", "system_prompt")

ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant",
              "bot": "assistant", "chatgpt": "assistant", "system": "system"}

# Why a row is bad: code -> label used in reports and counts.
REASONS = {
    "invalid_json": "invalid JSON",
    "not_an_object": "not an object",
    "bad_shape": "wrong number of cells",
    "missing_column": "missing column",
    "non_string_content": "non-string content",
    "empty_assistant_turn": "empty assistant turn",
    "empty_text": "empty text",
    "roles_not_alternating": "roles not alternating",
    "unknown_role": "unknown role",
    "no_assistant_turn": "no assistant turn",
    "bad_turn": "malformed turn",
    "no_trainable_tokens": "nothing to train on within max_length",
}


class RowError(ValueError):
    """One row is unusable; `code` is a key of REASONS, the message says what exactly."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


@dataclass
class Detection:
    format: str
    reason: str
    mapping: dict          # field -> column, for every field the rows will be read from
    columns: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": self.format, "reason": self.reason, "mapping": dict(self.mapping), "columns": list(self.columns)}


@dataclass
class Example:
    kind: str                                     # "chat" | "text"
    messages: list = field(default_factory=list)  # role/content dicts, for chat
    trained: list = field(default_factory=list)   # per message: does it count in the loss
    text: str = ""                                # for plain text
    system_added: bool = False                    # the default system prompt was inserted


def detect_format(columns: list[str], rows: list[dict], *, format: str = "auto", mapping: dict | None = None) -> Detection:
    """Decide the format from the column names (and the first rows), honouring an override and a mapping."""
    mapping = {str(k): str(v) for k, v in (mapping or {}).items() if str(v).strip()}
    if format not in ("auto",) + FORMATS:
        raise DataError(f"format: {format!r} is not one of auto, {', '.join(FORMATS)}")
    known_fields = FIELDS[format] if format != "auto" else sorted({f for fs in FIELDS.values() for f in fs})
    for key, column in mapping.items():
        if key not in known_fields:
            raise DataError(f"mapping {key}={column}: unknown field '{key}'; fields"
                            f"{' for ' + format if format != 'auto' else ''}: {', '.join(known_fields)}")
        if columns and column not in columns:
            raise DataError(f"mapping {key}={column}: no column '{column}'; columns are: {', '.join(columns)}")
    has = lambda f: f in mapping or f in columns  # noqa: E731

    if format != "auto":
        missing = [f for f in REQUIRED[format] if not has(f)]
        if missing:
            raise DataError(f"format {format} needs column '{missing[0]}' (or map one: --map {missing[0]}=COLUMN); "
                            f"columns are: {', '.join(columns) or '(none)'}")
        return Detection(format, "chosen by you", _full_mapping(format, mapping, columns), list(columns))

    for conv_field in ("messages", "conversations"):
        if has(conv_field):
            column = mapping.get(conv_field, conv_field)
            turn_keys = _first_turn_keys(rows, column)
            fmt = "sharegpt" if "from" in turn_keys or (conv_field == "conversations" and "role" not in turn_keys) else "messages"
            style = "from/value (ShareGPT)" if fmt == "sharegpt" else "role/content"
            how = _mapped_phrase(mapping, conv_field)
            return Detection(fmt, f"column '{column}'{how} holds lists of {style} turns",
                             _full_mapping(fmt, {**_rename(mapping, conv_field, FIELDS[fmt][0])}, columns), list(columns))
    if has("instruction") and has("output"):
        extra = " and 'input'" if has("input") else ""
        return Detection("alpaca", f"columns 'instruction', 'output'{extra} are Alpaca fields",
                         _full_mapping("alpaca", mapping, columns), list(columns))
    if has("prompt") and has("completion"):
        prompt_col = mapping.get("prompt", "prompt")
        style = " (conversational)" if any(isinstance(r.get(prompt_col), list) for r in rows[:20]) else ""
        return Detection("prompt_completion", f"columns 'prompt' and 'completion' are a prompt/completion pair{style}",
                         _full_mapping("prompt_completion", mapping, columns), list(columns))
    if has("text"):
        return Detection("text", f"column '{mapping.get('text', 'text')}' holds plain text",
                         _full_mapping("text", mapping, columns), list(columns))
    prompt = mapping.get("prompt") or next((c for c in PROMPT_ALIASES if c in columns), None)
    completion = mapping.get("completion") or next((c for c in COMPLETION_ALIASES if c in columns), None)
    if prompt and completion and prompt != completion:
        auto = {"prompt": prompt, "completion": completion, **mapping}
        return Detection("prompt_completion", f"columns '{prompt}' and '{completion}' look like a prompt/completion "
                         f"pair (mapped prompt={prompt}, completion={completion})",
                         _full_mapping("prompt_completion", auto, columns), list(columns))
    text_columns = [c for c in columns if rows and all(isinstance(r.get(c), str) for r in rows[:20])]
    if len(columns) == 1 and text_columns:
        return Detection("text", f"the only column, '{columns[0]}', holds text: plain language modelling",
                         {"text": columns[0]}, list(columns))
    raise DataError(f"Cannot tell the format from the columns ({', '.join(columns) or 'none'}). Choose a format and "
                    "map your columns, e.g. --format prompt_completion --map prompt=COLUMN --map completion=COLUMN")


def _rename(mapping: dict, old: str, new: str) -> dict:
    out = dict(mapping)
    if old != new and old in out:
        out[new] = out.pop(old)
    elif old != new:
        out.setdefault(new, old)
    return out


def _mapped_phrase(mapping: dict, name: str) -> str:
    return f" (mapped to {name})" if name in mapping else ""


def _full_mapping(fmt: str, mapping: dict, columns: list[str]) -> dict:
    """field -> column for every field of the format that the data has (explicit mapping wins)."""
    out = {}
    for f in FIELDS[fmt]:
        if f in mapping:
            out[f] = mapping[f]
        elif f in columns:
            out[f] = f
        elif f == "system":
            alias = next((c for c in SYSTEM_ALIASES if c in columns), None)
            if alias:
                out[f] = alias
        elif f in ("messages", "conversations") and (other := "conversations" if f == "messages" else "messages") in columns:
            out[f] = other
        elif f in REQUIRED[fmt]:
            out[f] = f  # reported as a missing column row by row
    return out


def _first_turn_keys(rows: list[dict], column: str) -> set:
    for row in rows[:20]:
        value = row.get(column)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                continue
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return set(value[0])
    return set()


# --- rows -> examples -----------------------------------------------------------------

def row_to_example(row: dict, detection: Detection, system_prompt: str = "") -> Example:
    """Turn one row into an Example; raise RowError naming the column or turn when it is bad."""
    fmt, m = detection.format, detection.mapping
    if fmt == "text":
        text = _string(row, m["text"], required=True)
        if not text.strip():
            raise RowError("empty_text", f"column '{m['text']}' is empty")
        return Example("text", text=text)

    if fmt in ("messages", "sharegpt"):
        column = m[FIELDS[fmt][0]]
        messages = _turns(_get(row, column), column)
        trained = [msg["role"] == "assistant" for msg in messages]
    elif fmt == "alpaca":
        instruction = _string(row, m["instruction"], required=True)
        extra = _string(row, m["input"], required=False) if "input" in m else ""
        output = _string(row, m["output"], required=True)
        if not instruction.strip():
            raise RowError("empty_text", f"column '{m['instruction']}' (instruction) is empty")
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        trained = [False, True]
        _check_assistant_content(output, f"column '{m['output']}' (output) is empty")
    else:  # prompt_completion: strings, or lists of turns ("conversational")
        prompt, completion = _get(row, m["prompt"]), _get(row, m["completion"])
        prompt_msgs = _turns(prompt, m["prompt"]) if _is_turns(prompt) else \
            [{"role": "user", "content": _as_string(prompt, m["prompt"])}]
        if _is_turns(completion):
            completion_msgs = _turns(completion, m["completion"])
        else:
            text = _as_string(completion, m["completion"])
            _check_assistant_content(text, f"column '{m['completion']}' (completion) is empty")
            completion_msgs = [{"role": "assistant", "content": text}]
        if not any(msg["role"] == "assistant" for msg in completion_msgs):
            raise RowError("no_assistant_turn", f"column '{m['completion']}' has no assistant turn")
        messages = prompt_msgs + completion_msgs
        trained = [False] * len(prompt_msgs) + [msg["role"] == "assistant" for msg in completion_msgs]

    _check_roles(messages)
    example = Example("chat", messages, trained)
    if messages[0]["role"] != "system":
        system = _string(row, m["system"], required=False) if "system" in m else ""
        from_default = not system.strip()
        system = system_prompt if from_default else system
        if system.strip():
            example.messages.insert(0, {"role": "system", "content": system})
            example.trained.insert(0, False)
            example.system_added = from_default
    return example


def _get(row: dict, column: str):
    if column not in row or row[column] is None:
        raise RowError("missing_column", f"missing column '{column}'")
    return row[column]


def _string(row: dict, column: str, *, required: bool) -> str:
    if not required and (column not in row or row[column] is None):
        return ""
    return _as_string(_get(row, column), column)


def _as_string(value, column: str) -> str:
    if not isinstance(value, str):
        raise RowError("non_string_content", f"column '{column}' is {_kind(value)}, not a string")
    return value


def _kind(value) -> str:
    return {list: "a list", dict: "an object", int: "a number", float: "a number", bool: "true/false"}.get(
        type(value), type(value).__name__)


def _is_turns(value) -> bool:
    return isinstance(value, list) or (isinstance(value, str) and value.lstrip().startswith("[{"))


def _turns(value, column: str) -> list[dict]:
    """role/content or from/value turns -> role/content messages. JSON text in a CSV cell is accepted."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError("bad_turn", f"column '{column}' is text, not a list of turns") from None
    if not isinstance(value, list):
        raise RowError("bad_turn", f"column '{column}' is {_kind(value)}, not a list of turns")
    if not value:
        raise RowError("no_assistant_turn", f"column '{column}' is an empty list of turns")
    messages = []
    for i, turn in enumerate(value, 1):
        if not isinstance(turn, dict):
            raise RowError("bad_turn", f"turn {i} is {_kind(turn)}, not an object with role and content")
        raw_role = turn.get("role", turn.get("from"))
        if raw_role is None:
            raise RowError("bad_turn", f"turn {i} has no 'role' (or 'from')")
        role = ROLE_NAMES.get(str(raw_role).strip().lower())
        if role is None:
            raise RowError("unknown_role", f"turn {i} has unknown role {raw_role!r}; use system, user or assistant")
        content = turn["content"] if "content" in turn else turn.get("value")
        if content is None:
            raise RowError("missing_column" if "content" not in turn and "value" not in turn else "non_string_content",
                           f"turn {i} ({role}) has no content")
        if not isinstance(content, str):
            raise RowError("non_string_content", f"turn {i} ({role}) content is {_kind(content)}, not a string")
        if role == "assistant":
            _check_assistant_content(content, f"turn {i} is an empty assistant turn")
        messages.append({"role": role, "content": content})
    return messages


def _check_assistant_content(text: str, message: str) -> None:
    if not text.strip():
        raise RowError("empty_assistant_turn", message)


def _check_roles(messages: list[dict]) -> None:
    expected = "user"
    for i, msg in enumerate(messages, 1):
        role = msg["role"]
        if role == "system":
            if i != 1:
                raise RowError("roles_not_alternating", f"roles not alternating: turn {i} is a system message; "
                               "only the first turn may be one")
            continue
        if role != expected:
            previous = messages[i - 2]["role"] if i > 1 else "the start"
            raise RowError("roles_not_alternating", f"roles not alternating: turn {i} is '{role}' after "
                           f"'{previous}' (expected '{expected}')")
        expected = "assistant" if role == "user" else "user"
    if not any(msg["role"] == "assistant" for msg in messages):
        raise RowError("no_assistant_turn", "no assistant turn: nothing to learn from this row")
