"""Step 6 of the pipeline: publish a merged student on the Hugging Face Hub, with a model card (docs/hub.md).

`build_model_card` (card.py) turns a student folder (config.json, red_summary.json, erank.json) into a
`ModelCard` whose front matter has a `red:` block; `push_compressed` uploads a staged copy of the folder with that
card and `red_erank.json`. The user's folder is never written to; the token is never stored or logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, is_offline_mode
from huggingface_hub.utils import validate_repo_id

from .adapter.model import RedModel
from .adapter.remote import file_contains, teacher_card_metadata, upload_token
from .card import build_model_card, count_parameters, read_json, read_summary, recorded_teacher, write_erank_file
from .constants import ADAPTER_WEIGHTS_NAME, CARD_ERANK_NAME, ERANK_NAME, EXPORT_INCOMPLETE_NAME, STUDENT_SUMMARY_NAME

__all__ = ["HubPushError", "build_model_card", "check_student_folder", "count_parameters", "measure_student_speed",
           "push_compressed", "read_summary", "write_erank_file", "CARD_ERANK_NAME"]

logger = logging.getLogger(__name__)

# Never uploaded: trainer state (training_args.bin pickles TrainingArguments, hub_token included), optimizer
# state, adapter checkpoints, and the README / eRank file that are generated.
# What a student folder may publish (an allow-list: anything else in the folder stays local). README.md and
# red_erank.json are written by the push itself.
_PUBLISHED = re.compile(r"^(config\.json|generation_config\.json|model\.safetensors|model-\d+-of-\d+\.safetensors"
                        r"|model\.safetensors\.index\.json|tokenizer\.json|tokenizer_config\.json"
                        r"|special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt|tokenizer\.model"
                        r"|spiece\.model|chat_template\.(jinja|json)|red_summary\.json|red_config\.json|erank\.json)$")
_STALE_WEIGHTS = ["model*.safetensors", "model.safetensors.index.json"]  # remote weights the upload replaces


class HubPushError(RuntimeError):
    """The Hub refused or failed the upload (the local folder is unchanged)."""


def check_student_folder(folder: str | os.PathLike, allow_plain_model: bool = False) -> Path:
    """Raise `ValueError` unless `folder` holds a merged student: config.json with hidden_size, safetensors, and the
    RED summary (`red_summary.json`) that an export writes; `allow_plain_model=True` accepts a folder without it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder. Give the folder written by trainer.save_model(...) or "
                         "student.save_pretrained(...), or pass the merged model itself.")
    names = set(os.listdir(folder))
    if EXPORT_INCOMPLETE_NAME in names:
        raise ValueError(f"{folder} holds an export that was interrupted while its files were moved in "
                         f"({EXPORT_INCOMPLETE_NAME} is present): re-run trainer.save_model() to finish it.")
    if ADAPTER_WEIGHTS_NAME in names and "model.safetensors" not in names:
        raise ValueError(f"{folder} is a RED adapter checkpoint ({ADAPTER_WEIGHTS_NAME}), not a merged student. "
                         "Merge it first: "
                         "RedModel.from_pretrained(teacher, folder).merge_and_unload().save_pretrained(out) "
                         "(or trainer.save_model(out)), then push `out`.")
    if not names:
        raise ValueError(f"{folder} is empty: there is no model to push.")
    index = read_json(folder, "model.safetensors.index.json")
    if "model.safetensors" not in names and index is None:
        extra = " (only PyTorch .bin weights: re-save with save_pretrained)" if "pytorch_model.bin" in names else ""
        raise ValueError(f"{folder} has no model.safetensors or model.safetensors.index.json{extra}.")
    missing = sorted(set((index or {}).get("weight_map", {}).values()) - names)
    if missing:
        raise ValueError(f"{folder}/model.safetensors.index.json names shards that are missing: {missing[:3]}.")
    config = read_json(folder, "config.json")
    if not config or not config.get("hidden_size"):
        raise ValueError(f"{folder} has no config.json with a hidden_size: save the student with save_pretrained.")
    summary = read_summary(folder)
    if summary.get("student_hidden_size") not in (None, config["hidden_size"]):
        raise ValueError(f"{folder}/{STUDENT_SUMMARY_NAME} records a student of width "
                         f"{summary['student_hidden_size']} but config.json has hidden_size {config['hidden_size']}: "
                         "the folder mixes two exports.")
    wrong = sorted(n for n, size in (summary.get("files") or {}).items()
                   if not (folder / n).is_file() or (folder / n).stat().st_size != size)
    if wrong:
        raise ValueError(f"{folder}: {', '.join(wrong[:3])} differ from the export that {STUDENT_SUMMARY_NAME} "
                         "describes (missing or another size): the folder mixes two exports; re-export it.")
    if not summary and not allow_plain_model:
        raise ValueError(f"{folder} has no {STUDENT_SUMMARY_NAME}: it is a plain model (a teacher?), not a student "
                         "exported by trainer.save_model(). Push the export folder, or pass allow_plain_model=True to "
                         "publish it anyway; the card then says that nothing recorded how it was made.")
    return folder


def _stage(folder: Path, staging: Path) -> list[str]:
    """Hard-link (or copy) the folder's publishable files into `staging`; return the names left out.

    Only `_PUBLISHED` names at the top level are staged. A symbolic link is refused if it leads out of the folder
    (its target would be uploaded); a link to a file inside the folder is staged as that file.
    """
    root = folder.resolve()
    left_out = []
    for entry in sorted(folder.iterdir()):
        if not _PUBLISHED.match(entry.name) or not entry.is_file():
            left_out.append(entry.name)
            continue
        target = entry.resolve()
        if entry.is_symlink() and root not in target.parents:
            raise ValueError(f"{entry} is a symbolic link to {target}, outside the folder: refusing to upload "
                             "a file from elsewhere. Copy the file into the folder, or remove the link.")
        try:
            os.link(target, staging / entry.name)
        except OSError:
            shutil.copy2(target, staging / entry.name)
    return left_out


def _check_no_token(staging: Path, token: str | None, folder: Path) -> None:
    """Refuse the push if any staged file (the card included) contains the token."""
    if not token:
        return
    for entry in sorted(staging.iterdir()):
        if file_contains(entry, token.encode()):
            source = folder / entry.name if (folder / entry.name).exists() else entry.name
            raise ValueError(f"{source} contains the Hub token that this push would use; remove it from the file "
                             "before pushing (nothing was uploaded).")


def push_compressed(model_or_folder: Any, repo_id: str, api: HfApi | None = None, private: bool = False,
                    token: str | None = None, commit_message: str = "Upload RED-compressed student",
                    eval_results: list[EvalResult | dict] | None = None, *, tokenizer: Any = None,
                    merge: bool = False, allow_plain_model: bool = False, measure_speed: bool = False,
                    **card_kwargs: Any) -> str:
    """Push a merged student to `repo_id` and return the commit URL.

    `model_or_folder`: a student folder (trainer.save_model / save_pretrained), a merged `PreTrainedModel` (saved
    with `tokenizer` first), or a `RedModel` with `merge=True`. README.md (`build_model_card(**card_kwargs)`) and
    `red_erank.json` are written into a temporary copy. Bad input raises `ValueError` before any request; a failed
    request raises `HubPushError`. The local folder is never modified, so pushing again is always safe.

    Only a student's files are uploaded (config, generation config, safetensors weights, tokenizer files, the RED
    summary and eRank): other files stay local, a symbolic link out of the folder is refused, and every uploaded
    file (the card included) is scanned for the token the upload uses (`token`, the client's, HF_TOKEN or the
    stored login). A folder without the RED summary is refused unless `allow_plain_model=True`.

    The card's `license` (and `language`) default to the teacher's card: its folder's, the Hub cache's, or, when
    the teacher is a Hub repo, its README.md read from the Hub (a failure is logged; give `license=` then).
    `measure_speed=True` loads the student and the teacher (`teacher_name_or_path`, default the recorded one) and
    puts their generation tokens/s, measured on this machine before the upload, on the card.
    """
    validate_repo_id(repo_id)
    if isinstance(model_or_folder, RedModel):
        if not merge:
            raise ValueError("This is an unmerged RedModel (the teacher with adapters): call merge_and_unload() "
                             "first, or pass merge=True to push the merged student.")
        model_or_folder = model_or_folder.merge_and_unload()
    if not isinstance(model_or_folder, (str, os.PathLike)) and not hasattr(model_or_folder, "save_pretrained"):
        raise TypeError("Expected a student folder or a merged PreTrainedModel, "
                        f"got {type(model_or_folder).__name__}.")
    if is_offline_mode():
        raise HubPushError("HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to push to the Hub.")
    with tempfile.TemporaryDirectory(prefix="red-push-") as tmp:
        if isinstance(model_or_folder, (str, os.PathLike)):
            folder = check_student_folder(model_or_folder, allow_plain_model)
        else:
            folder = Path(tmp, "saved")
            model_or_folder.save_pretrained(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            summary = card_kwargs.pop("red_summary", None) or getattr(model_or_folder, "red_summary", None)
            if summary is not None:  # merge_and_unload() records one on the merged model
                (folder / STUDENT_SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
            check_student_folder(folder, allow_plain_model)
        teacher = card_kwargs.get("teacher_name_or_path") or recorded_teacher(read_summary(folder))
        if measure_speed:  # before any request: a teacher that cannot be loaded stops the push here
            card_kwargs["speed"] = measure_student_speed(folder, teacher)
        api = api or HfApi(token=token)
        if card_kwargs.get("license") is None:  # fetched into the Hub cache, where build_model_card reads it
            teacher_card_metadata(teacher, api=api, token=token)
        staging = Path(tmp, "upload")
        staging.mkdir()
        left_out = _stage(folder, staging)
        if left_out:
            logger.info("Not uploaded (not part of a student): %s", ", ".join(left_out))
        card = build_model_card(folder, eval_results=eval_results, model_name=repo_id, **card_kwargs)
        card.save(staging / "README.md")
        erank = card_kwargs.get("erank") or read_json(folder, ERANK_NAME)
        if erank:
            write_erank_file(erank, staging, (card.data.red["erank"] or {}).get("measured_on"))
        _check_no_token(staging, upload_token(token, api), folder)
        logger.info("Pushing %s to %s on %s", folder, repo_id, api.endpoint)
        try:
            url = api.create_repo(repo_id, exist_ok=True, private=private, token=token)
            if url.repo_id != repo_id:  # "name" -> "user/name": the card names the full id
                build_model_card(folder, eval_results=eval_results, model_name=url.repo_id,
                                 **card_kwargs).save(staging / "README.md")
            info = api.upload_folder(repo_id=url.repo_id, folder_path=staging, commit_message=commit_message,
                                     token=token, delete_patterns=_STALE_WEIGHTS)
        except Exception as err:  # HTTP errors, connection errors, metadata refused by the Hub
            status = getattr(getattr(err, "response", None), "status_code", None)
            hint = ("check that the token may write there (HF_TOKEN or `hf auth login`)" if status in (401, 403)
                    else "see the Hub's answer below" if status and status < 500
                    else "push again: files already uploaded are skipped, stale weight files replaced")
            raise HubPushError(f"Pushing {folder} to {repo_id} on {api.endpoint} failed "
                               f"({type(err).__name__}{f', HTTP {status}' if status else ''}): {hint}. Nothing "
                               f"local was changed. Hub client said: {err}") from err
    return info.commit_url


def measure_student_speed(student_folder: str | os.PathLike, teacher_name_or_path: str | None = None,
                          device: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Generation tokens/s of the student in `student_folder` and its teacher, measured here in one run
    (`transformers_red.evaluation.footprint.measure_generation_speed(**kwargs)`), both on `device` (default CPU).

    The teacher (default: the one the folder records): a folder, a Hub id in the local cache, or "smollm2".
    Raises `ValueError` before loading any weights when no teacher is known, and when the teacher's width is not
    the recorded one.
    """
    from .evaluation.footprint import measure_generation_speed
    from .loading import load_config, load_model

    summary = read_summary(student_folder)
    teacher_name_or_path = teacher_name_or_path or recorded_teacher(summary)
    if not teacher_name_or_path:
        raise ValueError(f"Measuring the speed needs the teacher, and {student_folder} records none: pass "
                         "teacher_name_or_path (--teacher).")
    recorded = summary.get("teacher_hidden_size")
    width = load_config(teacher_name_or_path).get_text_config().hidden_size
    if recorded not in (None, width):
        raise ValueError(f"{teacher_name_or_path} has hidden_size {width}, but the student was distilled from a "
                         f"teacher of width {recorded}: give its own teacher.")
    student = load_model(student_folder, tokenizer=False)[0]
    teacher = load_model(teacher_name_or_path, tokenizer=False)[0]
    if device is not None:
        student, teacher = student.to(device), teacher.to(device)
    return measure_generation_speed(student, teacher, **kwargs)
