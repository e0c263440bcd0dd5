"""The RED adapter on every supported architecture: step-0 identity, exact merge, teacher pass, save/load."""

import pytest
import torch
from testing_utils import (
    LINEARS_PER_LAYER,
    NORMS_PER_LAYER,
    SHARED_LINEARS_PER_LAYER,
    hard_pruned_teacher,
    make_teacher,
)
from transformers import AutoModelForCausalLM

from transformers_red import RedAdapterConfig, RedModel, get_red_model, projection_spectra


def calibrated(teacher, texts, tokenizer, **kwargs):
    kwargs.setdefault("width_ratio", 0.5)
    return get_red_model(teacher, RedAdapterConfig(**kwargs), calibration_data=texts, tokenizer=tokenizer,
                         show_progress_bar=False)


def perturb(red: RedModel, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in red.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def test_step0_student_equals_hard_pruned_teacher(arch, texts, tokenizer, input_ids):
    red = calibrated(make_teacher(*arch), texts, tokenizer)
    pruned = hard_pruned_teacher(make_teacher(*arch), red.channel_indices.tolist())
    with torch.no_grad():
        diff = (red(input_ids).logits - pruned(input_ids).logits).abs().max().item()
    assert diff <= 1e-5, f"step-0 student differs from the hard-pruned teacher by {diff}"


def test_merge_equals_wrapped_student_and_reloads(arch, texts, tokenizer, input_ids, tmp_path):
    model_type, tie, _ = arch
    red = calibrated(make_teacher(*arch), texts, tokenizer)
    perturb(red)
    merged = red.merge_and_unload().eval()
    assert type(merged) is type(red.base_model)
    assert merged.config.hidden_size == red.student_hidden_size == 32
    assert merged.config.head_dim == 16
    assert merged.config.num_attention_heads == 4 and merged.config.num_key_value_heads == 2
    assert merged.config.intermediate_size == red.base_model.config.intermediate_size
    assert merged.config.tie_word_embeddings == tie
    with torch.no_grad():
        wrapped_logits = red(input_ids).logits
        merged_logits = merged(input_ids).logits
    assert (wrapped_logits - merged_logits).abs().max().item() <= 1e-4
    merged.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    # Same attention kernel as the teacher (tiny teachers use "eager"; the default would pick sdpa).
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation=merged.config._attn_implementation).eval()
    assert type(reloaded) is type(merged)
    merged_state = merged.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, merged_state[key]), key
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, merged_logits)
    out = reloaded.generate(input_ids[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, input_ids.shape[1] + 4)


def test_disable_adapter_is_exact_teacher_and_keeps_student(arch, texts, tokenizer, input_ids):
    with torch.no_grad():
        teacher_logits = make_teacher(*arch)(input_ids).logits
    red = calibrated(make_teacher(*arch), texts, tokenizer)
    perturb(red)
    with torch.no_grad():
        before = red(input_ids).logits
        with red.disable_adapter():
            assert torch.equal(red(input_ids).logits, teacher_logits)
        assert torch.equal(red(input_ids).logits, before)
    assert before.shape == teacher_logits.shape


def test_adapter_save_load_round_trip(arch, texts, tokenizer, input_ids, tmp_path):
    red = calibrated(make_teacher(*arch), texts, tokenizer)
    perturb(red)
    red.save_pretrained(tmp_path)
    loaded = RedModel.from_pretrained(make_teacher(*arch), tmp_path)
    assert loaded.channel_indices.tolist() == red.channel_indices.tolist()
    # as PEFT: frozen and in eval mode unless is_trainable=True
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    trainable = RedModel.from_pretrained(make_teacher(*arch), tmp_path, is_trainable=True)
    assert trainable.training and all(p.requires_grad for p in trainable.trainable_parameters())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, red(input_ids).logits)
    model_type, tie, overrides = arch
    other = make_teacher(model_type, tie, {**overrides, "intermediate_size": 80})
    with pytest.raises(ValueError, match="another teacher"):
        RedModel.from_pretrained(other, tmp_path)
    with pytest.raises(ValueError, match="teacher with other weights"):  # same config, other weights
        RedModel.from_pretrained(make_teacher(model_type, tie, overrides, seed=5), tmp_path)


@pytest.mark.parametrize("share", [False, True])
def test_only_projections_and_norms_train(arch, texts, tokenizer, share):
    model_type, tie, _ = arch
    red = calibrated(make_teacher(*arch), texts, tokenizer, share_projections=share)
    d_t, d_s, layers = 64, 32, 2
    linears, norms = LINEARS_PER_LAYER.get(model_type, 7), NORMS_PER_LAYER.get(model_type, 2)
    per_layer = SHARED_LINEARS_PER_LAYER if share else linears
    expected = layers * per_layer * d_t * d_s + (1 if tie else 2) * d_t * d_s + (norms * layers + 1) * d_s
    trainable = {n for n, p in red.named_parameters() if p.requires_grad}
    assert all(n.endswith(".red_weight") for n in trainable)
    assert red.get_nb_trainable_parameters()[0] == expected
    assert len(red.targeted_module_names) == 1 + 1 + layers * (linears + norms) + 1  # embed, head, layers, final


def test_shared_projections_are_one_tensor(texts, tokenizer):
    red = calibrated(make_teacher("llama", False, {}), texts, tokenizer, share_projections=True)
    q, k = red.projection("model.layers.0.self_attn.q_proj"), red.projection("model.layers.0.self_attn.k_proj")
    assert q is k
    assert red.projection("model.layers.0.mlp.gate_proj") is red.projection("model.layers.0.mlp.up_proj")
    assert red.projection("model.layers.0.self_attn.o_proj") is not q


def test_tied_embeddings_share_one_projection(texts, tokenizer):
    red = calibrated(make_teacher("llama", True, {}), texts, tokenizer)
    assert red.projection("lm_head") is red.projection("model.embed_tokens")
    red = calibrated(make_teacher("llama", False, {}), texts, tokenizer)
    assert red.projection("lm_head") is not red.projection("model.embed_tokens")


def test_spectra_selection_vs_random(texts, tokenizer):
    red = calibrated(make_teacher("llama", False, {}), texts, tokenizer)
    for key, spec in projection_spectra(red).items():
        torch.testing.assert_close(torch.tensor(spec["singular_values"], dtype=torch.float64),
                                   torch.ones(32, dtype=torch.float64), rtol=0, atol=1e-12)
        assert abs(spec["erank"] - 32) < 1e-9
    rand = get_red_model(make_teacher("llama", False, {}), RedAdapterConfig(width_ratio=0.5, init="random"))
    ratios = [s["max"] / s["min"] for s in projection_spectra(rand).values()]
    print(f"random init singular value max/min: {min(ratios):.2f} .. {max(ratios):.2f}")
    assert min(ratios) > 2.0
    orth = get_red_model(make_teacher("llama", False, {}), RedAdapterConfig(width_ratio=0.5, init="orthogonal"))
    for spec in projection_spectra(orth).values():
        assert abs(spec["max"] - 1) < 1e-5 and abs(spec["min"] - 1) < 1e-5


@pytest.mark.parametrize("init", ["random", "orthogonal"])
def test_random_inits_are_seeded(init, input_ids):
    def build(seed):
        cfg = RedAdapterConfig(width_ratio=0.5, init=init, seed=seed)
        return get_red_model(make_teacher("qwen2", False, {}), cfg)

    a, b, c = build(0), build(0), build(1)
    for key in a.red_projections:
        assert torch.equal(a.red_projections[key], b.red_projections[key])
        assert not torch.equal(a.red_projections[key], c.red_projections[key])
    assert not torch.equal(a.red_projections["model_layers_0_self_attn_q_proj"],
                           a.red_projections["model_layers_0_self_attn_k_proj"])
    assert all(torch.equal(g, torch.ones_like(g)) for g in a.red_norms.values())  # LRC's norm init


def test_capture_activations_in_both_passes(texts, tokenizer, input_ids):
    red = calibrated(make_teacher("llama", False, {}), texts, tokenizer)
    with torch.no_grad(), red.capture_activations() as student_acts:
        red(input_ids)
    with torch.no_grad(), red.disable_adapter(), red.capture_activations() as teacher_acts:
        red(input_ids)
    q = "model.layers.1.self_attn.q_proj"
    o = "model.layers.1.self_attn.o_proj"
    assert student_acts[q].shape == teacher_acts[q].shape == (2, 12, 64)
    assert student_acts[o].shape == (2, 12, 32) and teacher_acts[o].shape == (2, 12, 64)
    assert {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
            "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"} <= set(student_acts)


def test_unload_restores_teacher(texts, tokenizer, input_ids):
    teacher = make_teacher("mistral", False, {})
    with torch.no_grad():
        before = teacher(input_ids).logits
    red = calibrated(teacher, texts, tokenizer)
    restored = red.unload()
    assert restored is teacher
    assert not any("base_layer" in n for n, _ in restored.named_parameters())
    with torch.no_grad():
        assert torch.equal(restored(input_ids).logits, before)


def test_teacher_methods_that_would_be_wrong_are_refused_and_the_rest_fall_through(texts, tokenizer, input_ids):
    red = calibrated(make_teacher("llama", False, {}), texts, tokenizer)
    for name, hint in (("resize_token_embeddings", "resize the teacher before get_red_model"),
                       ("load_adapter", "RedModel.from_pretrained"), ("add_adapter", "merge_and_unload"),
                       ("merge_adapter", "merge_and_unload"), ("disable_adapters", "disable_adapter()")):
        with pytest.raises(AttributeError, match=hint):
            getattr(red, name)
    # these reach the teacher, whose forward is the student's: right on a RedModel
    assert red.config is red.base_model.config and red.device == red.base_model.device
    assert red.dtype == torch.float32 and red.get_base_model() is red.base_model
    out = red.generate(input_ids[:1], max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        merged = red.merge_and_unload().generate(input_ids[:1], max_new_tokens=3, do_sample=False)
    assert torch.equal(out, merged)  # generate on the RedModel is the student's generate
    red.gradient_checkpointing_enable()
    assert red.base_model.is_activation_checkpointing
    text = repr(red)
    assert "d_T=64 -> d_S=32, init=activation" in text and "side=input, 64 -> 32" in text


def test_saving_the_wrapped_teacher_itself_is_refused_until_unload(texts, tokenizer, tmp_path):
    """`red.base_model.save_pretrained` would write wrapper keys that reload as a fresh teacher, silently."""
    teacher = make_teacher("llama", False, {})
    reference = {k: v.clone() for k, v in teacher.state_dict().items()}
    red = calibrated(teacher, texts, tokenizer)
    for method, call in (("save_pretrained", "red.save_pretrained"), ("push_to_hub", "red.push_to_hub")):
        with pytest.raises(RuntimeError, match=rf"wrapper keys.*{call}\(\.\.\.\).*merge_and_unload\(\)\.{method}"):
            getattr(red.get_base_model(), method)(str(tmp_path / "teacher"))
    assert not (tmp_path / "teacher").exists()
    red.save_pretrained(tmp_path / "adapter")  # RedModel's own save is untouched
    plain = red.unload()
    plain.save_pretrained(tmp_path / "teacher")  # and the unloaded teacher saves and reloads as itself
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in reference.items())


def test_merged_config_drops_a_teachers_quantisation_recipe(texts, tokenizer, tmp_path):
    teacher = make_teacher("llama", False, {})
    teacher.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF-loaded teacher carries
    merged = calibrated(teacher, texts, tokenizer).merge_and_unload()
    assert not hasattr(merged.config, "quantization_config")
    merged.save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    assert "quantization_config" not in saved and '"LlamaForCausalLM"' in saved
