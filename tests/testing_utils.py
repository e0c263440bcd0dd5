"""Helpers shared by the tests (import with `from testing_utils import ...`).

The architecture list comes from the library's registry, so a new registry entry is tested everywhere; what
each architecture looks like (which tensors to slice, Gemma's embedding scale and (1 + w) norms, Phi-3's fused
projections) is written here independently of the library, so the equivalence tests check the library against
a second implementation.
"""

from __future__ import annotations

import math

import torch

from transformers_red.adapter.architectures import SUPPORTED_MODEL_TYPES
from transformers_red.resources import tiny_teacher

# (model_type, tie_word_embeddings, config overrides): every registered architecture, tied and untied.
ARCHITECTURES = [(t, tie, {}) for t in SUPPORTED_MODEL_TYPES for tie in (True, False)]
ARCHITECTURES.append(("llama", False, {"attention_bias": True, "mlp_bias": True}))  # output-side biases too
ARCH_IDS = [f"{t}-{'tied' if tie else 'untied'}{'-bias' if kw else ''}" for t, tie, kw in ARCHITECTURES]

# Written from the models' code, not from the registry.
READS_RESIDUAL = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj", "lm_head"}
WRITES_RESIDUAL = {"o_proj", "down_proj"}
RESIDUAL_NORMS = {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm", "norm"}  # q_norm / k_norm act on head_dim
LINEARS_PER_LAYER = {"phi3": 4}  # fused qkv_proj and gate_up_proj; others 7
SHARED_LINEARS_PER_LAYER = 4  # qkv, gate_up, o, down
NORMS_PER_LAYER = {"gemma2": 4, "gemma3_text": 4}  # others 2
GEMMA_LIKE = {"gemma2", "gemma3_text"}  # embeddings x sqrt(hidden_size), norms x (1 + w)


def make_teacher(model_type: str, tie: bool, overrides: dict, seed: int = 0):
    """A tiny teacher whose biases are random too (HF initialises them to zero), so they are exercised."""
    model = tiny_teacher(model_type, tie_word_embeddings=tie, seed=seed, **overrides).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def hard_pruned_teacher(teacher, channels):
    """The teacher with residual channels `channels` kept, built by slicing its tensors.

    For Gemma the pruned model (width d_S) scales its embeddings by sqrt(d_S), the teacher by sqrt(d_T): the
    embedding rows are multiplied by c = sqrt(d_T / d_S), and with tied embeddings the final norm's multiplier
    (1 + w) is divided by c so the logits stay the teacher's.
    """
    config = teacher.config.to_dict()
    d_t, d_s = teacher.config.hidden_size, len(channels)
    config["head_dim"] = getattr(teacher.config, "head_dim", None) or d_t // teacher.config.num_attention_heads
    config["hidden_size"] = d_s
    pruned = type(teacher)(type(teacher.config).from_dict(config)).eval()
    gemma, tied = teacher.config.model_type in GEMMA_LIKE, teacher.config.tie_word_embeddings
    c = math.sqrt(d_t / d_s) if gemma else 1.0
    g = torch.as_tensor(channels)
    state = {}
    for name, value in teacher.state_dict().items():
        short = name.split(".")[-2]
        if short in READS_RESIDUAL and name.endswith("weight"):
            value = value[:, g]
        elif short in WRITES_RESIDUAL:
            value = value[g]
        elif short == "embed_tokens":
            value = value[:, g] * c
        elif short in RESIDUAL_NORMS:
            value = value[g]
            if gemma and tied and name == "model.norm.weight":
                value = (1 + value) / c - 1
        state[name] = value
    if tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return pruned


def make_red_trainer(output_dir, dataset, tokenizer, teacher, **kwargs):
    """A RedDistillationTrainer with small, fast CPU settings (`kwargs` override them)."""
    from transformers_red import RedConfig, RedDistillationTrainer

    defaults = dict(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=4, max_length=48,
                    logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, learning_rate=1e-2,
                    calibration_num_samples=8, disable_tqdm=True)
    return RedDistillationTrainer(model=teacher, args=RedConfig(**{**defaults, **kwargs}), train_dataset=dataset,
                                  processing_class=tokenizer)


# --------------------------------------------------------------------- one sharded step (tests/*_worker.py)
# The global batch of the sharding workers: 4 rows of 24 byte tokens, split over the ranks.
SHARDING_BATCH = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))


def sharding_adapter_config(share: bool):
    """The adapter the sharding workers build (random init, so every projection entry carries a gradient)."""
    from transformers_red import RedAdapterConfig

    return RedAdapterConfig(width_ratio=0.5, init="random", norm_init="ones", seed=3, share_projections=share)


def distillation_loss(model, red, ids):
    """Student CE + KL to the teacher pass of the same weights, both through `model` (the engine's wrapper or the
    RedModel itself): a mean over the rows `ids` (B, T), so the ranks' averaged gradients are the global ones."""
    import torch.nn.functional as F

    with torch.no_grad(), red.disable_adapter():
        teacher_logits = model(input_ids=ids).logits.float()
    logits = model(input_ids=ids).logits.float()
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), log_target=True,
                  reduction="batchmean")
    return ce + kl


def trainable_gradients(red, full=lambda p: p.grad) -> dict:
    """Adapter key -> the gradient of each projection and norm gain, as `full(parameter)` gives it whole."""
    return {f"{kind}.{key}": full(p) for kind, store in (("projections", red.red_projections),
                                                         ("norms", red.red_norms)) for key, p in store.items()}


def end_worker_process() -> None:
    """End a torchrun worker once its result is written: wait for every rank, destroy the process groups, then leave
    without interpreter finalisation. Gloo's C++ worker threads can still hold work objects at exit, and tearing the
    interpreter down under them aborts the process now and then ("terminate called without an active exception",
    SIGABRT on one rank after a successful run), which the launcher reports as a failed run."""
    import os
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing its result
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
