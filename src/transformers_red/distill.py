"""`transformers-red distill`: distil a student from the command line (every RedConfig field is a flag).

    transformers-red distill --teacher_model_name_or_path PATH --dataset_path data.jsonl --output_dir out
    transformers-red distill --config red.yaml

Datasets: a local `.jsonl` / `.json` file (field `--dataset_text_field`, default "text"), a `.txt` file (one
text per blank-line-separated paragraph), or an in-memory name that works offline: `builtin` (Python
documentation paragraphs) or `reasoning-gym:<task>` (e.g. `reasoning-gym:gsm_symbolic`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import datasets

from .red_config import RedConfig


@dataclass
class DistillScriptArguments:
    """Where the training texts come from."""

    dataset_path: str | None = field(default=None, metadata={"help": "Local .jsonl/.json or .txt file."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "Offline in-memory dataset: 'builtin' or 'reasoning-gym:<task>'."})
    num_train_samples: int = field(default=2000, metadata={"help": "Texts to generate / keep at most."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of generated datasets."})


def load_texts(script: DistillScriptArguments, text_field: str) -> datasets.Dataset:
    """The training set as a `datasets.Dataset` with a `text_field` column; raises on unusable input."""
    if (script.dataset_path is None) == (script.dataset_name is None):
        raise SystemExit("error: give exactly one of --dataset_path FILE and --dataset_name NAME.")
    if script.dataset_path is not None:
        path = script.dataset_path
        if not os.path.isfile(path):
            raise SystemExit(f"error: --dataset_path {path} does not exist.")
        if path.endswith((".jsonl", ".json")):
            dataset = datasets.load_dataset("json", data_files=path, split="train")
        else:
            with open(path, encoding="utf-8") as f:
                paragraphs = [p.strip() for p in f.read().split("\n\n") if p.strip()]
            dataset = datasets.Dataset.from_dict({text_field: paragraphs})
        return dataset.select(range(min(len(dataset), script.num_train_samples)))
    from .resources import builtin_texts, reasoning_texts

    name = script.dataset_name
    if name == "builtin":
        texts = builtin_texts(script.num_train_samples)
    elif name.startswith("reasoning-gym:"):
        texts = reasoning_texts(script.num_train_samples, seed=script.dataset_seed, task=name.split(":", 1)[1])
    else:
        raise SystemExit(f"error: unknown --dataset_name {name!r}; use 'builtin' or 'reasoning-gym:<task>', or "
                         "--dataset_path for a local file.")
    return datasets.Dataset.from_dict({text_field: texts})


def run_distill(argv: list[str] | None = None) -> Any:
    """Parse flags (and `--config file.yaml`), train, and write the merged student to `--output_dir`."""
    from trl import TrlParser

    from .cli import load_teacher
    from .red_trainer import RedDistillationTrainer

    parser = TrlParser((DistillScriptArguments, RedConfig), prog="transformers-red distill")
    script, config = parser.parse_args_and_config(args=argv)
    if config.teacher_model_name_or_path is None:
        raise SystemExit("error: --teacher_model_name_or_path is required (a local folder, or 'smollm2').")
    train_dataset = load_texts(script, config.dataset_text_field)
    teacher, tokenizer = load_teacher(config.teacher_model_name_or_path, init_kwargs=config.teacher_model_init_kwargs)
    trainer = RedDistillationTrainer(model=teacher, args=config, train_dataset=train_dataset,
                                     processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    summary = trainer.red_summary()
    architecture = type(trainer.model if config.train == "weights" else trainer.red_model.base_model).__name__
    print(f"Saved a plain {architecture} student of width {summary['student_hidden_size']} "
          f"(teacher {summary['teacher_hidden_size']}, train={config.train}) to {config.output_dir}")
    return trainer
