"""Tiny random-initialised causal LMs of every supported architecture, with a byte-level tokenizer: the fast
fixtures of the tests, the embedded default of the command line, and a tiny trained teacher."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from ..adapter.architectures import SUPPORTED_MODEL_TYPES, get_architecture
from .texts import builtin_texts

TINY_MODEL_TYPES = SUPPORTED_MODEL_TYPES  # a tiny teacher for every registered architecture

# Byte tokenizer special ids: ASCII control characters that never occur in normal
# text, so skipping special tokens when decoding cannot eat real characters.
BYTE_PAD_ID = 0  # NUL
BYTE_BOS_ID = 2  # STX (start of text)
BYTE_EOS_ID = 3  # ETX (end of text)


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
