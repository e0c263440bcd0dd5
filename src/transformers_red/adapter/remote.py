"""Adapters on the Hugging Face Hub, PEFT-shaped: push a `RedModel`'s adapter (config + projections, never the
teacher's weights) and resolve a repo id to a local folder for `RedModel.from_pretrained` /
`RedAdapterConfig.from_pretrained`."""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

from ..constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, TAGS

ADAPTER_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, "README.md")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # user/name
_SCAN_CHUNK = 1 << 24


def upload_token(token: str | None, api: Any) -> str | None:
    """The token an upload will use: the argument, else the client's, else HF_TOKEN or the stored login."""
    from huggingface_hub import get_token

    return token or getattr(api, "token", None) or get_token()


def file_contains(path: str | os.PathLike, secret: bytes) -> bool:
    """Whether the file holds `secret`, read in chunks (any size, any format: weights and binaries too)."""
    tail = b""
    with open(path, "rb") as f:
        while chunk := f.read(_SCAN_CHUNK):
            if secret in tail + chunk:
                return True
            tail = chunk[-(len(secret) - 1):] if len(secret) > 1 else b""
    return False


def adapter_folder(path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
                   token: str | bool | None = None) -> str:
    """A local folder holding the adapter: `path_or_repo_id` itself, or its download from the Hub (the adapter
    files only; the cache and `HF_HUB_OFFLINE` are respected)."""
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        return path
    if not HUB_ID.match(path) or os.path.exists(path):
        raise FileNotFoundError(f"{path} is not a folder written by RedModel.save_pretrained, nor a Hub repo id "
                                "(user/name).")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(path, revision=revision, token=token, allow_patterns=list(ADAPTER_FILES))
    except LocalEntryNotFoundError as err:
        raise OSError(f"The adapter {path!r} is not in the local Hub cache and the Hub cannot be reached (offline: "
                      "HF_HUB_OFFLINE is set, or no network). Download it once online, or give a local folder."
                      ) from err
    except Exception as err:  # repository / revision not found, no access
        raise OSError(f"Cannot download the adapter {path!r}{f' at {revision}' if revision else ''}: {err}") from err


def _adapter_card(red: Any, repo_id: str) -> str:
    config = red.red_config
    teacher = config.teacher_name_or_path or "its teacher"
    base = f"base_model: {teacher}\n" if teacher and HUB_ID.match(teacher) and not os.path.exists(teacher) else ""
    tags = "".join(f"- {t}\n" for t in TAGS)
    return (f"---\n{base}library_name: transformers_red\ntags:\n{tags}---\n\n# {repo_id}\n\n"
            f"A RED adapter (arXiv:2605.29327) that runs `{teacher}` at width {config.teacher_hidden_size} -> "
            f"{config.student_hidden_size} (init `{config.init}`, model type `{config.model_type}`). It holds the "
            "trainable projections and norm gains only: load it onto the same teacher (checked by config "
            "fingerprint and weights digest).\n\n```python\nfrom transformers import AutoModelForCausalLM\n"
            "from transformers_red import RedModel\n\n"
            f'teacher = AutoModelForCausalLM.from_pretrained("{teacher}")\n'
            f'red = RedModel.from_pretrained(teacher, "{repo_id}")\n'
            "student = red.merge_and_unload()  # a plain model of width d_S\n```\n")


def push_adapter(red: Any, repo_id: str, *, private: bool = False, token: str | None = None,
                 revision: str | None = None, commit_message: str = "Upload RED adapter",
                 api: Any = None) -> str:
    """Upload `red`'s adapter (`red_adapter_config.json`, `red_adapter_model.safetensors`, a short card) to
    `repo_id`; return the commit URL. The token is checked not to appear in any uploaded file."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    api = api or HfApi(token=token)
    secret = upload_token(token, api)
    with tempfile.TemporaryDirectory(prefix="red-adapter-") as tmp:
        red.save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(_adapter_card(red, repo_id))
        for name in ADAPTER_FILES:
            if secret and file_contains(os.path.join(tmp, name), secret.encode()):
                raise ValueError(f"The adapter's {name} contains the Hub token; nothing was uploaded.")
        url = api.create_repo(repo_id, exist_ok=True, private=private, token=token)
        if revision is not None:
            api.create_branch(url.repo_id, branch=revision, exist_ok=True, token=token)
        info = api.upload_folder(repo_id=url.repo_id, folder_path=tmp, commit_message=commit_message, token=token,
                                 revision=revision, allow_patterns=list(ADAPTER_FILES))
    return info.commit_url
