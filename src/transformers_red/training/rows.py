"""The user's dataset as the trainer reads it: the checks made before any teacher pass, the texts calibration and
eRank read from its rows (TRL's formats: language modelling, prompt/completion, conversational, pre-tokenised), and
what a run will train on."""

from __future__ import annotations

import itertools
import math
from typing import Any

from ..data import dataset_token_count


def check_dataset(dataset: Any, args: Any, what: str) -> None:
    """Refuse a missing or empty dataset, or one without a column TRL can train on."""
    if dataset is None:
        raise ValueError(f"{what} is required.")
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"{what} is empty: give at least one text.")
    columns = getattr(dataset, "column_names", None)
    usable = {args.dataset_text_field, "input_ids", "messages", "prompt", "completion"}
    if columns is not None and not usable & set(columns):
        raise ValueError(f"{what} has no {args.dataset_text_field!r} column (columns: {columns}). Rename the "
                         "text column or set RedConfig(dataset_text_field=...).")


def first_texts(dataset: Any, args: Any, count: int, tokenizer: Any = None) -> list[str]:
    """The first `count` rows of `dataset` as texts (language modelling, prompt-completion or conversational)."""
    if hasattr(dataset, "select") and hasattr(dataset, "__len__"):
        rows = dataset.select(range(min(count, len(dataset))))
    elif isinstance(dataset, (list, tuple)):
        rows = dataset[:count]
    else:  # IterableDataset, generators: the first `count` rows
        rows = list(itertools.islice(iter(dataset), count))
    return [_row_text(row, args.dataset_text_field, tokenizer) for row in rows]


def training_data_summary(dataset: Any, given_rows: int | None, args: Any) -> str:
    """One line: the rows given, those TRL dropped, the tokens after tokenisation / truncation / packing, the steps."""
    rows = len(dataset) if hasattr(dataset, "__len__") else None
    tokens = dataset_token_count(dataset)
    parts = [f"{given_rows} rows" if given_rows is not None else "a streamed dataset"]
    if rows is not None and given_rows is not None and rows < given_rows and not args.packing:
        parts.append(f"of which {given_rows - rows} were dropped by TRL (no trained token left after "
                     f"truncation to max_length={args.max_length})")
    if tokens is not None:
        parts.append(f"{tokens:,} tokens after tokenisation"
                     + (f" and truncation to max_length={args.max_length}" if args.max_length else ""))
    if args.packing and rows is not None:
        parts.append(f"packed into {rows} sequences")
    if args.max_steps > 0:
        steps = f"{args.max_steps} steps (max_steps)"
    elif rows is not None:
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        steps = f"{args.num_train_epochs:g} epochs of {math.ceil(rows / per_step)} steps"
    else:
        steps = "until the dataset ends"
    return "Training on " + ", ".join(parts) + f": {steps}."


def _row_text(row: Any, text_field: str, tokenizer: Any) -> str:
    """One dataset row as the text the model reads: the text field, prompt + completion, or a chat rendered with
    the tokenizer's template (TRL's dataset formats)."""
    if not isinstance(row, dict):
        return row
    if text_field in row:
        return row[text_field]
    if "messages" in row:
        return _render(row["messages"], tokenizer)
    if "prompt" in row:
        return _render(row["prompt"], tokenizer) + _render(row.get("completion", ""), tokenizer)
    if "input_ids" in row:  # pre-tokenised: the text these ids spell (calibration and eRank read texts)
        return tokenizer.decode(list(row["input_ids"]))
    raise ValueError(f"Cannot read a text from a row with keys {sorted(row)}: give a {text_field!r} column, "
                     "prompt/completion columns or a messages column.")


def _render(part: Any, tokenizer: Any) -> str:
    if isinstance(part, str):
        return part
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("Conversational data needs a tokenizer with a chat template (processing_class).")
    return tokenizer.apply_chat_template(part, tokenize=False)
