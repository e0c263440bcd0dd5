"""Bad input: a clear error that says what is wrong and how to fix it, before any forward pass."""

import pytest
import torch
from testing_utils import make_teacher
from transformers import GPT2Config, GPT2LMHeadModel

from transformers_red import RedAdapterConfig, get_red_model


@pytest.fixture
def teacher():
    """A teacher whose forward fails loudly: any error below must come before the model runs."""
    model = make_teacher("llama", True, {})

    def no_forward(*_):
        raise AssertionError("the teacher ran before the bad input was reported")

    model.model.register_forward_pre_hook(no_forward)
    return model


@pytest.mark.parametrize("kwargs, match", [
    ({"target_hidden_size": 64}, "between 1 and 63"),
    ({"target_hidden_size": 100}, "between 1 and 63"),
    ({"target_hidden_size": 0}, "positive integer"),
    ({"target_hidden_size": -3}, "positive integer"),
    ({"target_hidden_size": 31.5}, "positive integer"),
    ({"target_hidden_size": True}, "positive integer"),
    ({"width_ratio": 1.0}, "strictly between 0 and 1"),
    ({"width_ratio": 0.0}, "strictly between 0 and 1"),
    ({"width_ratio": 0.001}, "between 1 and 63"),
    ({}, "exactly one"),
    ({"width_ratio": 0.5, "target_hidden_size": 32}, "exactly one"),
    ({"width_ratio": 0.5, "init": "xavier"}, "not supported"),
    ({"width_ratio": 0.5, "norm_init": "zeros"}, "not supported"),
])
def test_bad_width_and_init(teacher, texts, tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_red_model(teacher, RedAdapterConfig(**kwargs), texts, tokenizer)


def test_unsupported_model_type_names_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="gpt2.*supported: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3.*architectures.py"):
        get_red_model(gpt2, RedAdapterConfig(width_ratio=0.5), ["text"])


@pytest.mark.parametrize("data, match", [
    ([], "empty"),
    (["", "   "], "empty or whitespace"),
    ("a single string", "not a single string"),
    ([{"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.zeros(2, 5)}], "no non-padding"),
    ([{"tokens": [1, 2]}], "input_ids"),
])
def test_bad_calibration_data(teacher, tokenizer, data, match):
    with pytest.raises((ValueError, TypeError), match=match):
        get_red_model(teacher, RedAdapterConfig(width_ratio=0.5), data, tokenizer)


def test_activation_init_needs_calibration_data(teacher):
    with pytest.raises(ValueError, match="pass calibration_data"):
        get_red_model(teacher, RedAdapterConfig(width_ratio=0.5))
    with pytest.raises(ValueError, match="pass calibration_data"):
        get_red_model(teacher, RedAdapterConfig(width_ratio=0.5, init="random", norm_init="teacher"))


def test_texts_need_a_tokenizer(teacher, texts):
    with pytest.raises(ValueError, match="need a tokenizer"):
        get_red_model(teacher, RedAdapterConfig(width_ratio=0.5), texts)


def test_wrapping_twice_is_refused(texts, tokenizer):
    red = get_red_model(make_teacher("llama", True, {}), RedAdapterConfig(width_ratio=0.5), texts, tokenizer,
                        show_progress_bar=False)
    with pytest.raises(ValueError, match="already a RedModel"):
        get_red_model(red, RedAdapterConfig(width_ratio=0.5), texts, tokenizer)
