"""Layers that wrap the teacher's own modules and run them at the student width.

Each wrapper keeps the frozen teacher module as `base_layer` (like PEFT's LoRA layers) and looks its
trainable projection / norm gain up in the `RedModel`'s stores, so that shared projections (tied embeddings,
"IO" sharing) are one tensor. A shared `RedState` switches every wrapper between the student pass and the
exact teacher pass (`RedModel.disable_adapter()`), so one copy of the teacher serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RedState:
    """Mutable switches shared by all wrappers of one `RedModel`."""

    student: bool = True
    capture: dict[str, torch.Tensor] | None = None  # module name -> output, while capturing
    capture_names: frozenset[str] | None = None  # which modules to capture (None: all)


class RedLayer(nn.Module):
    """Base of the wrappers: a frozen `base_layer`, a key into a parameter store, and the shared state."""

    def __init__(self, base_layer: nn.Module, name: str, key: str, store: nn.ParameterDict, state: RedState):
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        self.key = key
        # Plain attributes (not submodules): the stores are registered once, on the RedModel.
        self.__dict__["_store"] = store
        self.__dict__["_state"] = state

    @property
    def trainable(self) -> nn.Parameter:
        """The projection (d_T, d_S) or norm gain (d_S,) this layer trains."""
        return self._store[self.key]

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

    def __init__(self, base_layer: nn.Linear, name: str, key: str, store: nn.ParameterDict, state: RedState,
                 side: Literal["input", "output"]):
        super().__init__(base_layer, name, key, store, state)
        if side not in ("input", "output"):
            raise ValueError(f"side must be 'input' or 'output', got {side!r}")
        self.side = side

    def extra_repr(self) -> str:
        d_t, d_s = self.trainable.shape
        return f"side={self.side}, {d_t} -> {d_s}, projection={self.key}"

    def student_weight(self) -> torch.Tensor:
        """(out, d_S) for the input side, (d_S, in) for the output side."""
        weight, proj = self.base_layer.weight, self.trainable
        return weight @ proj if self.side == "input" else proj.T @ weight

    def student_bias(self) -> torch.Tensor | None:
        bias = self.base_layer.bias
        if bias is None or self.side == "input":
            return bias
        return bias @ self.trainable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_S) in the student pass, (..., d_T) or inner width in the teacher pass."""
        if not self._state.student:
            return self._record(self.base_layer(x))
        return self._record(F.linear(x, self.student_weight(), self.student_bias()))

    def merged_state(self) -> dict[str, torch.Tensor]:
        state = {"weight": self.student_weight()}
        if self.base_layer.bias is not None:
            state["bias"] = self.student_bias()
        return state


class RedEmbedding(RedLayer):
    """A teacher `nn.Embedding` E_T (V, d_T) seen through P (d_T, d_S): E_S = E_T @ P."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, T) -> (B, T, d_S) in the student pass, (B, T, d_T) in the teacher pass."""
        hidden = self.base_layer(input_ids)
        # Gather then project: T x d_T x d_S work instead of forming the V x d_S table every step.
        return hidden @ self.trainable if self._state.student else hidden

    def merged_state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.base_layer.weight @ self.trainable}


class RedRMSNorm(RedLayer):
    """A teacher RMSNorm whose gain becomes a trainable (d_S,) vector in the student pass.

    The teacher's own forward runs with the student gain swapped in (`functional_call`), so the arithmetic
    is the architecture's own and equals the merged student's norm bit for bit.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self._state.student:
            return self.base_layer(hidden_states)
        return torch.func.functional_call(self.base_layer, {"weight": self.trainable}, (hidden_states,))

    def merged_state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.trainable}
