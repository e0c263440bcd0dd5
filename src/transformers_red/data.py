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


def _as_items(data: Any) -> Any:
    """Datasets and sequences as they are; any other iterable (a generator, a pandas Series) as a list."""
    if isinstance(data, (set, frozenset)):
        raise TypeError("The data is a set, which has no order (the selection would change from run to run): "
                        "pass a list.")
    if _is_dataset(data) or isinstance(data, Sequence) or not isinstance(data, Iterable) or isinstance(data, Mapping):
        return data
    return list(data)


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
        bad = next(((i, t) for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"Row {bad[0]} of the {text_column!r} column is {bad[1]!r} ({type(bad[1]).__name__}), "
                            "not a string: drop or fill the empty rows.")
    elif isinstance(data, Sequence) and all(isinstance(t, str) for t in data):
        texts = list(data)
    elif isinstance(data, Sequence) and any(isinstance(t, str) for t in data):
        index, bad = next((i, t) for i, t in enumerate(data) if not isinstance(t, str))
        raise TypeError(f"Item {index} of the texts is {bad!r} ({type(bad).__name__}), not a string: every "
                        "calibration text must be a string (drop or fill the empty rows).")
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
    data = _as_items(data)
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
    for index, batch in enumerate(data):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(f"Item {index} of the data is a {type(batch).__name__}: give texts (strings) or tokenised "
                            "batches (dicts with 'input_ids' and optionally 'attention_mask'), not a mix.")
        ids = torch.as_tensor(batch["input_ids"])
        ids = ids[None] if ids.dim() == 1 else ids
        mask = torch.as_tensor(batch.get("attention_mask", torch.ones_like(ids)))
        mask = mask[None] if mask.dim() == 1 else mask
        if ids.dim() != 2 or mask.shape != ids.shape:
            raise ValueError(f"Batch {index}: input_ids must be (B, T) and attention_mask the same shape; got "
                             f"{tuple(ids.shape)} and {tuple(mask.shape)}.")
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"Batch {index}: attention_mask must hold only 0 and 1, "
                             f"got {sorted(mask.unique().tolist())[:5]}.")
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


def batch_token_count(inputs: Mapping[str, Any]) -> torch.Tensor:
    """Tokens a training batch feeds the model (padding excluded), as a 0-d long tensor.

    Padded batches carry an `attention_mask` (B, T); TRL's packed / padding-free batches carry none: their rows
    are concatenated sequences told apart by `position_ids` (1, N) or flash attention's `cu_seq_lens_q`, and every
    position is a real token.
    """
    if inputs.get("attention_mask") is not None:
        return inputs["attention_mask"].sum()
    if inputs.get("cu_seq_lens_q") is not None:
        return inputs["cu_seq_lens_q"][-1].long()
    return torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)


def dataset_token_count(dataset: Any) -> int | None:
    """Tokens in a tokenised `datasets.Dataset` (the lengths of its `input_ids` rows, read from Arrow without
    building Python lists), or None when it is not one (an iterable dataset, a list)."""
    if "input_ids" not in (getattr(dataset, "column_names", None) or ()):
        return None
    import pyarrow.compute as pc

    if getattr(dataset, "_indices", None) is not None:  # a select()-ed view: count the selected rows only
        return sum(map(len, dataset["input_ids"]))
    return int(pc.sum(pc.list_value_length(dataset.data.column("input_ids"))).as_py() or 0)
