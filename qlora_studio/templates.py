"""Named chat templates, shared by training (data rendering) and chat, so both see the same text.

'model' means the tokenizer's own template. The others are written out here as Jinja, in
the form `tokenizer.apply_chat_template(chat_template=...)` accepts, using the tokenizer's
own bos/eos tokens so they work with any vocabulary.
"""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.index0 == 0 and system %}"
    "{{ bos_token + '[INST] <<SYS>>\n' + system + '\n<</SYS>>\n\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

ALPACA = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{{ 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n' }}"
    "{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

NAMED_TEMPLATES = {"chatml": CHATML, "llama2": LLAMA2, "alpaca": ALPACA, "zephyr": ZEPHYR}
TEMPLATE_LABELS = {
    "model": "Model default",
    "chatml": "ChatML",
    "llama2": "Llama-2 [INST] / <<SYS>>",
    "alpaca": "Alpaca",
    "zephyr": "Zephyr",
}


def template_source(tokenizer, name: str) -> str:
    """The Jinja source for a template name; 'model' falls back to ChatML when the tokenizer has none."""
    if name == "model":
        return tokenizer.chat_template or CHATML
    try:
        return NAMED_TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; choose one of: {', '.join(TEMPLATE_LABELS)}") from None


def render_chat(tokenizer, messages: list[dict], template: str = "model", add_generation_prompt: bool = False) -> str:
    """The exact string the model sees for these messages under the named template."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template_source(tokenizer, template),
        tokenize=False, add_generation_prompt=add_generation_prompt,
    )
