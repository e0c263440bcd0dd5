"""The architecture registry: every registered model type trains, every residual-touching module is wrapped,
fused projections give the right clone rows, and unregistered types or differing targets are refused."""

import datasets
import pytest
import torch
from testing_utils import READS_RESIDUAL, RESIDUAL_NORMS, WRITES_RESIDUAL, make_teacher
from transformers import AutoConfig, AutoModelForCausalLM

from transformers_red import RedAdapterConfig, RedConfig, RedDistillationTrainer, get_red_model
from transformers_red.adapter.architectures import ARCHITECTURES, CLONE_TERMS, get_architecture, model_layout
from transformers_red.resources import builtin_texts


def test_every_residual_module_of_every_architecture_is_wrapped(arch, texts, tokenizer):
    """Structural check against the model itself: a Linear or norm of width d_T that the registry misses would
    receive (B, T, d_S) inputs with d_T weights, or leave a d_T output in the student."""
    red = get_red_model(make_teacher(*arch), RedAdapterConfig(width_ratio=0.5), texts, tokenizer,
                        show_progress_bar=False)
    wrapped = set(red.targeted_module_names)
    d_t = red.teacher_hidden_size
    for name, module in red.base_model.named_modules():
        if ".base_layer" in name or name in wrapped:
            continue
        if isinstance(module, torch.nn.Linear):
            assert d_t not in (module.in_features, module.out_features), f"{name} touches the residual, unwrapped"
        weight = getattr(module, "weight", None)
        if type(module).__name__.endswith("RMSNorm"):
            assert weight.shape[0] != d_t, f"residual norm {name} is unwrapped"
    shorts = {n.rsplit(".", 1)[-1] for n in wrapped}
    assert shorts - {"embed_tokens"} <= READS_RESIDUAL | WRITES_RESIDUAL | RESIDUAL_NORMS


def test_short_training_run_on_every_architecture(arch, tmp_path, tokenizer, input_ids):
    """A few steps with every clone term: all of them non-zero and finite, the merged student runs."""
    config = RedConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, max_length=32,
                       logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-3,
                       calibration_num_samples=4, disable_tqdm=True, erank_steps=0)
    trainer = RedDistillationTrainer(model=make_teacher(*arch), args=config, processing_class=tokenizer,
                                     train_dataset=datasets.Dataset.from_dict({"text": builtin_texts(16)}))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "clone_loss" in h]
    assert len(logged) == 2
    for term in CLONE_TERMS:
        values = [h[f"clone/{term}"] for h in logged]
        assert all(v > 0 and torch.isfinite(torch.tensor(v)) for v in values), (term, values)
    student = trainer.merged_student().eval()
    assert student.config.hidden_size == 32
    with torch.no_grad():
        assert torch.isfinite(student(input_ids).logits).all()


def test_phi3_clone_rows_follow_the_fused_layout():
    """q, k, v are the first, second and third row blocks of qkv_proj; gate and up the halves of gate_up_proj
    (the order Phi3Attention and Phi3MLP split them in)."""
    teacher = make_teacher("phi3", False, {})
    phi3, config = get_architecture("phi3"), teacher.config
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    assert phi3.clone_rows("q", config) == slice(0, q)
    assert phi3.clone_rows("k", config) == slice(q, q + kv)
    assert phi3.clone_rows("v", config) == slice(q + kv, q + 2 * kv)
    assert phi3.clone_rows("gate", config) == slice(0, config.intermediate_size)
    assert phi3.clone_rows("up", config) == slice(config.intermediate_size, 2 * config.intermediate_size)
    attention = teacher.model.layers[0].self_attn
    assert attention.qkv_proj.out_features == q + 2 * kv


def test_model_layout_uses_the_models_own_accessors():
    for model_type in ("llama", "gemma2", "phi3"):
        for tie in (True, False):
            layout = model_layout(make_teacher(model_type, tie, {}))
            assert (layout.embedding, layout.head, layout.final_norm) == ("model.embed_tokens", "lm_head",
                                                                         "model.norm")
            assert layout.layers == ("model.layers.0", "model.layers.1") and layout.tied is tie


def test_unregistered_model_type_is_refused_with_the_supported_list():
    config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    gpt2 = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="not supported.*llama.*phi3.*architectures.py"):
        get_red_model(gpt2, RedAdapterConfig(width_ratio=0.5, init="random", norm_init="ones"))
    assert set(ARCHITECTURES) >= {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3"}


def test_target_modules_that_differ_from_the_registry_are_refused():
    partial = {"input": ["q_proj", "k_proj", "v_proj"], "output": ["o_proj", "down_proj"],
               "norms": ["input_layernorm", "post_attention_layernorm"]}
    with pytest.raises(ValueError, match="differs from the 'llama' entry"):
        get_red_model(make_teacher("llama", False, {}),
                      RedAdapterConfig(width_ratio=0.5, init="random", norm_init="ones", target_modules=partial))
    same = {k: list(reversed(v)) for k, v in get_architecture("llama").target_modules().items()}
    red = get_red_model(make_teacher("llama", False, {}),
                        RedAdapterConfig(width_ratio=0.5, init="random", norm_init="ones", target_modules=same))
    assert red.red_config.target_modules == get_architecture("llama").target_modules()


def test_merge_checks_itself_against_the_wrapped_student(monkeypatch, texts, tokenizer):
    """A wrong merge hook (here: Gemma's embedding scale not folded) raises instead of returning a wrong model."""
    from transformers_red.adapter import merge

    red = get_red_model(make_teacher("gemma2", True, {}), RedAdapterConfig(width_ratio=0.5), texts, tokenizer,
                        show_progress_bar=False)
    red.merge_and_unload()  # the real hook: passes its own check
    monkeypatch.setattr(merge, "_fold_embedding_scale", lambda state, red_model: None)
    with pytest.raises(RuntimeError, match="differs from the wrapped student"):
        red.merge_and_unload()


def test_channel_indices_must_fit_the_width(texts, tokenizer):
    teacher = make_teacher("llama", False, {})
    for channels, match in (([0, 1, 2], "must be 32 distinct channels.*got 3 values"),
                            (list(range(31)) + [0], "with repeats"), (list(range(1, 33)) + [], None)):
        config = RedAdapterConfig(width_ratio=0.5, channel_indices=channels)
        if match is None:
            channels[-1] = 64
            config = RedAdapterConfig(width_ratio=0.5, channel_indices=channels)
            match = r"in \[1, 64\]"
        with pytest.raises(ValueError, match=match):
            get_red_model(teacher, config)


def test_wrapping_the_same_teacher_twice_says_what_happened(texts, tokenizer):
    teacher = make_teacher("llama", False, {})
    get_red_model(teacher, RedAdapterConfig(width_ratio=0.5), texts, tokenizer, show_progress_bar=False)
    with pytest.raises(ValueError, match="already wrapped by a RedModel.*in place"):
        get_red_model(teacher, RedAdapterConfig(width_ratio=0.25), texts, tokenizer, show_progress_bar=False)
