"""Per-GPU memory of a RED distillation run, from the teacher's config alone (`transformers-red plan`).

Nothing is loaded or allocated: the teacher is built on the meta device (shapes without storage), so parameter
counts are exact for every registered architecture (biases, Phi-3's fused modules, Gemma's four norms per
layer, Qwen3's q/k norms), and the trainable count follows the same registry as `RedModel`. Activations are an
estimate (what autograd keeps for a Llama-style layer with SDPA / flash attention); the parameter parts are exact.

Bytes per GPU, component by component. P = gpus, b = bytes per element of `dtype`, B x T = micro batch x sequence
length (per GPU), d_T / d_S = teacher / student width, L layers, V vocabulary, q / kv / I = the query, key-value
and FFN inner widths, n = norms per layer, N_T = teacher parameters, N_RED = trainable RED parameters:

| component | bytes | sharded over P under |
|---|---|---|
| teacher weights | N_T x b (frozen, full width d_T) | fsdp, zero3 |
| gathered teacher units | root unit (embedding, LM head, final norm) + 2 decoder layers, x b | (fsdp, zero3 only) |
| RED weights | N_RED x 4 | fsdp, zero3 |
| RED gradients | N_RED x 4 | fsdp, zero2, zero3 |
| optimizer states | N_RED x 8 (AdamW's two moments) | fsdp, zero2, zero3 |
| student weights W_T @ P | per-layer student linear weights x L (x 1 with checkpointing) + V x d_S, x b | no |
| held student weights | per-step forming (accumulation > 1, ddp): student weights W_S x (4 + b [checkpointing]) | no |
| student activations | B x T x b x (L x a_S + d_T + 2 d_S) (checkpointing: L x (d_S + c_S) + a_S + ...) | no |
| teacher pass | B x T x b x (2 d_T + max(2 q + 2 kv, 3 I)) | no |
| clone targets | B x T x b x L x c_T | no |
| logit buffers | logits: 3 x B x T x V x b + 3 x chunk x V x 4; hidden_states: see below | no |

- N_RED = (L x k + 1 + [untied]) x d_T x d_S + (L x n + 1) x d_S, with k projections per layer: one per targeted
  module (q, k, v, o, gate, up, down: 7; Phi-3's fused qkv / gate_up: 4), or one per `shared_groups` group with
  `share_projections` (qkv, gate_up, o, down: 4); the embedding's projection, and the LM head's unless tied.
- 16 bytes per trainable parameter: fp32 weights, gradients and AdamW moments (4 + 4 + 8), the same total as
  DeepSpeed's bf16 split (bf16 weight 2 + bf16 gradient 2 + fp32 master and moments 12). ZeRO-2 keeps the weights
  replicated and shards the rest; FSDP and ZeRO-3 shard all of it.
- Gathered units: FSDP2 keeps the root unit unsharded through forward and backward, and holds the unit being run
  plus the one prefetched; ZeRO-3's prefetch is similar.
- Student weights: a RED linear forms W_T @ P in every forward and autograd keeps it for the backward (as input
  of `F.linear`), so the student's linear weights exist at width d_S next to the teacher's, plus the head's V x d_S.
- Held student weights: with gradient accumulation (and not under FSDP / ZeRO), `RedConfig.form_student_weights`
  'auto' forms every W_S once per optimizer step and keeps it through the step with a float32 gradient sum; with
  activation checkpointing the formed weights themselves (x b) add to the one layer counted above. 0 with
  `form_student_weights='per_forward'` (`held_weights=False`).
- a_S = 2 n d_S + 2 d_S + 3 q + 3 kv + 4 I elements per token and layer: norm inputs and outputs, the captured
  attention / FFN outputs, q, k, v before and after RoPE, the attention output, gate, up, act(gate) and
  act(gate) x up; no T x T scores (SDPA / flash attention). d_T + 2 d_S: the gathered embedding rows kept for
  the embedding projection's gradient, and the final norm. With activation checkpointing only the layer inputs
  (d_S), the clone captures of the student (c_S: the captured modules' output widths, attention / FFN outputs at
  d_S) and one layer's a_S during its recomputation are kept.
- Teacher pass (under no_grad): nothing but the layer being run; its final hidden states or logits are counted
  in the logit buffers. c_T: the teacher outputs the clone loss compares, kept until the loss (q + 2 kv + 2 I +
  2 d_T with every clone term).
- Logit buffers with `logit_loss_from="hidden_states"`: no (B, T, V) tensor; chunk x V x (2 b + 16) temporaries
  (student and teacher logits of a chunk, a float32 gradient and three float32 scratch blocks), the teacher's final
  hidden states B x T x d_T x b and float32 gradients of the student's final hidden states and head
  ((B x T + V) x d_S x 4). chunk = min(loss_chunk_size, B x T); with loss_chunk_size=None (the default) the
  trainer's own rule, `auto_loss_chunk_size(B x T, d_S, V)`. `logit_loss_from="auto"` (the default) is planned as
  "hidden_states", which the trainer takes on every supported architecture (no LM-head bias) without a separate
  teacher_model under FSDP/DeepSpeed.

Not counted: the CUDA context and NCCL buffers (about 1-2 GiB per GPU), allocator fragmentation, and eager
attention's (B, heads, T, T) scores.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..adapter.architectures import CLONE_TERMS, find_in_layer, get_architecture, model_layout
from ..adapter.config import RedAdapterConfig
from .config import CHOICES, RedConfig
from .losses import auto_loss_chunk_size

ENGINES = ("ddp", "fsdp", "zero2", "zero3")
DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}
LOGIT_PATHS = CHOICES["logit_loss_from"]
# bytes per trainable parameter: fp32 weight, gradient, AdamW's two moments
WEIGHT_BYTES, GRADIENT_BYTES, OPTIMIZER_BYTES = 4, 4, 8
FP32 = 4
GIB = 2 ** 30
# which components each engine divides over the GPUs
_OPTIMIZER_SIDE = frozenset({"RED gradients", "optimizer states"})
_EVERY_PARAMETER = _OPTIMIZER_SIDE | {"teacher weights", "RED weights"}
SHARDED = {"ddp": frozenset(), "zero2": _OPTIMIZER_SIDE, "fsdp": _EVERY_PARAMETER, "zero3": _EVERY_PARAMETER}
GATHERING_ENGINES = ("fsdp", "zero3")  # engines that all-gather the teacher's units for each forward
DEFAULT_LOSS_CHUNK_SIZE = RedConfig.__dataclass_fields__["loss_chunk_size"].default


@dataclass(frozen=True)
class TeacherShapes:
    """What the estimate needs of a teacher, read from a meta-device build of its config.

    Attributes:
        parameters / layer_parameters / root_parameters: the teacher's parameters, in all, per decoder layer and
            outside the layers (embedding, LM head when untied, final norm).
        student_linear_weights: elements of one decoder layer's targeted linear weights at width d_S.
        module_widths: targeted module (short name) -> its output width in the teacher (o / down: d_T).
        output_modules: the targeted modules that write the residual stream (their output is d_S in the student).
        tied: whether the LM head shares the embedding's weight.
    """

    parameters: int
    layer_parameters: int
    root_parameters: int
    student_linear_weights: int
    module_widths: dict[str, int]
    output_modules: tuple[str, ...]
    tied: bool


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate: bytes per GPU by component, and the numbers they come from.

    `components` maps a component name to bytes on one GPU (already divided by `gpus` where the engine shards
    it); `total` is their sum. `to_dict()` is what `transformers-red plan --json` prints; `table()` the text.
    """

    model_type: str
    teacher_hidden_size: int
    student_hidden_size: int
    num_layers: int
    vocab_size: int
    tied: bool
    teacher_parameters: int
    trainable_parameters: int
    gpus: int
    engine: str
    micro_batch_size: int
    seq_len: int
    dtype: str
    loss_chunk_size: int
    logit_loss_from: str
    activation_checkpointing: bool
    share_projections: bool
    clone_terms: tuple[str, ...]
    gradient_accumulation_steps: int = 1
    components: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["clone_terms"] = list(self.clone_terms)
        data["components_gib"] = {name: round(value / GIB, 3) for name, value in self.components.items()}
        data["total"] = self.total
        data["total_gib"] = round(self.total / GIB, 3)
        return data

    def table(self) -> str:
        """The components and the total in GiB per GPU, under a header with the run's shape."""
        head = (f"{self.model_type}: d_T {self.teacher_hidden_size} -> d_S {self.student_hidden_size}, "
                f"{self.num_layers} layers, vocab {self.vocab_size}, {'tied' if self.tied else 'untied'}; "
                f"teacher {self.teacher_parameters:,d} params, trainable {self.trainable_parameters:,d}")
        run = (f"{self.engine} on {self.gpus} GPU{'s' if self.gpus > 1 else ''}, micro batch {self.micro_batch_size} "
               f"x {self.seq_len} tokens, {self.dtype}, logit_loss_from={self.logit_loss_from}, activation "
               f"checkpointing {'on' if self.activation_checkpointing else 'off'}, clone terms "
               f"{','.join(self.clone_terms) or 'none'}, accumulation {self.gradient_accumulation_steps}")
        width = max(len(name) for name in [*self.components, "total"])
        rows = [f"{'component':<{width}}  GiB per GPU", f"{'-' * width}  -----------"]
        rows += [f"{name:<{width}}  {value / GIB:11.2f}" for name, value in self.components.items()]
        rows += [f"{'-' * width}  -----------", f"{'total':<{width}}  {self.total / GIB:11.2f}"]
        note = "activations are an estimate; not counted: CUDA context, NCCL buffers, fragmentation (~1-2 GiB)"
        return "\n".join([head, run, "", *rows, "", note])


def text_config(config: Any) -> Any:
    """The decoder's config (`get_text_config()` of a multimodal config, else the config itself)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def teacher_shapes(config: Any) -> TeacherShapes:
    """Build the teacher of `config` on the meta device (no storage) and read what the estimate needs.

    Raises ValueError for a model_type outside `SUPPORTED_MODEL_TYPES`.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(text_config(config))  # from_config records the attention implementation on it
    architecture = get_architecture(getattr(config, "model_type", None))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layout = model_layout(model, architecture)
    d_t = config.hidden_size
    first = layout.layers[0]
    layer_parameters = sum(p.numel() for p in model.get_submodule(first).parameters())
    parameters = sum(p.numel() for p in model.parameters())  # tied weights counted once
    widths, student_weights = {}, 0
    for short in (*architecture.input_modules, *architecture.output_modules):
        linear = model.get_submodule(find_in_layer(model, first, short))
        widths[short] = linear.out_features
        student_weights += linear.weight.numel() // d_t  # the d_T side becomes d_S below
    return TeacherShapes(parameters=parameters, layer_parameters=layer_parameters,
                         root_parameters=parameters - len(layout.layers) * layer_parameters,
                         student_linear_weights=student_weights, module_widths=widths,
                         output_modules=architecture.output_modules, tied=layout.tied)


def trainable_parameters(config: Any, student_hidden_size: int, *, tied: bool, share_projections: bool = False) -> int:
    """N_RED: the projections (d_T, d_S) and student norm gains (d_S,) a `RedModel` of this teacher trains.

    Counted from the architecture registry as `RedModel` builds them: one projection per layer and targeted
    module (or per `shared_groups` group with `share_projections`), one for the embedding and one for the LM
    head unless tied; one gain per residual norm of each layer and for the final norm.
    """
    config = text_config(config)
    architecture = get_architecture(config.model_type)
    modules = (*architecture.input_modules, *architecture.output_modules)
    groups = {architecture.shared_groups.get(m, m) if share_projections else m for m in modules}
    layers = config.num_hidden_layers
    projections = layers * len(groups) + (1 if tied else 2)
    gains = layers * len(architecture.norms) + 1
    return projections * config.hidden_size * student_hidden_size + gains * student_hidden_size


def _inner_widths(config: Any) -> tuple[int, int, int]:
    """(q, kv, I): query and key/value widths, FFN inner width."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim, config.intermediate_size


def _captured_width(shapes: TeacherShapes, clone_terms: tuple[str, ...], architecture: Any, residual: int) -> int:
    """Elements per token and layer that the clone captures hold: the compared modules' outputs (a fused module
    is captured whole), with the residual-writing ones at width `residual`."""
    modules = {architecture.clone_targets[term].module for term in clone_terms}
    return sum(residual if m in shapes.output_modules else shapes.module_widths[m] for m in modules)


def estimate_memory(config: Any, width_ratio: float | None = 0.5, target_hidden_size: int | None = None, gpus: int = 1,
                    engine: str = "ddp", micro_batch_size: int = 8, seq_len: int = 2048, dtype: str = "bf16",
                    loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE, activation_checkpointing: bool = False,
                    share_projections: bool = False, logit_loss_from: str = "auto",
                    clone_terms: tuple[str, ...] | list[str] = CLONE_TERMS, gradient_accumulation_steps: int = 1,
                    held_weights: bool = True) -> MemoryPlan:
    """Estimate the memory of one GPU distilling a RED student of the teacher `config` (see the module docstring).

    Args:
        config: the teacher's `PretrainedConfig` (a multimodal one is read through `get_text_config()`).
        width_ratio / target_hidden_size: the student width, as in `RedAdapterConfig` (target_hidden_size wins).
        gpus: data-parallel processes in all (per-GPU micro batch unchanged).
        engine: "ddp", "fsdp" (FSDP2, per-decoder-layer units), "zero2" or "zero3" (DeepSpeed).
        micro_batch_size / seq_len: per-GPU batch B and tokens per sequence T.
        dtype: the teacher's and the activations' dtype ("bf16", "fp16", "fp32").
        loss_chunk_size / logit_loss_from / clone_terms: as in `RedConfig` (clone_terms=() for clone_weight=0).
        activation_checkpointing: recompute each student layer in the backward.
        share_projections: as in `RedAdapterConfig`.
        gradient_accumulation_steps / held_weights: micro-batches per optimizer step, and whether the student
            weights are then formed once per step (`RedConfig.form_student_weights` 'auto' / 'per_step'; never
            under fsdp / zero2 / zero3).

    Returns:
        a `MemoryPlan`: bytes per GPU by component, and the parameter counts.
    """
    problems = []
    if engine not in ENGINES:
        problems.append(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    if dtype not in DTYPE_BYTES:
        problems.append(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if logit_loss_from not in LOGIT_PATHS:
        problems.append(f"logit_loss_from must be one of {list(LOGIT_PATHS)}, got {logit_loss_from!r}")
    for name, value in (("gpus", gpus), ("micro_batch_size", micro_batch_size), ("seq_len", seq_len),
                        ("loss_chunk_size", 1 if loss_chunk_size is None else loss_chunk_size),
                        ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if not isinstance(value, int) or value <= 0:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    unknown = set(clone_terms) - set(CLONE_TERMS)
    if unknown:
        problems.append(f"unknown clone_terms {sorted(unknown)}; choose from {list(CLONE_TERMS)}")
    if problems:
        raise ValueError("Cannot estimate the memory: " + "; ".join(problems) + ".")
    config = text_config(config)
    architecture = get_architecture(getattr(config, "model_type", None))
    width = ({"target_hidden_size": target_hidden_size} if target_hidden_size is not None
             else {"width_ratio": width_ratio})
    d_t = config.hidden_size
    d_s = RedAdapterConfig(**width).resolve_hidden_size(d_t)
    shapes = teacher_shapes(config)
    b, tokens = DTYPE_BYTES[dtype], micro_batch_size * seq_len
    layers, vocab = config.num_hidden_layers, config.vocab_size
    q, kv, inner = _inner_widths(config)
    clone_terms = tuple(clone_terms)
    n_red = trainable_parameters(config, d_s, tied=shapes.tied, share_projections=share_projections)

    layer_activations = (2 * len(architecture.norms) + 2) * d_s + 3 * q + 3 * kv + 4 * inner  # a_S
    outside_layers = d_t + 2 * d_s  # gathered embedding rows, final norm input and output
    if activation_checkpointing:
        kept = layers * (d_s + _captured_width(shapes, clone_terms, architecture, d_s)) + layer_activations
        student_weights = shapes.student_linear_weights * d_s
    else:
        kept = layers * layer_activations
        student_weights = layers * shapes.student_linear_weights * d_s
    held = 0
    if held_weights and gradient_accumulation_steps > 1 and engine == "ddp":
        all_weights = layers * shapes.student_linear_weights * d_s + vocab * d_s
        held = all_weights * FP32 + (all_weights * b - (student_weights + vocab * d_s) * b
                                     if activation_checkpointing else 0)
    logit_loss_from = "hidden_states" if logit_loss_from == "auto" else logit_loss_from
    loss_chunk_size = loss_chunk_size or auto_loss_chunk_size(tokens, d_s, vocab)
    chunk = min(loss_chunk_size, tokens)
    if logit_loss_from == "logits":
        logits = 3 * tokens * vocab * b + 3 * chunk * vocab * FP32
    else:
        logits = chunk * vocab * (2 * b + 4 * FP32) + tokens * d_t * b + (tokens + vocab) * d_s * FP32
    gathered = (shapes.root_parameters + 2 * shapes.layer_parameters) * b if engine in GATHERING_ENGINES else 0
    components = {
        "teacher weights": shapes.parameters * b,
        "gathered teacher units": gathered,
        "RED weights": n_red * WEIGHT_BYTES,
        "RED gradients": n_red * GRADIENT_BYTES,
        "optimizer states": n_red * OPTIMIZER_BYTES,
        "student weights W_T @ P": (student_weights + vocab * d_s) * b,
        "held student weights": held,
        "student activations": tokens * (kept + outside_layers) * b,
        "teacher pass": tokens * (2 * d_t + max(2 * q + 2 * kv, 3 * inner)) * b,
        "clone targets": tokens * layers * _captured_width(shapes, clone_terms, architecture, d_t) * b,
        "logit buffers": logits,
    }
    sharded = SHARDED[engine]
    # ceil: a shard is never smaller than its share
    components = {name: -(-value // gpus) if name in sharded else value for name, value in components.items()}
    return MemoryPlan(model_type=config.model_type, teacher_hidden_size=d_t, student_hidden_size=d_s,
                      num_layers=layers, vocab_size=vocab, tied=shapes.tied, teacher_parameters=shapes.parameters,
                      trainable_parameters=n_red, gpus=gpus, engine=engine, micro_batch_size=micro_batch_size,
                      seq_len=seq_len, dtype=dtype, loss_chunk_size=loss_chunk_size, logit_loss_from=logit_loss_from,
                      activation_checkpointing=activation_checkpointing, share_projections=share_projections,
                      clone_terms=clone_terms, gradient_accumulation_steps=gradient_accumulation_steps,
                      components=components)
