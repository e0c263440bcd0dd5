"""Turn what users hand us (strings, a `datasets.Dataset`, or tokenised batches) into padded batches.

Calibration and eRank measurement both need the same thing: batches of `input_ids` with an
`attention_mask`, so that padding never counts in a statistic.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

TextData = Sequence[str] | Any  # list of strings, datasets.Dataset, or an iterable of tokenised batches


def _is_dataset(data: Any) -> bool:
    return hasattr(data, "column_names") and hasattr(data, "select")


def check_not_empty(data: Any, what: str = "calibration data") -> None:
    """Raise a clear error for empty input before any model is run."""
    if data is None:
        raise ValueError(f"No {what} given. Pass a list of strings, a datasets.Dataset with a text column, or "
                         "an iterable of tokenised batches (dicts with input_ids and attention_mask).")
    if isinstance(data, str):
        raise TypeError(f"{what} must be a list of strings, not a single string; wrap it: [text].")
    if hasattr(data, "__len__") and len(data) == 0:
        raise ValueError(f"The {what} is empty: give at least one text.")


def select_texts(data: Any, num_samples: int | None, seed: int | None = None,
                 text_column: str = "text") -> list[str] | None:
    """Return up to `num_samples` texts from a list of strings or a Dataset, or None for tokenised batches.

    `seed=None` takes the first texts (deterministic, recorded); an integer draws them at random.
    """
    if _is_dataset(data):
        if text_column not in data.column_names:
            raise ValueError(f"The dataset has no {text_column!r} column (columns: {data.column_names}); "
                             "pass text_column=... or a list of strings.")
        texts = data[text_column]
    elif isinstance(data, Sequence) and all(isinstance(t, str) for t in data):
        texts = list(data)
    else:
        return None
    if num_samples is not None and len(texts) > num_samples:
        if seed is None:
            texts = texts[:num_samples]
        else:
            texts = [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), num_samples))]
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("Every calibration text is empty or whitespace; give texts with content.")
    return list(texts)


def iter_batches(data: Any, tokenizer: Any = None, *, batch_size: int = 4, max_length: int = 2048,
                 num_samples: int | None = None, seed: int | None = None, text_column: str = "text",
                 device: torch.device | str | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Yield `{"input_ids": (B, T) long, "attention_mask": (B, T) long}` batches on `device`.

    Strings are tokenised with `tokenizer` (right padding, truncation at `max_length`); tokenised batches are
    passed through, with an all-ones mask added when they have none.
    """
    check_not_empty(data)
    texts = select_texts(data, num_samples, seed, text_column)
    if texts is not None:
        if tokenizer is None:
            raise ValueError("Texts need a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...).")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length, padding_side="right")
            yield {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"Unsupported data of type {type(data).__name__}: give a list of strings, a "
                        "datasets.Dataset, or an iterable of dicts with input_ids (and attention_mask).")
    count = 0
    for batch in data:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError("Each tokenised batch must be a dict with 'input_ids' (and 'attention_mask').")
        ids = torch.as_tensor(batch["input_ids"])
        ids = ids[None] if ids.dim() == 1 else ids
        mask = torch.as_tensor(batch.get("attention_mask", torch.ones_like(ids))).reshape(ids.shape)
        yield {"input_ids": ids[:, :max_length].to(device), "attention_mask": mask[:, :max_length].to(device)}
        count += ids.shape[0]
        if num_samples is not None and count >= num_samples:
            return


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore padding, so left- and right-padded batches see the same positions.

    Args:
        attention_mask: (B, T) 0/1.
    Returns:
        (B, T) long.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
