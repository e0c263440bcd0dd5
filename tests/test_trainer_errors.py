"""Bad input to RedConfig / RedDistillationTrainer: clear errors, before the teacher is loaded or run."""

import datasets
import pytest
import torch
from transformers import TrainerCallback

from transformers_red import RedConfig, RedDistillationTrainer, RedModel
from transformers_red.resources import builtin_texts, tiny_teacher


def args(tmp_path, **kwargs):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, max_length=32,
                report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, calibration_num_samples=4)
    return RedConfig(**{**base, **kwargs})


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0.0}, "temperature must be a finite number > 0"),
    ({"temperature": -1.0}, "temperature must be a finite number > 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number > 0"),
    ({"beta": 1.5}, "beta must be in"),
    ({"kd_weight": -0.1}, "kd_weight must be a finite number >= 0"),
    ({"kd_weight": float("inf")}, "kd_weight must be a finite number >= 0"),
    ({"ce_weight": float("nan")}, "ce_weight must be a finite number >= 0"),
    ({"max_length": 0}, "max_length must be a positive number"),
    ({"red_adapter_config": "not json"}, "red_adapter_config must be a dict"),
    ({"red_adapter_config": {"width_ratio": 0.5, "init": "random", "init_std": float("nan")}},
     "init_std must be a finite number"),
    ({"ce_weight": 0.0, "kd_weight": 0.0, "clone_weight": 0.0}, "every loss weight is zero"),
    ({"clone_terms": ["q", "z"]}, "unknown clone_terms"),
    ({"clone_output_space": "middle"}, "clone_output_space"),
    ({"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": True}},
     "use_reentrant=True gives the clone term wrong gradients"),
    ({"clone_normalization": "layer"}, "clone_normalization must be one of"),
    ({"train": "both"}, "train must be one of"),
    ({"logit_loss_from": "both"}, r"logit_loss_from must be one of \['auto', 'logits', 'hidden_states'\]"),
    ({"form_student_weights": "never"}, "form_student_weights must be one of"),
    ({"width_ratio": 1.5}, "strictly between 0 and 1"),
    ({"target_hidden_size": 12.5}, "positive integer"),
    ({"init": "xavier"}, "not supported"),
])
def test_config_validation(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        args(tmp_path, **kwargs)


def test_clone_terms_from_cli_string(tmp_path):
    assert args(tmp_path, clone_terms="q,k attn").clone_terms == ["q", "k", "attn"]


@pytest.mark.parametrize("dataset, match", [
    (datasets.Dataset.from_dict({"body": ["some text"] * 4}), "no 'text' column"),
    (datasets.Dataset.from_dict({"text": []}), "empty"),
    (None, "required"),
])
def test_bad_datasets_fail_before_the_teacher_loads(tmp_path, tokenizer, dataset, match):
    with pytest.raises(ValueError, match=match):
        RedDistillationTrainer(model="no/such-teacher", args=args(tmp_path), train_dataset=dataset,
                               processing_class=tokenizer)


def test_teacher_that_cannot_be_loaded_offline(tmp_path, tokenizer):
    ds = datasets.Dataset.from_dict({"text": builtin_texts(4)})
    with pytest.raises(ValueError, match="Cannot load 'HuggingFaceTB/SmolLM2-135M'"):
        RedDistillationTrainer(model="HuggingFaceTB/SmolLM2-135M", args=args(tmp_path), train_dataset=ds,
                               processing_class=tokenizer)
    with pytest.raises(ValueError, match="Give the teacher"):
        RedDistillationTrainer(args=args(tmp_path), train_dataset=ds, processing_class=tokenizer)


def test_vocabulary_mismatch(tmp_path, tokenizer):
    ds = datasets.Dataset.from_dict({"text": builtin_texts(8)})
    with pytest.raises(ValueError, match="vocab_size 256 but the teacher has 300"):
        RedDistillationTrainer(model=tiny_teacher("llama"), teacher_model=tiny_teacher("llama", vocab_size=300),
                               args=args(tmp_path), train_dataset=ds, processing_class=tokenizer)


class PoisonAt(TrainerCallback):
    """Puts a NaN into one projection after `step`, as a diverging run would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(iter(model.red_projections.values()))[0, 0] = float("nan")


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tokenizer):
    ds = datasets.Dataset.from_dict({"text": builtin_texts(32)})
    trainer = RedDistillationTrainer(model=tiny_teacher("llama"), train_dataset=ds, processing_class=tokenizer,
                                     args=args(tmp_path, max_steps=6, save_strategy="steps", save_steps=2))
    trainer.add_callback(PoisonAt(3))
    with pytest.raises(FloatingPointError, match=r"at step 4.*last good checkpoint is .*checkpoint-2"):
        trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    restored = RedModel.from_pretrained(tiny_teacher("llama"), checkpoint)
    assert all(torch.isfinite(p).all() for p in restored.trainable_parameters())
    assert not (tmp_path / "out" / "checkpoint-4").exists()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, tokenizer):
    ds = datasets.Dataset.from_dict({"text": builtin_texts(8)})
    trainer = RedDistillationTrainer(model=tiny_teacher("llama"), args=args(tmp_path), train_dataset=ds,
                                     processing_class=tokenizer)
    with pytest.raises(ValueError, match="No complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)


def test_ddp_does_not_search_for_unused_parameters_by_default(tmp_path):
    assert args(tmp_path).ddp_find_unused_parameters is False
    assert args(tmp_path, ddp_find_unused_parameters=True).ddp_find_unused_parameters is True
