"""Puts our scripts first in the <head> of the app's HTML pages, before Gradio's own module scripts.

Gradio's `head=` lands after its modules have run and kept their own references, too late for
assets/frame_pacing.js (wraps `requestAnimationFrame`) and assets/plot_resize.js (patches
`window.Plotly` as Gradio's chunk sets it), which must be in place before they do.
"""

from __future__ import annotations

from starlette.middleware import Middleware

from ..paths import ASSETS_DIR

HEAD_SCRIPTS = (ASSETS_DIR / "frame_pacing.js", ASSETS_DIR / "plot_resize.js")


def head_scripts_middleware() -> Middleware:
    return Middleware(HeadScript, script="\n".join(path.read_text() for path in HEAD_SCRIPTS))


class HeadScript:
    """ASGI middleware: inserts `<script>…</script>` right after `<head>` in uncompressed HTML responses."""

    def __init__(self, app, script: str):
        self.app = app
        self.tag = b"<script>" + script.encode() + b"</script>"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "GET":
            await self.app(scope, receive, send)
            return
        start: dict | None = None
        chunks: list[bytes] = []

        async def send_patched(message):
            nonlocal start
            if message["type"] == "http.response.start" and _is_plain_html(message.get("headers", [])):
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = _insert_after_head(b"".join(chunks), self.tag)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_patched)


def _is_plain_html(headers) -> bool:
    values = {k.lower(): v.lower() for k, v in headers}
    return values.get(b"content-type", b"").startswith(b"text/html") and b"content-encoding" not in values


def _insert_after_head(body: bytes, tag: bytes) -> bytes:
    lower = body.lower()
    at = lower.find(b"<head")
    end = lower.find(b">", at) if at >= 0 else -1
    if end < 0:
        return body
    return body[:end + 1] + tag + body[end + 1:]
