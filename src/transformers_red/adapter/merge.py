"""Step 4 of the pipeline: merge. Fold the projections into an ordinary, smaller checkpoint.

The result is a model of the teacher's own class (e.g. `LlamaForCausalLM`) with `hidden_size = d_S` and an
explicit `head_dim`; everything else of the config is the teacher's. It saves and reloads with
`AutoModelForCausalLM.from_pretrained` and no custom code.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from tqdm.auto import tqdm


def student_config(teacher_config: Any, hidden_size: int) -> Any:
    """The teacher's config with the residual width set to `hidden_size` and `head_dim` made explicit."""
    config = copy.deepcopy(teacher_config)
    head_dim = getattr(teacher_config, "head_dim", None) or (
        teacher_config.hidden_size // teacher_config.num_attention_heads)
    config.hidden_size = hidden_size
    config.head_dim = head_dim
    return config


@torch.no_grad()
def merged_state_dict(red_model: Any, progressbar: bool = False) -> dict[str, torch.Tensor]:
    """State dict of the plain student: merged wrappers plus the teacher's untouched tensors (copied)."""
    wrapped = dict(red_model.red_layers())
    state: dict[str, torch.Tensor] = {}
    for name, layer in tqdm(wrapped.items(), desc="Merging", disable=not progressbar):
        state.update({f"{name}.{k}": v.detach().clone() for k, v in layer.merged_state().items()})
    for key, value in red_model.base_model.state_dict().items():
        if ".base_layer." not in f".{key}":  # tensors of unwrapped modules (e.g. Qwen3 q_norm/k_norm)
            state[key] = value.detach().clone()
    _fold_embedding_scale(state, red_model)
    return state


def _fold_embedding_scale(state: dict[str, torch.Tensor], red_model: Any) -> None:
    """Keep the student's embedding scale at the teacher's when the model derives it from hidden_size.

    Gemma multiplies its embedding output by sqrt(hidden_size): sqrt(d_T) in the wrapped student (the teacher's
    config), sqrt(d_S) in the merged model. The ratio c = sqrt(d_T / d_S) goes into the embedding rows; with a
    tied head, which would then produce c-times logits, the final norm's multiplier is divided by c instead.
    """
    architecture, layout = red_model.architecture, red_model.layout
    c = architecture.embedding_scale(red_model.teacher_hidden_size) / architecture.embedding_scale(
        red_model.student_hidden_size)
    if c == 1.0:
        return
    embedding = f"{layout.embedding}.weight"
    state[embedding] = state[embedding] * c
    if layout.tied:
        state.pop(f"{layout.head}.weight", None)  # the tied head is the scaled embedding
        norm, offset = f"{layout.final_norm}.weight", architecture.norm_offset
        state[norm] = (state[norm] + offset) / c - offset


def build_merged_model(red_model: Any, progressbar: bool = False) -> Any:
    """A new `type(teacher)` of width d_S holding the merged weights, on the teacher's device and dtype."""
    teacher = red_model.base_model
    weight = next(teacher.parameters())
    config = student_config(teacher.config, red_model.student_hidden_size)
    state = merged_state_dict(red_model, progressbar=progressbar)
    with torch.device(weight.device):
        student = type(teacher)._from_config(config, dtype=weight.dtype,
                                             attn_implementation=teacher.config._attn_implementation)
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(student)]
    if missing or unexpected:
        raise RuntimeError(f"Merged weights do not fit {type(student).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}. Please report this with the teacher's config.")
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    student.train(teacher.training)
    return student


def _tied_keys(model: Any) -> set[str]:
    """Parameter names that alias another parameter (e.g. lm_head.weight with tied embeddings)."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        seen.setdefault(id(p), name)
    return aliases
