"""The middleware that puts our page scripts (frame pacing, plot resize) first in the app's HTML <head>."""
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from qlora_studio.ui.page_head import HEAD_SCRIPTS, HeadScript, head_scripts_middleware

PAGE = '<!doctype html><html><HEAD lang="en"><script type="module" src="/assets/index.js"></script></head><body/></html>'


def client(script="window.__first = 1;") -> TestClient:
    async def page(request):
        return HTMLResponse(PAGE)

    async def data(request):
        return JSONResponse({"html": "<head>"})

    async def text(request):
        return PlainTextResponse("<head>")

    app = Starlette(routes=[Route("/", page, methods=["GET", "POST"]), Route("/data", data), Route("/text", text)])
    return TestClient(HeadScript(app, script=script))


def test_the_script_comes_before_every_other_script_in_html_pages():
    response = client().get("/")
    body = response.text
    assert body.startswith('<!doctype html><html><HEAD lang="en"><script>window.__first = 1;</script><script type="module"')
    assert int(response.headers["content-length"]) == len(response.content)


def test_other_responses_pass_through_untouched():
    c = client()
    assert c.get("/data").json() == {"html": "<head>"}
    assert c.get("/text").text == "<head>"
    assert c.post("/").text == PAGE  # only page loads (GET) are patched


def test_the_shipped_scripts_are_the_ones_injected():
    script = head_scripts_middleware().kwargs["script"]
    assert [path.name for path in HEAD_SCRIPTS] == ["frame_pacing.js", "plot_resize.js"]
    assert all(path.read_text() in script for path in HEAD_SCRIPTS)
    assert "requestAnimationFrame" in script and "Plots.resize" in script
