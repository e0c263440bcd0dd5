"""Step 1 of the pipeline: calibrate. Run the frozen teacher over a few texts and score residual channels.

RED's score of channel j (docs/method.md section 4): for each hidden state l (embedding output and every decoder
layer, as `output_hidden_states` gives them) and each sequence n, the mean over valid tokens of
|h[l, n, t, j]|; then the L2 norm over sequences; then the mean over layers. Accumulated in float64 with
O((L + 1) x d_T) memory whatever the token count; padding never counts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import iter_batches, position_ids_from_mask
from .architectures import model_layout


@dataclass
class ActivationStats:
    """Teacher activation statistics from calibration.

    Attributes:
        per_layer: (L + 1, d_T) float64, L2 norm over sequences of the per-sequence mean |h|.
        num_sequences: sequences that had at least one non-padding token.
        num_tokens: non-padding tokens seen.
    """

    per_layer: torch.Tensor
    num_sequences: int
    num_tokens: int

    @property
    def scores(self) -> torch.Tensor:
        """(d_T,) float64 RED channel scores: `per_layer` averaged over layers."""
        return self.per_layer.mean(0)


def hidden_state_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules whose outputs are `output_hidden_states`: embedding, layers 0..L-2, and the final norm.

    (transformers puts the final RMSNorm's output in place of the last layer's raw output.)
    """
    layout = model_layout(model)
    return [model.get_submodule(n) for n in (layout.embedding, *layout.layers[:-1], layout.final_norm)]


@contextlib.contextmanager
def record_hidden_states(model: torch.nn.Module, sink: list[torch.Tensor | None]):
    """While active, `sink[l]` holds the latest hidden state l ((B, T, d) tensor) of `model`'s forward."""
    modules = hidden_state_modules(model)
    sink[:] = [None] * len(modules)

    def make_hook(index: int):
        def hook(_module, _inputs, output):
            sink[index] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(modules)]
    try:
        yield sink
    finally:
        for h in handles:
            h.remove()


def materialise_batches(data: Any, tokenizer: Any, *, batch_size: int, max_length: int,
                        num_samples: int | None, seed: int | None, device: Any,
                        what: str = "calibration data",
                        vocab_size: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Tokenise everything up front (cheap) so bad input fails before the first forward (expensive).

    `vocab_size`: the model's; token ids at or above it are refused here rather than as an IndexError in the
    embedding."""
    if tokenizer is not None and vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size}: "
                         "use the teacher's own tokenizer (or resize the teacher's embeddings before wrapping it).")
    # checked on the CPU, then moved: no device synchronisation per batch for the checks
    batches = list(iter_batches(data, tokenizer, batch_size=batch_size, max_length=max_length,
                                num_samples=num_samples, seed=seed, device="cpu"))
    if vocab_size is not None:
        top = max(int(b["input_ids"].max()) for b in batches if b["input_ids"].numel()) if batches else 0
        if top >= vocab_size or min(int(b["input_ids"].min()) for b in batches if b["input_ids"].numel()) < 0:
            raise ValueError(f"The {what} holds token ids outside [0, {vocab_size}) (largest {top}): it was "
                             "tokenised for another vocabulary than the model's.")
    if not batches or sum(int(b["attention_mask"].sum()) for b in batches) == 0:
        raise ValueError(f"The {what} has no non-padding tokens (attention_mask is all zeros); give texts "
                         "with content or fix the attention_mask.")
    return [{key: value.to(device) for key, value in batch.items()} for batch in batches]


def teacher_context(model: torch.nn.Module):
    """`model.disable_adapter()` for a RedModel (teacher pass), a no-op for a plain model."""
    return model.disable_adapter() if getattr(model, "is_red_model", False) else contextlib.nullcontext()


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a RedModel, or the model itself."""
    return model.base_model if getattr(model, "is_red_model", False) else model


@torch.no_grad()
def collect_activation_stats(model: torch.nn.Module, data: Any, tokenizer: Any = None, *,
                             num_samples: int | None = 15, max_length: int = 2048, batch_size: int = 4,
                             seed: int | None = None, show_progress_bar: bool = True) -> ActivationStats:
    """Run the teacher once over `data` and accumulate RED's channel statistics.

    Args:
        model: the teacher (a `PreTrainedModel` of a supported architecture, or a `RedModel`, whose teacher
            pass is used).
        data: list of strings, `datasets.Dataset` with a "text" column, or an iterable of dicts with
            `input_ids` (B, T) and optionally `attention_mask` (B, T).
        tokenizer: needed for strings and datasets.
        num_samples: how many texts (or sequences of tokenised batches) to use; None for all.
    """
    hf_model = plain_model(model)
    device = next(hf_model.parameters()).device
    # the batches stay on the CPU, where the bookkeeping reads them without a device synchronisation
    batches = materialise_batches(data, tokenizer, batch_size=batch_size, max_length=max_length,
                                  num_samples=num_samples, seed=seed, device="cpu",
                                  vocab_size=hf_model.config.get_text_config().vocab_size)
    sumsq: torch.Tensor | None = None
    num_sequences = num_tokens = 0
    sink: list[torch.Tensor | None] = []
    with teacher_context(model), record_hidden_states(hf_model, sink):
        for batch in tqdm(batches, desc="Calibrating", disable=not show_progress_bar):
            valid = batch["attention_mask"].sum(1) > 0
            if not valid.any():
                continue
            num_sequences += int(valid.sum())
            num_tokens += int(batch["attention_mask"].sum())
            mask, valid = batch["attention_mask"].to(device), valid.to(device)
            hf_model.get_decoder()(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                                   position_ids=position_ids_from_mask(mask), use_cache=False)
            m = mask[valid].to(torch.float64).unsqueeze(-1)  # (B', T, 1)
            means = torch.stack([(h[valid].abs().to(torch.float64) * m).sum(1) / m.sum(1) for h in sink])
            sumsq = (means ** 2).sum(1) if sumsq is None else sumsq + (means ** 2).sum(1)
    return ActivationStats(per_layer=sumsq.sqrt().cpu(), num_sequences=num_sequences, num_tokens=num_tokens)


def select_channels(scores: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """Indices of the `hidden_size` highest-scoring channels, sorted ascending.

    Ties go to the lower channel index (stable sort), so the choice is deterministic.

    Args:
        scores: (d_T,) channel scores.
    Returns:
        (hidden_size,) long.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D tensor of per-channel scores, got shape {tuple(scores.shape)}.")
    if not 0 < hidden_size < scores.numel():
        raise ValueError(f"Cannot select {hidden_size} of {scores.numel()} channels: need 0 < d_S < d_T.")
    if not torch.isfinite(scores).all():
        raise ValueError("Channel scores contain NaN or inf: the teacher's activations overflowed during "
                         "calibration (try float32 or shorter calibration texts).")
    order = torch.sort(-scores.to(torch.float64), stable=True).indices[:hidden_size]
    return torch.sort(order).values
