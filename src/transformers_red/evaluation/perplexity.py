"""Step 5 of the pipeline (part): cheap, offline quality measures of a teacher, a RedModel or a merged student."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..adapter.calibrate import materialise_batches
from ..data import position_ids_from_mask


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: Any, tokenizer: Any = None, *, max_length: int = 512,
               batch_size: int = 4) -> float:
    """Token-level perplexity exp(mean NLL) over the non-padding next-token predictions of `data`.

    Works for a plain causal LM and for a `RedModel` (the student pass; wrap in `disable_adapter()` for the
    teacher).
    """
    device = next(model.parameters()).device
    batches = materialise_batches(data, tokenizer, batch_size=batch_size, max_length=max_length,
                                  num_samples=None, seed=None, device=device, what="evaluation text")
    total_nll, total_tokens = 0.0, 0
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                       use_cache=False).logits[:, :-1].float()
        target_mask = (mask[:, 1:] * mask[:, :-1]).bool()
        nll = F.cross_entropy(logits[target_mask], ids[:, 1:][target_mask], reduction="sum")
        total_nll += float(nll)
        total_tokens += int(target_mask.sum())
    if total_tokens == 0:
        raise ValueError("Perplexity needs texts of at least two tokens.")
    return math.exp(total_nll / total_tokens)
