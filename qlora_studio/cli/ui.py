"""`qlora-studio ui`: launch the app (same as `python app.py`)."""

from __future__ import annotations

import os


def register(subparsers) -> None:
    p = subparsers.add_parser("ui", help="Launch the QLoRA Studio web app.")
    p.add_argument("--host", default=None, help="Address to listen on (default GRADIO_SERVER_NAME or 127.0.0.1).")
    p.add_argument("--port", type=int, default=None, help="Port (default GRADIO_SERVER_PORT or 7860).")
    p.add_argument("--share", action="store_true", help="Create a public gradio.live link (needs the network).")
    p.set_defaults(func=run)


def run(args) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ..ui.app import launch

    kwargs = {"share": args.share}
    if args.host:
        kwargs["server_name"] = args.host
    if args.port:
        kwargs["server_port"] = args.port
    launch(**kwargs)
    return 0
