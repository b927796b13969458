"""Push an exported folder (adapter bundle or merged model) to the Hugging Face Hub.

The token is handed to the HTTP requests and nowhere else: it is never written to disk,
logged or put in a message (error texts are scrubbed of it in case a library echoes it).
Offline, unreachable or with a bad token, the user gets a sentence saying which, and
nothing is uploaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_MANIFEST = "export.json"
DEFAULT_ENDPOINT = "https://huggingface.co"
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_RE = re.compile(rf"^(?:{_REPO_PART}/)?{_REPO_PART}$")
# The card's snippet points at the local folder; on the Hub it should point at the repo.
_CARD_PLACEHOLDERS = ('adapter = "."', 'model_dir = "."')


class HubError(RuntimeError):
    """A push cannot happen; the message says why (never containing the token)."""


@dataclass
class PushResult:
    repo_id: str
    url: str
    private: bool
    files: int


def hub_offline() -> bool:
    if any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
           for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    # huggingface_hub reads the variable once, at import: if it was set then, its client refuses every request.
    from huggingface_hub import constants
    return bool(constants.is_offline_mode())


def resolve_token(token: str | None) -> str | None:
    """The token typed in the app, else HF_TOKEN from the environment (or a `hf auth login` token)."""
    token = (token or "").strip()
    if token:
        return token
    from huggingface_hub import get_token
    return get_token()


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _whoami(endpoint: str, token: str, timeout: float) -> dict:
    """Check reachability and the token with a bounded wait (the Hub client itself has no timeout)."""
    from huggingface_hub.utils import build_hf_headers, get_session

    try:
        response = get_session().get(f"{endpoint}/api/whoami-v2", headers=build_hf_headers(token=token),
                                     timeout=timeout)
    except Exception as e:
        detail = _scrub(_first_line(e), token)
        raise HubError(f"Could not reach the Hub at {endpoint} ({type(e).__name__}: {detail}). "
                       "Check the network connection; nothing was uploaded.") from None
    if response.status_code == 401:
        raise HubError("The Hub rejected the token (401 Unauthorized). Create a token with write access at "
                       "https://huggingface.co/settings/tokens and try again; nothing was uploaded.")
    if response.status_code >= 400:
        raise HubError(f"The Hub answered {response.status_code} when checking the token; nothing was uploaded.")
    try:
        return response.json()
    except ValueError:
        raise HubError(f"{endpoint} did not answer like the Hugging Face Hub; nothing was uploaded.") from None


def _operations(folder: Path, repo_id: str):
    from huggingface_hub import CommitOperationAdd

    ops = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(folder).as_posix()
        if rel == "README.md":
            card = path.read_text(encoding="utf-8")
            for placeholder in _CARD_PLACEHOLDERS:
                card = card.replace(placeholder, placeholder.replace('"."', f'"{repo_id}"'))
            ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=card.encode("utf-8")))
        else:
            ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)))
    return ops


def check_push(repo_id: str, token: str | None = None) -> tuple[str, str]:
    """What can be known without the network: a valid repo name, online mode, a token. -> (repo_id, token)."""
    repo_id = (repo_id or "").strip()
    if not _REPO_RE.match(repo_id):
        raise HubError(f"repo name {repo_id!r} is not valid: use 'name' or 'user/name' with letters, digits, "
                       "'-', '_' or '.'")
    if hub_offline():
        raise HubError("Offline mode is on (HF_HUB_OFFLINE is set), so nothing can be pushed. Unset it when "
                       "you are online, or download the zip and upload it yourself.")
    token = resolve_token(token)
    if not token:
        raise HubError("No Hugging Face token: paste a write token, or set HF_TOKEN in the environment.")
    return repo_id, token


def push_to_hub(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
                endpoint: str | None = None, timeout: float = 30.0) -> PushResult:
    """Upload an exported folder to a (new or existing) model repo; `repo_id` may omit the user name."""
    folder = Path(folder)
    if not (folder / _MANIFEST).exists():
        raise HubError(f"{folder} is not an export (no {_MANIFEST}); export the run first, then push the folder")
    repo_id, token = check_push(repo_id, token)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    me = _whoami(endpoint, token, timeout)
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubError("This token is read-only; pushing needs a token with write access; nothing was uploaded.")
    if "/" not in repo_id:
        if not me.get("name"):
            raise HubError("Could not tell which account the token belongs to; give the repo as 'user/name'.")
        repo_id = f"{me['name']}/{repo_id}"

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token, library_name="qlora-studio")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        ops = _operations(folder, repo_id)
        api.create_commit(repo_id, ops, commit_message="Upload from QLoRA Studio", repo_type="model")
    except HfHubHTTPError as e:
        code = e.response.status_code if e.response is not None else "?"
        if code == 403:
            raise HubError(f"The token may not write to {repo_id} (403 Forbidden): use a write token of that "
                           "user or organization.") from None
        raise HubError(f"The Hub refused the push to {repo_id} ({code}: {_scrub(_first_line(e), token)}).") from None
    except Exception as e:
        raise HubError(f"Pushing to {repo_id} failed ({type(e).__name__}: {_scrub(_first_line(e), token)}).") from None
    return PushResult(repo_id, f"{endpoint}/{repo_id}", private, len(ops))
