"""What differs between model types: the one file to extend for a new architecture.

Each registered `model_type` has an `Architecture`: which modules of a decoder layer read the residual stream
(input side, W_S = W_T @ P) and which write it (output side, W_S = P^T @ W_T), the residual-width norms, the
activation-clone terms (with the row blocks of fused modules such as Phi-3's `qkv_proj`), the groups tied by
`share_projections`, and what a merge must rewrite (an embedding scaled by sqrt(hidden_size), a norm applied as
`(offset + weight)`). Side is decided by name, not by shape, because q_proj is square whenever heads x head_dim
equals the hidden size.

Modules outside the decoder layers are found through the model itself (`get_input_embeddings()`,
`get_output_embeddings()`, `get_decoder()` and its layer list), never through hard-coded paths: see
`ModelLayout`. Adding a Llama-like architecture is one entry in `ARCHITECTURES` (and one test parameter);
`docs/architectures.md` walks through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

CLONE_TERMS = ("q", "k", "v", "gate", "up", "attn", "ffn")
RESIDUAL_TERMS = ("attn", "ffn")  # clone terms compared in residual space (through the module's projection)


@dataclass(frozen=True)
class CloneTarget:
    """The module output a clone term compares: `module` (short name in a decoder layer) and, for a fused
    module, which of its output blocks (`part` of the blocks that `Architecture.fused_blocks` gives)."""

    module: str
    part: int | None = None


def _qkv_blocks(config: Any) -> tuple[int, int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim,
            config.num_key_value_heads * head_dim)


def _gate_up_blocks(config: Any) -> tuple[int, int]:
    return config.intermediate_size, config.intermediate_size


@dataclass(frozen=True)
class Architecture:
    """The per-model-type facts RED needs (see the module docstring).

    Attributes:
        input_modules / output_modules / norms: short module names inside each decoder layer.
        clone_targets: clone term -> the module output it compares.
        fused_blocks: fused module -> function(config) giving the sizes of its output blocks, in order.
        shared_groups: module -> group name for `share_projections=True` (one projection per group and layer).
        norm_offset: the norms compute `x_hat * (norm_offset + weight)` (Gemma: 1, stored gains near 0).
        scales_embedding: the embedding output is multiplied by sqrt(config.hidden_size) (Gemma).
        layers_attribute / final_norm_attribute: attribute names of the layer list and final norm on
            `get_decoder()`.
    """

    input_modules: tuple[str, ...]
    output_modules: tuple[str, ...]
    norms: tuple[str, ...]
    clone_targets: Mapping[str, CloneTarget]
    fused_blocks: Mapping[str, Callable[[Any], tuple[int, ...]]] = field(default_factory=dict)
    shared_groups: Mapping[str, str] = field(default_factory=dict)
    norm_offset: float = 0.0
    scales_embedding: bool = False
    layers_attribute: str = "layers"
    final_norm_attribute: str = "norm"

    def target_modules(self) -> dict[str, list[str]]:
        return {"input": list(self.input_modules), "output": list(self.output_modules), "norms": list(self.norms)}

    def clone_rows(self, term: str, config: Any) -> slice | None:
        """Rows (last-dim slice) of the target module's output that `term` compares; None for the whole output."""
        target = self.clone_targets[term]
        if target.part is None:
            return None
        sizes = self.fused_blocks[target.module](config)
        start = sum(sizes[: target.part])
        return slice(start, start + sizes[target.part])

    def embedding_scale(self, hidden_size: int) -> float:
        """The factor the model applies to its embedding output at this width (1 when it applies none)."""
        return math.sqrt(hidden_size) if self.scales_embedding else 1.0


_LLAMA = Architecture(
    input_modules=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
    output_modules=("o_proj", "down_proj"),
    norms=("input_layernorm", "post_attention_layernorm"),
    clone_targets={"q": CloneTarget("q_proj"), "k": CloneTarget("k_proj"), "v": CloneTarget("v_proj"),
                   "gate": CloneTarget("gate_proj"), "up": CloneTarget("up_proj"), "attn": CloneTarget("o_proj"),
                   "ffn": CloneTarget("down_proj")},
    shared_groups={"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"},
)
# Gemma 2/3: four residual norms per layer (the post-norms normalise the attention / FFN output before the
# residual add), gains applied as (1 + w), embeddings scaled by sqrt(hidden_size). Gemma 2's logit soft cap and
# attention soft cap run inside the model's forward, the same for the wrapped and the merged student.
_GEMMA = Architecture(
    input_modules=_LLAMA.input_modules, output_modules=_LLAMA.output_modules,
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    clone_targets=_LLAMA.clone_targets, shared_groups=_LLAMA.shared_groups, norm_offset=1.0, scales_embedding=True,
)
# Phi-3: q/k/v fused into qkv_proj (rows q, k, v) and gate/up into gate_up_proj (rows gate, up).
_PHI3 = Architecture(
    input_modules=("qkv_proj", "gate_up_proj"),
    output_modules=("o_proj", "down_proj"),
    norms=("input_layernorm", "post_attention_layernorm"),
    clone_targets={"q": CloneTarget("qkv_proj", 0), "k": CloneTarget("qkv_proj", 1), "v": CloneTarget("qkv_proj", 2),
                   "gate": CloneTarget("gate_up_proj", 0), "up": CloneTarget("gate_up_proj", 1),
                   "attn": CloneTarget("o_proj"), "ffn": CloneTarget("down_proj")},
    fused_blocks={"qkv_proj": _qkv_blocks, "gate_up_proj": _gate_up_blocks},
)

# model_type -> Architecture, like PEFT's per-model-type target tables.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,  # its q_norm / k_norm act on head_dim, not the residual: left unwrapped
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,  # also q_norm / k_norm on head_dim
    "phi3": _PHI3,
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
# model_type -> {"input", "output", "norms"} module names, derived from the registry
TARGET_MODULES_MAPPING = {model_type: arch.target_modules() for model_type, arch in ARCHITECTURES.items()}


def get_architecture(model_type: str | None) -> Architecture:
    """The registry entry of `model_type`, or a ValueError naming the supported types and this file."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not supported by transformers_red; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}. A Llama-like architecture is one entry in "
                         "transformers_red/adapter/architectures.py (see docs/architectures.md).")
    return ARCHITECTURES[model_type]


@dataclass(frozen=True)
class ModelLayout:
    """Where the residual-touching modules of one model are (full module names).

    Attributes:
        embedding / head / final_norm: the input embedding, the LM head and the decoder's final norm.
        layers: the decoder layers, in order.
        tied: whether the head shares the embedding's weight.
    """

    embedding: str
    head: str
    final_norm: str
    layers: tuple[str, ...]
    tied: bool


def _name_of(model: nn.Module, module: nn.Module, what: str) -> str:
    for name, candidate in model.named_modules(remove_duplicate=False):
        if candidate is module:
            return name
    raise ValueError(f"Cannot find the {what} of this {type(model).__name__} among its modules.")


def _weight(module: nn.Module) -> torch.Tensor:
    base = getattr(module, "base_layer", module)  # a RED wrapper holds the teacher module as base_layer
    return base.weight


def model_layout(model: nn.Module, architecture: Architecture | None = None) -> ModelLayout:
    """Find the embedding, head, final norm and decoder layers of a causal LM through its own accessors."""
    architecture = architecture or get_architecture(getattr(model.config, "model_type", None))
    embedding, head, decoder = model.get_input_embeddings(), model.get_output_embeddings(), model.get_decoder()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head): RED needs a causal LM "
                         "(AutoModelForCausalLM).")
    layers = getattr(decoder, architecture.layers_attribute)
    norm = getattr(decoder, architecture.final_norm_attribute)
    return ModelLayout(embedding=_name_of(model, embedding, "input embedding"),
                       head=_name_of(model, head, "LM head"),
                       final_norm=_name_of(model, norm, "final norm"),
                       layers=tuple(_name_of(model, layer, "decoder layer") for layer in layers),
                       tied=_weight(head) is _weight(embedding))


def find_in_layer(model: nn.Module, layer: str, short: str) -> str:
    """Full name of the module called `short` inside decoder layer `layer`."""
    for name, _ in model.get_submodule(layer).named_modules(prefix=layer):
        if name.rsplit(".", 1)[-1] == short:
            return name
    raise ValueError(f"No module {short!r} under {layer} in this {type(model).__name__}; check target_modules.")
