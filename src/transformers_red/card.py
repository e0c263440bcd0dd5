"""The model card of a merged student (docs/hub.md): what the Hub reads and what a user needs to know.

Front matter: `base_model` (the teacher) with `base_model_relation: finetune`, `license` and `language` (given, or
inherited from the teacher's card), `datasets`, `model-index`, and a `red:` block with every recorded value. The
body says how the student was made and what the width buys (parameters, bytes, KV cache per token, measured
generation speed); a value nothing recorded is left out or said to be unknown, never printed as "None".
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .adapter.remote import hub_base_model, teacher_card_metadata
from .constants import (
    CARD_ERANK_NAME,
    CONFIG_SUMMARY_KEY,
    ERANK_NAME,
    LEGACY_SUMMARY_NAME,
    LOSS_SETTINGS,
    PAPER_CITATION,
    PAPER_ID,
    STUDENT_SUMMARY_NAME,
    TAGS,
)
from .evaluation.footprint import attention_shape, config_dtype, model_footprint

logger = logging.getLogger(__name__)


def read_json(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_summary(folder: str | os.PathLike) -> dict:
    """The RED summary of a merged student folder: `red_summary.json` (a trainer export; `red_config.json` in older
    ones), else the one `merge_and_unload()` put into config.json (`student.save_pretrained(...)`); {} if none."""
    folder = Path(folder)
    return (read_json(folder, STUDENT_SUMMARY_NAME) or read_json(folder, LEGACY_SUMMARY_NAME)
            or (read_json(folder, "config.json") or {}).get(CONFIG_SUMMARY_KEY) or {})


def recorded_teacher(summary: dict) -> str | None:
    """The teacher a RED summary names (`adapter.teacher_name_or_path`), or None."""
    return (summary.get("adapter") or {}).get("teacher_name_or_path")


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


def trainer_card_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """transformers' and TRL's model-card arguments (`push_to_hub(...)`, `create_model_card(...)`) as
    `build_model_card` arguments: `finetuned_from` -> `teacher_name_or_path`, `dataset_tags` / `dataset_name` /
    `dataset` -> `datasets`, `tags`, `license`, `language`; other keys pass through (push arguments).
    `model_name` (the repo id names the model), `tasks` (always text-generation) and `dataset_args` are dropped."""
    kwargs = dict(kwargs)
    for key in ("model_name", "tasks", "dataset_args"):
        kwargs.pop(key, None)
    datasets = [kwargs.pop(key, None) for key in ("dataset_tags", "dataset_name", "dataset")]
    datasets = next((d for d in datasets if d), None)
    if datasets and kwargs.get("datasets") is None:  # Hub ids first: dataset_tags are what the Hub links
        kwargs["datasets"] = [datasets] if isinstance(datasets, str) else list(datasets)
    finetuned_from = kwargs.pop("finetuned_from", None)
    if finetuned_from and kwargs.get("teacher_name_or_path") is None:
        kwargs["teacher_name_or_path"] = finetuned_from
    for key in ("tags", "language"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = [kwargs[key]]
    return kwargs


def _config_and_parameters(source: Any, red_summary: dict | None) -> tuple[dict, int | None, str, dict | None]:
    """(config dict, student parameters, dtype, summary) of a folder, a model or a config dict."""
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        config = read_json(folder, "config.json") or {}
        summary = red_summary if red_summary is not None else read_summary(folder)
        return config, count_parameters(config) if config else None, config_dtype(config), summary
    if isinstance(source, dict):  # a student's config (the trainer's card before any export)
        return source, count_parameters(source), config_dtype(source), red_summary
    if red_summary is None:  # recorded on the model by merge_and_unload()
        red_summary = getattr(source.config, CONFIG_SUMMARY_KEY, None) or getattr(source, "red_summary", None)
    return source.config.to_dict(), source.num_parameters(), str(source.dtype).removeprefix("torch."), red_summary


def build_model_card(student_folder_or_model: Any, *, teacher_name_or_path: str | None = None,
                     red_summary: dict | None = None, erank: dict | None = None,
                     eval_results: list[EvalResult | dict] | None = None, datasets: list[str] | None = None,
                     erank_text: str | None = None, library_version: str | None = None,
                     model_name: str | None = None, tags: list[str] | None = None, license: str | None = None,
                     language: str | list[str] | None = None, speed: dict | None = None) -> ModelCard:
    """The model card of a merged student: a folder (its config.json, red_summary.json and erank.json are read),
    a merged `PreTrainedModel`, or the student's config as a dict. Explicit arguments override what the folder
    records; `tags` are added to the RED ones. `license` and `language` default to the teacher's card's (its
    folder's README.md, or the local Hub cache), the licence else to a `license` entry of the config. `speed`:
    `measure_generation_speed`'s result, shown against the teacher. No network.
    """
    from .constants import __version__

    source = student_folder_or_model
    config, student_params, dtype, red_summary = _config_and_parameters(source, red_summary)
    if isinstance(source, (str, os.PathLike)):
        model_name = model_name or Path(source).resolve().name
        erank = erank if erank is not None else read_json(Path(source), ERANK_NAME)
    red_summary = red_summary or {}
    adapter, loss = red_summary.get("adapter") or {}, red_summary.get("distillation") or {}
    teacher = teacher_name_or_path or adapter.get("teacher_name_or_path")
    d_s = config.get("hidden_size") or red_summary.get("student_hidden_size")
    d_t = red_summary.get("teacher_hidden_size") or adapter.get("teacher_hidden_size")
    teacher_params = count_parameters(config, d_t) if config and d_t else None
    both = student_params and teacher_params
    student_size = model_footprint(config, student_params, dtype) if config else {}
    teacher_size = model_footprint({**config, "hidden_size": d_t}, teacher_params, dtype) if config and d_t else {}
    calibration = {"source": adapter.get("calibration_source"), "num_texts": adapter.get("calibration_num_texts"),
                   "num_tokens": adapter.get("calibration_num_tokens")}
    red = {"paper": f"arXiv:{PAPER_ID}", "teacher": teacher, "teacher_hidden_size": d_t, "student_hidden_size": d_s,
           "width_ratio": round(d_s / d_t, 4) if d_s and d_t else None,
           "teacher_parameters": teacher_params, "student_parameters": student_params,
           "parameter_ratio": round(student_params / teacher_params, 4) if both else None,
           "compression_ratio": round(teacher_params / student_params, 3) if both else None,
           "weights_dtype": dtype, "teacher_weight_bytes": teacher_size.get("weight_bytes"),
           "student_weight_bytes": student_size.get("weight_bytes"),
           "kv_cache_bytes_per_token": {"teacher": teacher_size.get("kv_cache_bytes_per_token"),
                                        "student": student_size.get("kv_cache_bytes_per_token")},
           "generation_speed": speed,
           "init": adapter.get("init"), "norm_init": adapter.get("norm_init"),
           "share_projections": adapter.get("share_projections"),
           "calibration": calibration if any(v is not None for v in calibration.values()) else None,
           "distillation": {k: loss[k] for k in LOSS_SETTINGS if k in loss},
           "global_step": red_summary.get("global_step"), "tokens_trained": red_summary.get("tokens_trained"),
           "erank": _erank_summary(erank, erank_text or red_summary.get("erank_source")),
           "library": "transformers_red", "library_version": library_version or __version__}
    if not red_summary:
        red["recorded"] = False  # pushed with allow_plain_model: no RED summary says how this model was made
    inherited = teacher_card_metadata(teacher)
    if license:  # an explicit licence replaces the teacher's, with its name and link
        inherited = {k: v for k, v in inherited.items() if not k.startswith("license")} | {"license": license}
    inherited.setdefault("license", config.get("license"))
    if language:
        inherited["language"] = [language] if isinstance(language, str) else list(language)
    base = hub_base_model(teacher)  # a local path is no base_model
    data = ModelCardData(base_model=base, library_name="transformers", pipeline_tag="text-generation",
                         tags=[*TAGS, *(t for t in tags or [] if t not in TAGS)], datasets=datasets,
                         model_name=model_name, **{k: v for k, v in inherited.items() if v},
                         eval_results=[_eval_result(e) for e in eval_results] if eval_results else None,
                         **({"base_model_relation": "finetune"} if base else {}), red=red)
    arch = (config.get("architectures") or ["AutoModelForCausalLM"])[0]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{_card_body(model_name or 'red-student', red, arch, config)}")


def _number(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _bytes(n: int) -> str:
    return next(f"{n / 10 ** p:.1f} {unit}" for p, unit in ((9, "GB"), (6, "MB"), (3, "kB")) if n >= 10 ** p) \
        if n >= 1000 else f"{n} bytes"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _how_it_was_made(red: dict) -> str:
    """One paragraph of what the summary records; what it does not record is said, not printed as a value."""
    if red.get("recorded") is False:
        return ("Nothing recorded how this model was made (it was published without a RED summary), so the "
                "values below are read from its config alone.")
    parts = []
    if red["init"]:
        cal = red["calibration"] or {}
        used = ", ".join(x for x in (cal.get("num_texts") is not None and f"{cal['num_texts']} texts",
                                     cal.get("num_tokens") is not None and f"{cal['num_tokens']:,} tokens",
                                     cal.get("source") and f"source: {cal['source']}") if x)
        parts.append(f"Projection init `{red['init']}`" + (f" (calibration: {used})" if used else ""))
    loss = red["distillation"]
    names = {"ce_weight": "CE", "kd_weight": "KD", "temperature": "temperature", "beta": "beta",
             "clone_weight": "clone"}
    weights = ", ".join(f"{label} {loss[key]}" for key, label in names.items() if key in loss)
    if weights:
        parts.append(f"loss settings {weights}")
    if red["global_step"] is not None:
        tokens = f", {red['tokens_trained']:,} tokens" if red["tokens_trained"] is not None else ""
        parts.append(f"{red['global_step']} training steps{tokens}")
    else:
        parts.append("training steps and tokens were not recorded (merged with `merge_and_unload()`, not "
                     "exported by `RedDistillationTrainer`)")
    er = red["erank"]
    erank = "Effective rank: not measured." if not er else (
        f"Effective rank: student mean {er['student_mean']} (lowest {er['student_min']}, layer "
        f"{er['student_min_layer']}), teacher {er['teacher_mean']}, ratio {er['ratio']} at step {er['step']}"
        f"{' on ' + er['measured_on'] if er['measured_on'] else ''}; per layer in `{CARD_ERANK_NAME}`.")
    return "; ".join(parts) + f".\n\n{erank} All values are in the `red:` block of this card's metadata."


def _what_the_width_buys(red: dict, config: dict) -> str:
    """The teacher / student table (parameters, weight bytes, KV cache per token, measured speed) and why the KV
    cache does not shrink."""
    kv, speed, dtype = red["kv_cache_bytes_per_token"], red["generation_speed"], red["weights_dtype"]
    teacher_known = red["teacher_parameters"] is not None
    share = f" ({100 * red['parameter_ratio']:.1f}%)" if red["parameter_ratio"] else ""
    rows = [("parameters", red["teacher_parameters"], red["student_parameters"], _number, share),
            (f"weights ({dtype})", red["teacher_weight_bytes"], red["student_weight_bytes"], _bytes, ""),
            (f"KV cache per token ({dtype})", kv["teacher"], kv["student"], _bytes, "")]
    if speed:
        rate = speed["tokens_per_second"]
        rows.append(("generation, tokens/s (measured)", rate["teacher"], rate["student"], str,
                     f" ({speed['speedup']:.2f}x)"))
    head = "| | teacher | student |\n|---|---:|---:|" if teacher_known else "| | student |\n|---|---:|"
    lines = [head]
    for label, t, s, fmt, note in rows:
        student = "not recorded" if s is None else fmt(s) + note
        lines.append(f"| {label} | {'not recorded' if t is None else fmt(t)} | {student} |" if teacher_known
                     else f"| {label} | {student} |")
    layers, kv_heads, head_dim = attention_shape(config)
    shape = f"{layers} layers x {kv_heads} KV heads x head_dim {head_dim}"
    text = ["\n".join(lines), ""]
    if teacher_known:
        text.append(f"The KV cache per token is the teacher's: RED narrows only the residual stream (hidden_size "
                    f"{red['teacher_hidden_size']} -> {red['student_hidden_size']}); the attention keeps the "
                    f"teacher's {shape}, and K and V live in that width, so the memory a long context needs does "
                    "not shrink. The weights, and every matmul that reads or writes the residual stream, do.")
    else:
        text.append(f"KV cache per token: K and V of {shape}.")
    text.append("")
    if speed:
        threads = f", {_plural(speed['threads'], 'thread')}" if "threads" in speed else ""
        where = f"{speed['device']}, {speed['dtype']}{threads}"
        text.append(f"Speed: {speed['measured_with']}, batch {speed['batch_size']}, {speed['prompt_tokens']} prompt + "
                    f"{speed['new_tokens']} new tokens, median of {_plural(speed['repeats'], 'run')}, teacher and "
                    f"student on the same machine ({where}); other machines and runtimes give other numbers.")
    else:
        text.append("Generation speed was not measured (`push_compressed(..., measure_speed=True)` or "
                    "`transformers-red push ... --measure_speed` measures it against the teacher).")
    return "\n".join(text)


def _card_body(name: str, red: dict, arch: str, config: dict) -> str:
    width = f"{red['teacher_hidden_size']} -> {red['student_hidden_size']}" if red["teacher_hidden_size"] \
        else red["student_hidden_size"]
    share = f", {100 * red['parameter_ratio']:.1f}% of the teacher's parameters" if red["parameter_ratio"] else ""
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

## What the width buys

{_what_the_width_buys(red, config)}

## How it was made

{_how_it_was_made(red)}

## Evaluation

```bash
transformers-red eval {name} --tasks gsm8k
```

## Citation

```bibtex
{PAPER_CITATION}
```
"""
