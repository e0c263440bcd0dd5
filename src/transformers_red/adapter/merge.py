"""Step 4 of the pipeline: merge. Fold the projections into an ordinary, smaller checkpoint.

The result is a model of the teacher's own class (e.g. `LlamaForCausalLM`) with `hidden_size = d_S` and an
explicit `head_dim`; everything else of the config is the teacher's. It saves and reloads with
`AutoModelForCausalLM.from_pretrained` and no custom code.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from ..constants import CONFIG_SUMMARY_KEY


def student_config(teacher_config: Any, hidden_size: int) -> Any:
    """The teacher's config with the residual width set to `hidden_size` and `head_dim` made explicit."""
    config = copy.deepcopy(teacher_config)
    head_dim = getattr(teacher_config, "head_dim", None) or (
        teacher_config.hidden_size // teacher_config.num_attention_heads)
    config.hidden_size = hidden_size
    config.head_dim = head_dim
    # the student is a plain model in the teacher's compute dtype: a GGUF or quantised teacher's loading recipe
    # would make it claim a quantisation it does not have; a teacher that is itself a RED student passes on
    # its own summary, which does not describe this student
    for attribute in ("quantization_config", "_pre_quantization_dtype", CONFIG_SUMMARY_KEY):
        if hasattr(config, attribute):
            delattr(config, attribute)
    return config


@torch.no_grad()
def merged_state_dict(red_model: Any, progressbar: bool = False) -> dict[str, torch.Tensor]:
    """State dict of the plain student: merged wrappers plus the teacher's untouched tensors (copied)."""
    wrapped = dict(red_model.red_layers())
    state: dict[str, torch.Tensor] = {}
    for name, layer in tqdm(wrapped.items(), desc="Merging", disable=not progressbar):
        state.update({f"{name}.{k}": v.detach().clone() for k, v in layer.merged_state().items()})
    inside_wrappers = tuple(f"{name}." for name in wrapped)  # their base layer and the tensor each owns
    for key, value in red_model.base_model.state_dict().items():
        if not key.startswith(inside_wrappers):  # tensors of unwrapped modules (e.g. Qwen3 q_norm/k_norm)
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
    weight = _teacher_weight(red_model)
    config = student_config(teacher.config, red_model.student_hidden_size)
    state = merged_state_dict(red_model, progressbar=progressbar)
    with torch.device(weight.device), outside_zero3_init():
        student = type(teacher)._from_config(config, dtype=weight.dtype,
                                             attn_implementation=teacher.config._attn_implementation)
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in tied_parameter_names(student)]
    if missing or unexpected:
        raise RuntimeError(f"Merged weights do not fit {type(student).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}. Please report this with the teacher's config.")
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    record_summary(student, {"adapter": red_model.red_config.to_dict(),
                             "teacher_hidden_size": red_model.teacher_hidden_size,
                             "student_hidden_size": red_model.student_hidden_size})
    _check_merge(red_model, student)
    student.train(teacher.training)
    return student


def record_summary(student: Any, summary: dict[str, Any]) -> None:
    """Keep the RED summary with the student, wherever it is saved.

    It goes into the config (`config.red_summary`, a plain JSON entry of config.json), so every save path of a
    plain model keeps it (`save_pretrained`, `push_to_hub`, a Trainer's save) and `from_pretrained` reads it back
    with no custom code; `student.red_summary` is the same dict. The channel list stays in the adapter file: the
    card does not need it and it would fill config.json with d_S numbers.
    """
    adapter = {k: v for k, v in (summary.get("adapter") or {}).items() if k != "channel_indices"}
    summary = {**summary, "adapter": adapter} if adapter else dict(summary)
    setattr(student.config, CONFIG_SUMMARY_KEY, summary)
    student.red_summary = summary


# max |merged - wrapped| / max |wrapped| over the logits of one short batch
MERGE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
MERGE_TOLERANCE_LOW_PRECISION = 5e-2  # bf16 / fp16: the products W_T P round differently from the wrapped forward


@torch.no_grad()
def _check_merge(red_model: Any, student: Any) -> None:
    """Run the wrapped and the merged student on 16 tokens and raise if their logits differ.

    One forward of each: a merge that an architecture's hook (embedding scale, norm convention) got wrong would
    otherwise produce a student that loads and generates but is not the model that was trained.
    """
    teacher = red_model.base_model
    weight = _teacher_weight(red_model)
    ids = torch.arange(16, device=weight.device).remainder(teacher.config.get_text_config().vocab_size)[None]
    was_training = teacher.training
    teacher.eval()
    student.eval()
    # both in the weights' own dtype: no caller's autocast, and not accelerate's mixed-precision wrapper, which
    # replaces the instance's forward by an autocast one (the class's forward still runs through __call__'s hooks)
    autocast_forward = red_model.__dict__.pop("forward", None)
    try:
        with torch.autocast(weight.device.type, enabled=False):
            wrapped, merged = red_model(input_ids=ids).logits.float(), student(input_ids=ids).logits.float()
    finally:
        if autocast_forward is not None:
            red_model.forward = autocast_forward
        teacher.train(was_training)
    error = ((merged - wrapped).abs().max() / wrapped.abs().max().clamp_min(1e-6)).item()
    tolerance = MERGE_TOLERANCE.get(weight.dtype, MERGE_TOLERANCE_LOW_PRECISION)
    if not error <= tolerance:
        raise RuntimeError(f"The merged {type(student).__name__} differs from the wrapped student by {error:.2e} "
                           f"(relative, max over logits; tolerance {tolerance:g} in {weight.dtype}): the "
                           f"{teacher.config.model_type!r} entry of the architecture registry does not describe this "
                           "model. Please report it with the teacher's config.")


@contextlib.contextmanager
def outside_zero3_init() -> Iterator[None]:
    """Build models whole inside this context while a ZeRO-3 Trainer runs.

    Otherwise transformers builds every new model under `deepspeed.zero.Init`, which would partition the merged
    student at creation (empty tensors on every rank; it is merged on every rank inside `whole_parameters`, then
    written by rank 0) and fails on a meta-device model (the parameter count of a model card). The Trainer's
    DeepSpeed config is restored on leaving."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # transformers without its DeepSpeed integration
        yield
        return
    reference = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    active = reference() if reference is not None else None
    if active is None or not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(active)


def _teacher_weight(red_model: Any) -> torch.Tensor:
    """A frozen teacher weight (the embedding table): its device and dtype are the student's (the trainable tensors
    may be float32 masters over a bf16 teacher)."""
    return red_model.base_model.get_input_embeddings().base_layer.weight


def tied_parameter_names(model: Any) -> set[str]:
    """Parameter names that alias another parameter (e.g. lm_head.weight with tied embeddings)."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        seen.setdefault(id(p), name)
    return aliases
