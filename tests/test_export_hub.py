"""Hub push against a local fake Hub (no real network): offline, unreachable, bad token, read-only token,
a full push, and the token never landing in a file, a log or a message."""

from __future__ import annotations

import base64
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from qlora_studio.export import HubError, export_adapter, push_to_hub
from test_export_safety import make_tiny_run

GOOD = "hf_GoodTokenThatMustNeverBeWritten123"
READ_ONLY = "hf_ReadOnlyToken456"


class FakeHub:
    """Just enough of the Hub's HTTP API for whoami, create_repo and a commit of regular (non-LFS) files."""

    def __init__(self):
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.files: dict[str, bytes] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                auth = self.headers.get("Authorization", "")
                hub.requests.append({"method": self.command, "path": self.path, "auth": auth, "body": body})
                token = auth.removeprefix("Bearer ")
                if token not in (GOOD, READ_ONLY):
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                path = self.path.split("?")[0]
                if path == "/api/whoami-v2":
                    role = "write" if token == GOOD else "read"
                    return self._reply(200, {"name": "alice", "auth": {"accessToken": {"role": role}}})
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo = f"{payload.get('organization') or 'alice'}/{payload['name']}"
                    hub.repos[repo] = payload
                    return self._reply(200, {"url": f"http://{self.headers['Host']}/{repo}"})
                if path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                if path.endswith("/preupload/main"):
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if path.endswith("/commit/main"):
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    repo = path.removeprefix("/api/models/").removesuffix("/commit/main")
                    return self._reply(200, {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{'a' * 40}",
                                             "commitOid": "a" * 40})
                return self._reply(404, {"error": f"fake hub has no {path}"})

            do_GET = do_POST = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, embedded_path) -> Path:
    root = tmp_path_factory.mktemp("hub")
    run = make_tiny_run(root, embedded_path)
    return export_adapter(run, root / "pirate-adapter").path


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Online mode with an empty HF_HOME, so no saved login or real token can leak in."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once at import, when conftest had set it
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))


def test_offline_gives_a_clear_message_and_no_request(bundle, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with FakeHub() as hub:
        with pytest.raises(HubError, match="Offline mode is on"):
            push_to_hub(bundle, "pirate", token=GOOD, endpoint=hub.url)
    assert hub.requests == []


def test_unreachable_hub_gives_a_clear_message(bundle, online):
    with pytest.raises(HubError, match=r"Could not reach the Hub at http://127.0.0.1:9 .*nothing was uploaded"):
        push_to_hub(bundle, "pirate", token=GOOD, endpoint="http://127.0.0.1:9", timeout=5)


def test_bad_token_is_rejected_clearly(bundle, online):
    with FakeHub() as hub:
        with pytest.raises(HubError, match=r"rejected the token \(401"):
            push_to_hub(bundle, "pirate", token="hf_wrong", endpoint=hub.url)
        with pytest.raises(HubError, match="read-only"):
            push_to_hub(bundle, "pirate", token=READ_ONLY, endpoint=hub.url)
    assert hub.repos == {} and hub.files == {}


def test_missing_token_and_bad_repo_names(bundle, online):
    with pytest.raises(HubError, match="No Hugging Face token"):
        push_to_hub(bundle, "pirate", token="", endpoint="http://127.0.0.1:9")
    for bad in ("", "a/b/c", "spaces in name", "../up", "-leading"):
        with pytest.raises(HubError, match="not valid"):
            push_to_hub(bundle, bad, token=GOOD, endpoint="http://127.0.0.1:9")
    with pytest.raises(HubError, match="not an export"):
        push_to_hub(bundle.parent, "pirate", token=GOOD, endpoint="http://127.0.0.1:9")


def test_push_uploads_the_bundle_and_points_the_card_at_the_repo(bundle, online):
    with FakeHub() as hub:
        result = push_to_hub(bundle, "pirate", token=GOOD, private=True, endpoint=hub.url)
    assert result.repo_id == "alice/pirate" and result.url == f"{hub.url}/alice/pirate"
    assert hub.repos["alice/pirate"]["visibility"] == "private"
    local = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    assert set(hub.files) == set(local)
    for name, data in local.items():
        if name != "README.md":
            assert hub.files[name] == data, name
    card = hub.files["README.md"].decode()
    assert 'adapter = "alice/pirate"' in card and 'adapter = "."' not in card


def test_the_token_never_appears_in_files_logs_or_messages(bundle, online, tmp_path, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    messages = []
    with FakeHub() as hub:
        for token, endpoint in ((GOOD, hub.url), (GOOD + "x", hub.url), (GOOD, "http://127.0.0.1:9")):
            try:
                push_to_hub(bundle, "pirate", token=token, endpoint=endpoint, timeout=5)
                messages.append("ok")
            except HubError as e:
                messages.append(str(e))
    assert messages[0] == "ok" and len(messages) == 3
    out, err = capfd.readouterr()
    for text in [out, err, caplog.text, *messages]:
        assert GOOD not in text
    # Nothing on disk: not the bundle, not the (empty) HF_HOME, not the uploaded files.
    for root in (bundle, tmp_path):
        for path in Path(root).rglob("*"):
            if path.is_file():
                assert GOOD.encode() not in path.read_bytes(), path
    assert all(GOOD.encode() not in data for data in hub.files.values())
    # The only place it went: the Authorization header of requests to the Hub.
    assert any(r["auth"] == f"Bearer {GOOD}" for r in hub.requests)
    assert all(GOOD.encode() not in r["body"] for r in hub.requests)
