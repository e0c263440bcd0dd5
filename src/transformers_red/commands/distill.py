"""`transformers-red distill`: distil a student from the command line (every RedConfig field is a flag).

    transformers-red distill --teacher_model_name_or_path PATH --dataset_path data.jsonl --output_dir out
    transformers-red distill --config red.yaml

Datasets: a local `.jsonl` / `.json` file (field `--dataset_text_field`, default "text"), a `.txt` file (one
text per blank-line-separated paragraph), or an in-memory name that works offline: `builtin` (Python
documentation paragraphs) or `reasoning-gym:<task>` (e.g. `reasoning-gym:gsm_symbolic`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..loading import LoadError, load_model, load_text_dataset
from ..training.config import RedConfig


@dataclass
class DistillScriptArguments:
    """Where the training texts come from."""

    dataset_path: str | None = field(default=None, metadata={"help": "Local .jsonl/.json or .txt file."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "Offline in-memory dataset: 'builtin' or 'reasoning-gym:<task>'."})
    num_train_samples: int = field(default=2000, metadata={"help": "Texts to generate / keep at most."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of generated datasets."})
    license: str | None = field(default=None, metadata={
        "help": "Licence for the model card (with --push_to_hub); default: the teacher card's."})


HELP = "Distil a student (every RedConfig field is a flag; --config file.yaml)."


def run_distill(argv: Sequence[str] | None = None) -> Any:
    """Parse flags (and `--config file.yaml`), train, and write the merged student to `--output_dir`."""
    from trl import TrlParser

    from ..training.trainer import RedDistillationTrainer

    parser = TrlParser((DistillScriptArguments, RedConfig), prog="transformers-red distill")
    script, config = parser.parse_args_and_config(args=argv)
    if not any(str(a).lstrip("-").replace("-", "_").startswith("keep_freed_cpu_memory") for a in argv or []):
        config.keep_freed_cpu_memory = True  # this process is the command's: see RedConfig.keep_freed_cpu_memory
    if config.teacher_model_name_or_path is None:
        raise SystemExit("error: --teacher_model_name_or_path is required (a local folder, or 'smollm2').")
    try:
        train_dataset = load_text_dataset(script.dataset_path, script.dataset_name,
                                          num_samples=script.num_train_samples, seed=script.dataset_seed,
                                          text_field=config.dataset_text_field)
        teacher, tokenizer = load_model(config.teacher_model_name_or_path,
                                        init_kwargs=config.teacher_model_init_kwargs)
    except LoadError as err:
        raise SystemExit(f"error: {err}") from err
    trainer = RedDistillationTrainer(model=teacher, args=config, train_dataset=train_dataset,
                                     processing_class=tokenizer)
    if script.license:
        trainer.card_kwargs = {"license": script.license}
    trainer.train(resume_from_checkpoint=_resume_flag(config.resume_from_checkpoint))
    trainer.save_model(config.output_dir)
    summary = trainer.red_summary()
    architecture = type(trainer.model if config.train == "weights" else trainer.red_model.base_model).__name__
    print(f"Saved a plain {architecture} student of width {summary['student_hidden_size']} "
          f"(teacher {summary['teacher_hidden_size']}, train={config.train}) to {config.output_dir}")
    return trainer


def _resume_flag(value: str | None) -> str | bool | None:
    """`--resume_from_checkpoint true` means the newest complete checkpoint (as in TRL's scripts); a path stays a path."""
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "last"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0", ""):
        return None
    return value


def main(argv: Sequence[str] | None = None) -> int:
    run_distill(argv)
    return 0
