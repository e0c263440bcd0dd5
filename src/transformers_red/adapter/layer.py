"""Layers that wrap the teacher's own modules and run them at the student width.

Each wrapper keeps the frozen teacher module as `base_layer` (like PEFT's LoRA layers) and owns the trainable
projection / norm gain its forward uses, registered as its own parameter `red_weight`. Sharding engines need that
rule: FSDP shards a parameter with the unit of the module that registers it, and DeepSpeed ZeRO-3 gathers a
module's parameters in that module's forward hooks. A shared projection (tied embedding and LM head, a
`share_projections` group) is one `nn.Parameter` registered in every wrapper that uses it, as a tied
`lm_head.weight` is in transformers. A shared `RedState` switches every wrapper between the student pass and the
exact teacher pass (`RedModel.disable_adapter()`), so one copy of the teacher serves both.

The student pass reads `base_layer.weight` inside the wrapper's own forward (forming W_T @ P once per forward is
cheaper than projecting every token through the full-width module): engines must treat a wrapper as one unit
with its base layer (`training.distributed.ZERO3_LEAF_CLASSES` as ZeRO-3 leaf modules; FSDP units are whole decoder
layers), and the student linear is one autograd node (`forming.StudentLinear`), so its backward runs while they are
gathered.

The trainable tensors may be kept in float32 over a bf16/fp16 teacher (`RedAdapterConfig.trainable_dtype`); every
forward casts them to the base layer's dtype, so the arithmetic stays the teacher's and the gradients land in float32.
How the student weights are formed (one autograd node per forward, or once per optimizer step under gradient
accumulation) is `forming.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .forming import EmittedStudentWeight, FormedWeights, StudentLinear, form_bias, form_weight


@dataclass
class RedState:
    """Mutable switches shared by all wrappers of one `RedModel`."""

    student: bool = True
    capture: dict[str, torch.Tensor] | None = None  # module name -> output, while capturing
    capture_names: frozenset[str] | None = None  # which modules to capture (None: all)
    emit_weight: bool = False  # the LM head returns its weight instead of logits (`RedModel.hidden_and_head`)
    formed: FormedWeights | None = None  # student weights held over micro-batches (`RedModel.hold_formed_weights`)
    # clone-loss products that need a projection, made inside the owning wrapper's student forward
    # (`RedModel.capture_activations(project_targets=..., lift=...)`)
    clone_targets: dict[str, torch.Tensor] | None = None  # module name -> teacher output (..., d_T), recorded @ P
    clone_lift: frozenset[str] | None = None  # modules whose student output is also recorded @ P^T


# capture keys of the products above
PROJECTED_SUFFIX = "@P"
LIFTED_SUFFIX = "@P^T"


def _kept(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class RedLayer(nn.Module):
    """Base of the wrappers: a frozen `base_layer`, the trainable tensor it owns, and the shared state.

    Args:
        base_layer: the teacher module being wrapped (frozen).
        name: its name in the teacher (e.g. "model.layers.0.self_attn.q_proj").
        key: the adapter key of `red_weight` (wrappers sharing one parameter share the key).
        red_weight: the projection (d_T, d_S) or norm gain (d_S,); the same object for every user of a shared key.
        state: the `RedState` of the RedModel.
    """

    def __init__(self, base_layer: nn.Module, name: str, key: str, red_weight: nn.Parameter, state: RedState):
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        self.key = key
        self.red_weight = red_weight
        self.__dict__["_state"] = state  # a plain attribute: one RedState for the whole model

    @property
    def weight(self) -> nn.Parameter:
        """The teacher's frozen weight (of `base_layer`), as PEFT's tuner layers expose it: for code that inspects
        `module.weight` (accelerate's FSDP2 wrapping detects a tied embedding / head by it; dtype and device
        queries). It is not the student weight; `RedLinear.student_weight()` / `merged_state()` give that."""
        return self.base_layer.weight

    @property
    def trainable(self) -> nn.Parameter:
        """The projection (d_T, d_S) or norm gain (d_S,) this layer trains."""
        return self.red_weight

    def trainable_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The trainable tensor in the compute dtype (a float32 master over a bf16 teacher is cast per forward)."""
        tensor = self.red_weight
        return tensor if tensor.dtype == dtype else tensor.to(dtype)

    def _record(self, output: torch.Tensor) -> torch.Tensor:
        state = self._state
        if state.capture is not None and (state.capture_names is None or self.name in state.capture_names):
            state.capture[self.name] = output
        return output

    def merged_state(self) -> dict[str, torch.Tensor]:
        """Parameters of the equivalent plain module of the student (names relative to this module)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        shape = "x".join(str(d) for d in self.trainable.shape)
        return f"trainable={self.key} ({shape})"


class RedLinear(RedLayer):
    """A teacher `nn.Linear` run through its projection P (d_T, d_S).

    side="input" (q, k, v, gate, up, LM head) reads the residual stream: W_S = W_T @ P, bias kept.
    side="output" (o, down) writes it: W_S = P^T @ W_T, b_S = b_T @ P.
    """

    def __init__(self, base_layer: nn.Linear, name: str, key: str, red_weight: nn.Parameter, state: RedState,
                 side: Literal["input", "output"]):
        super().__init__(base_layer, name, key, red_weight, state)
        if side not in ("input", "output"):
            raise ValueError(f"side must be 'input' or 'output', got {side!r}")
        self.side = side

    def extra_repr(self) -> str:
        d_t, d_s = self.trainable.shape
        return f"side={self.side}, {d_t} -> {d_s}, projection={self.key}"

    def form_student_weight(self) -> torch.Tensor:
        """W_T @ P (out, d_S) for the input side, P^T @ W_T (d_S, in) for the output side, in W_T's dtype."""
        return form_weight(self.base_layer.weight, self.red_weight, self.side)

    def _uses_held_weight(self) -> bool:
        """Whether this forward takes the weight held for the optimizer step (`FormedWeights`): while one is
        held and gradients are recorded."""
        return self._state.formed is not None and torch.is_grad_enabled()

    def student_weight(self) -> torch.Tensor:
        """The student weight this forward uses: the held one (`_uses_held_weight`), else formed now."""
        return self._state.formed.weight(self) if self._uses_held_weight() else self.form_student_weight()

    def student_bias(self) -> torch.Tensor | None:
        return form_bias(self.base_layer.bias, self.red_weight, self.side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_S) in the student pass, (..., d_T) or inner width in the teacher pass.

        With `emit_weight` set, returns this pass's weight instead ((out, d_S) or (out, d_T)): read inside the
        forward, so engines that gather parameters in forward hooks (ZeRO-3) have it whole."""
        if self._state.emit_weight:
            if self._state.student:
                if self._uses_held_weight():
                    return self.student_weight()
                return EmittedStudentWeight.apply(x, self.base_layer.weight, self.red_weight, self.side)
            weight = self.base_layer.weight
            return weight.clone() if hasattr(weight, "ds_id") else weight  # ZeRO-3 frees it after this forward
        if not self._state.student:
            return self._record(self.base_layer(x))
        if self._uses_held_weight():
            output = F.linear(x, self.student_weight(), self.student_bias())
        else:
            base = self.base_layer
            output = StudentLinear.apply(x, base.weight, self.red_weight, base.bias, self.side)
        output = self._record(output)
        self._record_clone_products(output)
        return output

    def _record_clone_products(self, output: torch.Tensor) -> None:
        """Record teacher output @ P and / or output @ P^T for the clone loss, inside this forward: sharding engines
        have P whole only here (ZeRO-3 gathers it in this module's forward hooks, FSDP2 in its unit's).

        Args:
            output: (..., d_S), this wrapper's student output (an output-side module's).
        """
        state = self._state
        targets, lift = state.clone_targets, state.clone_lift
        wanted = (targets is not None and self.name in targets, lift is not None and self.name in lift)
        if state.capture is None or not any(wanted):
            return
        proj = self.trainable_as(output.dtype)
        # saved outside any activation checkpoint of this layer: its recomputation, which runs after the capture
        # has ended, does not redo these products
        with torch.autograd.graph.saved_tensors_hooks(_kept, _kept):
            if wanted[0]:
                state.capture[self.name + PROJECTED_SUFFIX] = targets[self.name].to(output.dtype) @ proj
            if wanted[1]:
                state.capture[self.name + LIFTED_SUFFIX] = output @ proj.T

    def merged_state(self) -> dict[str, torch.Tensor]:
        state = {"weight": self.form_student_weight()}
        if self.base_layer.bias is not None:
            state["bias"] = self.student_bias()
        return state


class RedEmbedding(RedLayer):
    """A teacher `nn.Embedding` E_T (V, d_T) seen through P (d_T, d_S): E_S = E_T @ P."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, T) -> (B, T, d_S) in the student pass, (B, T, d_T) in the teacher pass."""
        hidden = self.base_layer(input_ids)
        # Gather then project: T x d_T x d_S work instead of forming the V x d_S table every step.
        return hidden @ self.trainable_as(hidden.dtype) if self._state.student else hidden

    def merged_state(self) -> dict[str, torch.Tensor]:
        weight = self.base_layer.weight
        return {"weight": weight @ self.trainable_as(weight.dtype)}


class RedRMSNorm(RedLayer):
    """A teacher RMSNorm whose gain becomes a trainable (d_S,) vector in the student pass.

    The teacher's own forward runs with the student gain swapped in (`functional_call`), so the arithmetic
    is the architecture's own and equals the merged student's norm bit for bit.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self._state.student:
            return self.base_layer(hidden_states)
        gain = self.trainable_as(self.base_layer.weight.dtype)
        return torch.func.functional_call(self.base_layer, {"weight": gain}, (hidden_states,))

    def merged_state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.trainable_as(self.base_layer.weight.dtype)}


# The wrapper classes (`training.distributed.ZERO3_LEAF_CLASSES`: those ZeRO-3 gathers as one unit with their base
# layer)
RED_LAYER_CLASSES = (RedLinear, RedEmbedding, RedRMSNorm)
