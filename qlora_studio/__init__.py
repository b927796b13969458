"""QLoRA Studio: fine-tune a language model with QLoRA, watch it learn, compare and export.

The core (config, data, models, train, runs, chat, export) never imports gradio; the UI in
`qlora_studio.ui` is a thin layer over it, and `qlora-studio` exposes the same calls.
"""

__version__ = "0.1.0"
