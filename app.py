"""QLoRA Studio: `python app.py` (also the Hugging Face Space entry point).

Honours GRADIO_SERVER_NAME / GRADIO_SERVER_PORT; see README.md for the QLORA_STUDIO_* settings.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from qlora_studio.ui.app import launch  # noqa: E402

if __name__ == "__main__":
    launch()
