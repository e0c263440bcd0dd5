"""Step 6 of the pipeline: publish a merged student on the Hugging Face Hub, with a model card (docs/hub.md).

`build_model_card` turns a student folder (config.json, red_summary.json, erank.json) into a `ModelCard` whose
front matter has a `red:` block; `push_compressed` uploads a staged copy of the folder with that card and
`red_erank.json`. The user's folder is never written to; the token is never stored or logged.
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

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, is_offline_mode
from huggingface_hub.utils import validate_repo_id

from .adapter.model import RedModel
from .adapter.remote import HUB_ID, file_contains, upload_token
from .constants import (
    ADAPTER_WEIGHTS_NAME,
    CARD_ERANK_NAME,
    ERANK_NAME,
    EXPORT_INCOMPLETE_NAME,
    LEGACY_SUMMARY_NAME,
    PAPER_CITATION,
    PAPER_ID,
    STUDENT_SUMMARY_NAME,
    TAGS,
)

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


def _read_json(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_summary(folder: str | os.PathLike) -> dict:
    """The RED summary of a merged student folder (`red_summary.json`, or `red_config.json` before 0.2); {} if none."""
    folder = Path(folder)
    return _read_json(folder, STUDENT_SUMMARY_NAME) or _read_json(folder, LEGACY_SUMMARY_NAME) or {}


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
    index = _read_json(folder, "model.safetensors.index.json")
    if "model.safetensors" not in names and index is None:
        extra = " (only PyTorch .bin weights: re-save with save_pretrained)" if "pytorch_model.bin" in names else ""
        raise ValueError(f"{folder} has no model.safetensors or model.safetensors.index.json{extra}.")
    missing = sorted(set((index or {}).get("weight_map", {}).values()) - names)
    if missing:
        raise ValueError(f"{folder}/model.safetensors.index.json names shards that are missing: {missing[:3]}.")
    config = _read_json(folder, "config.json")
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
                         "exported by trainer.save_model(). Push the export folder, or pass allow_plain_model=True "
                         "(--allow_plain_model) to publish it anyway; the card then says that nothing recorded how "
                         "it was made.")
    return folder


def count_parameters(config: dict[str, Any], hidden_size: int | None = None) -> int | None:
    """Parameters of the causal LM that `config` (optionally at another `hidden_size`) describes; None if unknown.

    The model is built on the meta device, so nothing is allocated. With the student's config and the teacher's
    width this is the teacher's count: RED changes only the residual width (head_dim is explicit).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .adapter.merge import outside_zero3_init

    try:
        cfg = AutoConfig.for_model(**{**config, **({"hidden_size": hidden_size} if hidden_size else {})})
        with torch.device("meta"), outside_zero3_init():
            return int(AutoModelForCausalLM.from_config(cfg).num_parameters())
    except Exception as err:  # an architecture transformers cannot build: leave the count out
        logger.warning("Could not count the parameters of a %s model: %s", config.get("model_type"), err)
        return None


def _eval_result(item: EvalResult | dict[str, Any]) -> EvalResult:
    """An `EvalResult` from itself or a dict {task, metric, value[, dataset, split, config, name, ...]}."""
    if isinstance(item, EvalResult):
        return item
    item = dict(item)
    try:
        task, metric, value = item.pop("task"), item.pop("metric"), item.pop("value")
    except KeyError as err:
        raise ValueError(f"An eval result needs 'task', 'metric' and 'value' keys, got {sorted(item)}.") from err
    dataset = item.pop("dataset", task)
    fields = dict(task_type=item.pop("task_type", "text-generation"), task_name=task, dataset_type=dataset,
                  dataset_name=item.pop("dataset_name", task), dataset_split=item.pop("split", None),
                  dataset_config=item.pop("config", None), metric_type=metric, metric_value=value,
                  metric_name=item.pop("name", None))
    if "num_fewshot" in item:
        fields["dataset_args"] = {"num_fewshot": item.pop("num_fewshot")}
    return EvalResult(**fields, **item)  # other keys must be EvalResult fields (source_name, ...)


def _erank_summary(erank: dict | None, text: str | None) -> dict[str, Any] | None:
    history = (erank or {}).get("history") or []
    if not history:
        return None
    last, r = history[-1], (lambda x: None if x is None else round(float(x), 4))
    return {"step": last.get("step"), "student_mean": r(last.get("mean")), "student_min": r(last.get("min")),
            "student_min_layer": last.get("min_layer"), "teacher_mean": r(last.get("teacher_mean")),
            "ratio": r(last.get("ratio")), "measured_on": text, "per_layer": CARD_ERANK_NAME}


def write_erank_file(erank: dict, folder: str | os.PathLike, erank_text: str | None = None) -> str:
    """Write `red_erank.json` (per-layer eRank of the teacher and the final student, the history) into `folder`."""
    last = (erank.get("history") or [{}])[-1]
    data = {"measured_on": erank_text, "teacher": erank.get("teacher"), "student": last.get("student"),
            "step": last.get("step"), "history": erank.get("history") or []}
    path = os.path.join(folder, CARD_ERANK_NAME)
    Path(path).write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def build_model_card(student_folder_or_model: Any, *, teacher_name_or_path: str | None = None,
                     red_summary: dict | None = None, erank: dict | None = None,
                     eval_results: list[EvalResult | dict] | None = None, datasets: list[str] | None = None,
                     erank_text: str | None = None, library_version: str | None = None,
                     model_name: str | None = None, tags: list[str] | None = None) -> ModelCard:
    """The model card of a merged student: a folder (its config.json, red_summary.json and erank.json are read),
    a merged `PreTrainedModel`, or the student's config as a dict. Explicit arguments override what the folder
    records; `tags` are added to the RED ones. No network.
    """
    from .constants import __version__

    if isinstance(student_folder_or_model, (str, os.PathLike)):
        folder = Path(student_folder_or_model)
        config = _read_json(folder, "config.json") or {}
        red_summary = red_summary if red_summary is not None else read_summary(folder)
        erank = erank if erank is not None else _read_json(folder, ERANK_NAME)
        student_params, model_name = count_parameters(config) if config else None, model_name or folder.resolve().name
    elif isinstance(student_folder_or_model, dict):  # a student's config (the trainer's card before any export)
        config, student_params = student_folder_or_model, count_parameters(student_folder_or_model)
    else:
        config, student_params = student_folder_or_model.config.to_dict(), student_folder_or_model.num_parameters()
        if red_summary is None:  # recorded on the model by merge_and_unload()
            red_summary = getattr(student_folder_or_model, "red_summary", None)
    red_summary = red_summary or {}
    adapter, loss = red_summary.get("adapter") or {}, red_summary.get("distillation") or {}
    teacher = teacher_name_or_path or adapter.get("teacher_name_or_path")
    d_s = config.get("hidden_size") or red_summary.get("student_hidden_size")
    d_t = red_summary.get("teacher_hidden_size") or adapter.get("teacher_hidden_size")
    teacher_params = count_parameters(config, d_t) if config and d_t else None
    both = student_params and teacher_params
    red = {"paper": f"arXiv:{PAPER_ID}", "teacher": teacher, "teacher_hidden_size": d_t, "student_hidden_size": d_s,
           "width_ratio": round(d_s / d_t, 4) if d_s and d_t else None,
           "teacher_parameters": teacher_params, "student_parameters": student_params,
           "parameter_ratio": round(student_params / teacher_params, 4) if both else None,
           "compression_ratio": round(teacher_params / student_params, 3) if both else None,
           "init": adapter.get("init"), "norm_init": adapter.get("norm_init"),
           "share_projections": adapter.get("share_projections"),
           "calibration": {"source": adapter.get("calibration_source"),
                           "num_samples": adapter.get("calibration_num_samples")},
           "distillation": {k: loss[k] for k in ("temperature", "beta", "ce_weight", "kd_weight", "clone_weight",
                                                 "clone_terms") if k in loss},
           "global_step": red_summary.get("global_step"), "tokens_trained": red_summary.get("tokens_trained"),
           "erank": _erank_summary(erank, erank_text or red_summary.get("erank_source")),
           "library": "transformers_red", "library_version": library_version or __version__}
    if not red_summary:
        red["recorded"] = False  # pushed with allow_plain_model: no RED summary says how this model was made
    hub_teacher = teacher if teacher and HUB_ID.match(teacher) and not re.search(r"\.\.|--", teacher) \
        and not os.path.exists(teacher) else None  # a local path is no base_model
    data = ModelCardData(base_model=hub_teacher, library_name="transformers", pipeline_tag="text-generation",
                         tags=[*TAGS, *(t for t in tags or [] if t not in TAGS)], datasets=datasets,
                         model_name=model_name,
                         eval_results=[_eval_result(e) for e in eval_results] if eval_results else None, red=red)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{_card_body(model_name or 'red-student', red, config)}")


def _card_body(name: str, red: dict, config: dict) -> str:
    arch = (config.get("architectures") or ["AutoModelForCausalLM"])[0]
    width = f"{red['teacher_hidden_size']} -> {red['student_hidden_size']}" if red["teacher_hidden_size"] \
        else red["student_hidden_size"]
    share = f", {100 * red['parameter_ratio']:.1f}% of the teacher's parameters" if red["parameter_ratio"] else ""
    loss, er, cal = red["distillation"], red["erank"], red["calibration"]
    weights = (f"CE {loss.get('ce_weight')}, KD {loss.get('kd_weight')} (temperature {loss.get('temperature')}, "
               f"beta {loss.get('beta')}), clone {loss.get('clone_weight')}")
    erank = "not measured." if not er else (
        f"student mean {er['student_mean']} (lowest {er['student_min']}, layer {er['student_min_layer']}), teacher "
        f"{er['teacher_mean']}, ratio {er['ratio']} at step {er['step']}"
        f"{' on ' + er['measured_on'] if er['measured_on'] else ''}; per layer in `{CARD_ERANK_NAME}`.")
    return f"""
# {name}

A width-reduced student of `{red['teacher'] or 'its teacher'}` distilled with RED (arXiv:{PAPER_ID}) by
`transformers_red`: residual width {width}{share}. It is a plain `{arch}` checkpoint; loading it needs no
custom code and no transformers_red:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```

## How it was made

Projection init `{red['init']}` (calibration: {cal['num_samples']} texts, {cal['source']}); loss weights
{weights}; {red['global_step']} steps, {red['tokens_trained']} tokens.
Effective rank: {erank} All values are in the `red:` block of this card's metadata.

## Evaluation

```bash
transformers-red eval {name} --tasks gsm8k
```

## Citation

```bibtex
{PAPER_CITATION}
```
"""


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
                    merge: bool = False, allow_plain_model: bool = False, **card_kwargs: Any) -> str:
    """Push a merged student to `repo_id` and return the commit URL.

    `model_or_folder`: a student folder (trainer.save_model / save_pretrained), a merged `PreTrainedModel` (saved
    with `tokenizer` first), or a `RedModel` with `merge=True`. README.md (`build_model_card(**card_kwargs)`) and
    `red_erank.json` are written into a temporary copy. Bad input raises `ValueError` before any request; a failed
    request raises `HubPushError`. The local folder is never modified, so pushing again is always safe.

    Only a student's files are uploaded (config, generation config, safetensors weights, tokenizer files, the RED
    summary and eRank): other files stay local, a symbolic link out of the folder is refused, and every uploaded
    file (the card included) is scanned for the token the upload uses (`token`, the client's, HF_TOKEN or the
    stored login). A folder without the RED summary is refused unless `allow_plain_model=True`.
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
        staging = Path(tmp, "upload")
        staging.mkdir()
        left_out = _stage(folder, staging)
        if left_out:
            logger.info("Not uploaded (not part of a student): %s", ", ".join(left_out))
        card = build_model_card(folder, eval_results=eval_results, model_name=repo_id, **card_kwargs)
        card.save(staging / "README.md")
        erank = card_kwargs.get("erank") or _read_json(folder, ERANK_NAME)
        if erank:
            write_erank_file(erank, staging, (card.data.red["erank"] or {}).get("measured_on"))
        _check_no_token(staging, upload_token(token, api), folder)
        api = api or HfApi(token=token)
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
