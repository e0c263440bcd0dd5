"""How a wrapper forms its student weight W_S from the frozen teacher weight W_T and its projection P.

- `StudentLinear`: y = x @ W_S^T + b_S as one autograd node per forward (W_S = W_T @ P on the input side,
  P^T @ W_T on the output side), so sharding engines run its backward while W_T and P are gathered.
- `EmittedStudentWeight`: W_S itself, returned in place of the LM head's output for the hidden-state logit loss.
- `FormedWeights`: W_S formed once per optimizer step and shared by its micro-batches (gradient accumulation).

The layers (`layer.RedLinear`) call these; nothing here knows a model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


def form_weight(weight: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """The student weight from a teacher weight and its projection P (d_T, d_S), in the weight's dtype.

    Args:
        weight: the teacher's (out, in).
        side: "input" (W_T @ P: (out, d_S)) or "output" (P^T @ W_T: (d_S, in)).
    """
    p = proj.to(weight.dtype)
    return weight @ p if side == "input" else p.T @ weight


def form_bias(bias: torch.Tensor | None, proj: torch.Tensor, side: str) -> torch.Tensor | None:
    """The student bias: kept on the input side, b_T @ P (d_S,) on the output side; None stays None."""
    if bias is None or side == "input":
        return bias
    return bias @ proj.to(bias.dtype)


class FormingLayer(Protocol):
    """What `FormedWeights` needs of a wrapper (`layer.RedLinear`)."""

    name: str

    @property
    def trainable(self) -> torch.Tensor: ...

    def form_student_weight(self) -> torch.Tensor: ...


@dataclass
class _HeldWeight:
    formed: torch.Tensor  # W_S with its autograd graph back to the projection
    leaf: torch.Tensor  # W_S detached (same storage) for the micro-batches before the last
    version: int  # the projection's version counter when formed (an optimizer step or a load changes it)
    accumulated: torch.Tensor | None = None  # float32 sum of a half-precision leaf's gradients
    joined: bool = False  # the pending gradients are added to `formed`'s gradient (last micro-batch)

    @property
    def pending(self) -> torch.Tensor | None:
        """The gradients of W_S accumulated by the micro-batches so far (float32 for a bf16/fp16 W_S)."""
        return self.accumulated if self.accumulated is not None else self.leaf.grad

    def accumulate(self, leaf: torch.Tensor) -> None:
        """Move a half-precision leaf's gradient into the float32 sum, so the accumulation over micro-batches does
        not round at half precision and no float32 copy of W_S is kept (a post-accumulate-grad hook)."""
        grad = leaf.grad.float()
        self.accumulated = grad if self.accumulated is None else self.accumulated.add_(grad)
        leaf.grad = None


class FormedWeights:
    """Student weights W_S = form(W_T, P) formed once per optimizer step and shared by its micro-batches.

    Within an optimizer step the projections do not change. Each `RedLinear` forms its weight on first use, with
    its autograd graph kept; the micro-batches before the last use W_S detached (a leaf sharing its storage), on
    which their gradients accumulate. The last micro-batch uses the formed weight itself, with the accumulated
    gradients added to its gradient, so that micro-batch's own backward carries everything through the forming
    once, into the projections (exact by linearity of the chain rule). The forming then costs once per optimizer
    step instead of once per micro-batch, and the projections receive their gradients in the last backward, where
    DDP reduces them. Held per weight: its gradient sum, float32 (a bf16/fp16 leaf's gradient is moved into a float32
    sum after each micro-batch, so the accumulation does not round at half precision).
    """

    def __init__(self) -> None:
        self._held: dict[str, _HeldWeight] = {}  # layer name -> its held weight
        self.last_micro_batch = False

    def __len__(self) -> int:
        return len(self._held)

    def form(self, layers: Iterable[FormingLayer]) -> None:
        """Form the weights of `layers` not held yet, before the forward: forming inside a checkpointed region
        would save tensors in the first micro-batch's forward that its recomputation does not."""
        for layer in layers:
            self._held_weight(layer)

    def _held_weight(self, layer: FormingLayer) -> _HeldWeight | None:
        held = self._held.get(layer.name)
        if held is not None and held.version != layer.trainable._version:
            if held.pending is not None:
                raise RuntimeError(
                    f"The projection of {layer.name} changed (an optimizer step or a load) while gradients of its "
                    "held weight were still pending: the optimizer step's last micro-batch must run under "
                    "RedModel.hold_formed_weights(last_micro_batch=True).")
            held = None
        if held is None:
            formed = layer.form_student_weight()
            if not formed.requires_grad:  # a frozen projection: nothing to accumulate
                return None
            held = _HeldWeight(formed, formed.detach().requires_grad_(), layer.trainable._version)
            if formed.dtype in (torch.bfloat16, torch.float16):
                held.leaf.register_post_accumulate_grad_hook(held.accumulate)
            self._held[layer.name] = held
        return held

    def weight(self, layer: FormingLayer) -> torch.Tensor:
        """The student weight of `layer` for this micro-batch (formed by `form`, or now on first use)."""
        held = self._held_weight(layer)
        if held is None:
            return layer.form_student_weight()
        if not self.last_micro_batch:
            return held.leaf
        pending = held.pending
        if not held.joined and pending is not None:  # a hook on a non-leaf runs once, on its total gradient
            held.formed.register_hook(lambda grad: grad + pending.to(grad.dtype))
        held.joined = True
        return held.formed


class StudentLinear(torch.autograd.Function):
    """y = x @ W_S^T + b_S with W_S formed from the teacher weight and the projection, as one autograd node.

    Its backward (the gradients of x and of P) runs as soon as y's gradient arrives, while a sharding engine still
    has W_T and P gathered for this module: with autograd's own graph, the forming matmul is a separate node that
    the engine may run after DeepSpeed ZeRO-3 has released the module's parameters (its post-backward hook fires
    on the gradient of x). The arithmetic is the one `F.linear(x, W_T @ P, b)` does.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, proj: torch.Tensor, bias: torch.Tensor | None,
                side: str) -> torch.Tensor:
        """x: (..., in_S); weight: the teacher's (out, in); proj: P (d_T, d_S); bias: (out,) or None."""
        student_weight, student_bias = form_weight(weight, proj, side), form_bias(bias, proj, side)
        ctx.side, ctx.proj_dtype = side, proj.dtype
        ctx.save_for_backward(x, weight, student_weight, bias if side == "output" else None)
        return F.linear(x, student_weight, student_bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, student_weight, bias = ctx.saved_tensors
        # under autocast the forward ran in grad's dtype (bf16 / fp16) while x and W_T were saved in float32
        x, weight, student_weight = (t.to(grad.dtype) for t in (x, weight, student_weight))
        bias = bias.to(grad.dtype) if bias is not None else None
        grad_x = grad @ student_weight if ctx.needs_input_grad[0] else None
        grad_proj = None
        if ctx.needs_input_grad[2]:
            grad_2d = grad.reshape(-1, grad.shape[-1])
            grad_student = grad_2d.T @ x.reshape(-1, x.shape[-1])  # (out_S, in_S), as F.linear's weight gradient
            if ctx.side == "input":
                grad_proj = weight.T @ grad_student
            else:
                grad_proj = weight @ grad_student.T
                if bias is not None:
                    grad_proj = grad_proj + torch.outer(bias, grad_2d.sum(0))
            grad_proj = grad_proj.to(ctx.proj_dtype)
        return grad_x, None, grad_proj, None, None


class EmittedStudentWeight(torch.autograd.Function):
    """W_S formed from the teacher weight and P, returned by a wrapper's forward in place of its output (the LM head
    under `RedState.emit_weight`), as one autograd node that also gives its input x a zero gradient.

    The zero gradient ties the node to the module's input, so a sharding engine's module backward hook (DeepSpeed
    ZeRO-3 reduces a leaf module's gradients there) fires after P's gradient exists, not before it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
        """x: the module's input (..., d_S), unused but for its gradient; weight (out, in); proj P (d_T, d_S)."""
        ctx.side, ctx.proj_dtype, ctx.x_meta = side, proj.dtype, (x.shape, x.dtype, x.device)
        ctx.save_for_backward(weight)
        return form_weight(weight, proj, side)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        weight = weight.to(grad.dtype)  # under autocast W_S was formed in grad's dtype from a float32 W_T
        shape, dtype, device = ctx.x_meta
        grad_x = torch.zeros(shape, dtype=dtype, device=device) if ctx.needs_input_grad[0] else None
        grad_proj = None
        if ctx.needs_input_grad[2]:
            grad_proj = (weight.T @ grad if ctx.side == "input" else weight @ grad.T).to(ctx.proj_dtype)
        return grad_x, None, grad_proj, None
