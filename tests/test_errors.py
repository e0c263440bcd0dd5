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
    supported = "llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3"
    with pytest.raises(ValueError, match=f"gpt2.*supported: {supported}.*architectures.py"):
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


# ------------------------------------------------------------------------- early, named input errors
def test_tokenizer_longer_than_the_vocabulary_is_refused_before_calibration(texts):
    from transformers_red.resources import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_tokens(["the"])
    with pytest.raises(ValueError, match="tokenizer has 257 tokens but the model's vocabulary has 256"):
        get_red_model(make_teacher("llama", False, {}), RedAdapterConfig(width_ratio=0.5), texts, tok)
    with pytest.raises(ValueError, match=r"token ids outside \[0, 256\) \(largest 300\)"):
        get_red_model(make_teacher("llama", False, {}), RedAdapterConfig(width_ratio=0.5),
                      [{"input_ids": torch.full((2, 8), 300)}])


@pytest.mark.parametrize("data, error, match", [
    ("generator", None, None),  # a generator of strings is read like a list
    ({"a", "b"}, TypeError, "set, which has no order"),
    ([None, "a text"], TypeError, "Item 0 of the texts is None"),
    (["a text", 3], TypeError, r"Item 1 of the texts is 3 \(int\)"),
    ([{"input_ids": torch.ones(2, 2, 4, dtype=torch.long)}], ValueError, r"must be \(B, T\)"),
    ([{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 3)}], ValueError,
     "the same shape"),
    ([{"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.full((1, 4), 2)}], ValueError,
     "only 0 and 1"),
])
def test_calibration_input_errors_say_what_was_received(texts, tokenizer, data, error, match):
    if data == "generator":
        data = (t for t in texts)
    teacher = make_teacher("llama", False, {})
    if error is None:
        assert get_red_model(teacher, RedAdapterConfig(width_ratio=0.5), data, tokenizer,
                             show_progress_bar=False).channel_indices is not None
        return
    with pytest.raises(error, match=match):
        get_red_model(teacher, RedAdapterConfig(width_ratio=0.5), data, tokenizer, show_progress_bar=False)


def test_a_dataset_row_without_text_is_named():
    import datasets

    from transformers_red.data import select_texts

    with pytest.raises(TypeError, match="Row 1 of the 'text' column is None"):
        select_texts(datasets.Dataset.from_dict({"text": ["a", None, "b"]}), None)


def test_library_errors_name_python_arguments_and_the_cli_names_its_flags(tmp_path, capsys):
    """A Python caller is told about the argument it passed, a command-line user about the flag."""
    from transformers_red.commands import main
    from transformers_red.demo.run import run_demo
    from transformers_red.evaluation.erank import load_texts

    missing = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"run_demo\(teacher_dir=.*nothing'\): not a folder") as err:
        run_demo(teacher_dir=missing, output_dir=str(tmp_path / "out"))
    assert "--" not in str(err.value) and not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="Text source .* is neither a file") as err:
        load_texts(missing)
    assert "--" not in str(err.value)
    with pytest.raises(SystemExit):
        main(["demo", "--teacher", missing])
    assert f"error: --teacher {missing} is not a folder" in capsys.readouterr().err
