"""Adapters on the Hugging Face Hub, PEFT-shaped: push a `RedModel`'s adapter (config + projections, never the
teacher's weights) and resolve a repo id to a local folder for `RedModel.from_pretrained` /
`RedAdapterConfig.from_pretrained`."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any

from ..constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, TAGS

logger = logging.getLogger(__name__)

ADAPTER_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, "README.md")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # user/name
# card fields a derivative inherits from its teacher's card (a Llama or Gemma derivative must carry its licence)
INHERITED_CARD_FIELDS = ("license", "license_name", "license_link", "language")
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


def hub_base_model(teacher: str | None) -> str | None:
    """`teacher` when it names a Hub repo (user/name, not a local path): what a card may give as `base_model`."""
    if teacher and HUB_ID.match(teacher) and not re.search(r"\.\.|--", teacher) and not os.path.exists(teacher):
        return teacher
    return None


def teacher_card_metadata(teacher: str | None, *, api: Any = None, token: str | None = None) -> dict[str, Any]:
    """What a derivative's card inherits from its teacher's card: `license` (with `license_name` /
    `license_link` for `license: other`) and `language`, from README.md in the teacher's folder or, for a repo id,
    the local Hub cache; with `api` (an `HfApi`) a repo id's card is downloaded when not cached. {} when there is
    no card or it records none of them; a failed download is logged, never raised (the card then says less)."""
    path = os.fspath(teacher) if teacher else None
    if not path:
        return {}
    readme = os.path.join(path, "README.md") if os.path.isdir(path) else None
    if readme is None and hub_base_model(path):
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(path, "README.md")
        readme = cached if isinstance(cached, str) else None
        if readme is None and api is not None:
            try:
                readme = hf_hub_download(path, "README.md", endpoint=api.endpoint, token=token or api.token)
            except Exception as err:  # gated, missing, offline: the card goes without the inherited fields
                logger.info("Could not read %s's model card (%s: %s); its license is not inherited.", path,
                            type(err).__name__, err)
    if readme is None or not os.path.isfile(readme):
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except Exception as err:  # a card without front matter or with broken YAML
        logger.info("Could not parse %s (%s); nothing is inherited from it.", readme, err)
        return {}
    return {key: data[key] for key in INHERITED_CARD_FIELDS if data.get(key)}


def _adapter_card(red: Any, repo_id: str, license: str | None = None) -> str:
    from huggingface_hub import ModelCardData

    config = red.red_config
    teacher = config.teacher_name_or_path or "its teacher"
    base = hub_base_model(config.teacher_name_or_path)
    inherited = teacher_card_metadata(config.teacher_name_or_path)
    if license:  # an explicit licence replaces the teacher's (and its name / link)
        inherited = {"license": license, **({"language": inherited["language"]} if "language" in inherited else {})}
    # not a PEFT adapter (no adapter_config.json): base_model_relation says what it is, library_name how to load it
    data = ModelCardData(base_model=base, library_name="transformers_red", tags=list(TAGS), **inherited,
                         **({"base_model_relation": "adapter"} if base else {}))
    return (f"---\n{data.to_yaml()}\n---\n\n# {repo_id}\n\n"
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
                 api: Any = None, license: str | None = None) -> str:
    """Upload `red`'s adapter (`red_adapter_config.json`, `red_adapter_model.safetensors`, a short card with
    `base_model_relation: adapter` and the teacher's licence unless `license` is given) to `repo_id`; return the
    commit URL. The token is checked not to appear in any uploaded file."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    api = api or HfApi(token=token)
    secret = upload_token(token, api)
    if license is None:  # the teacher's card, fetched into the Hub cache where _adapter_card reads it
        teacher_card_metadata(red.red_config.teacher_name_or_path, api=api, token=token)
    with tempfile.TemporaryDirectory(prefix="red-adapter-") as tmp:
        red.save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(_adapter_card(red, repo_id, license))
        for name in ADAPTER_FILES:
            if secret and file_contains(os.path.join(tmp, name), secret.encode()):
                raise ValueError(f"The adapter's {name} contains the Hub token; nothing was uploaded.")
        url = api.create_repo(repo_id, exist_ok=True, private=private, token=token)
        if revision is not None:
            api.create_branch(url.repo_id, branch=revision, exist_ok=True, token=token)
        info = api.upload_folder(repo_id=url.repo_id, folder_path=tmp, commit_message=commit_message, token=token,
                                 revision=revision, allow_patterns=list(ADAPTER_FILES))
    return info.commit_url
