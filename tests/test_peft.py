"""PEFT on a RED student: the merged student is a plain transformers model, so LoRA fine-tuning it afterwards is
PEFT's ordinary path (why peft is an optional extra, not a dependency: docs/api.md)."""

import pytest
import torch
from testing_utils import make_teacher

from transformers_red import RedAdapterConfig, get_red_model

peft = pytest.importorskip("peft")  # in the `test` extra, so CI always runs this


def test_lora_on_the_merged_student(texts, tokenizer, input_ids, tmp_path):
    red = get_red_model(make_teacher("qwen2", False, {}), RedAdapterConfig(width_ratio=0.5), texts, tokenizer,
                        show_progress_bar=False)
    student = red.merge_and_unload()
    with torch.no_grad():
        before = student(input_ids).logits
    lora = peft.get_peft_model(student, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, total = lora.get_nb_trainable_parameters()
    assert 0 < trainable < total
    with torch.no_grad():
        assert torch.equal(lora(input_ids).logits, before)  # LoRA's B starts at zero
    lora.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
