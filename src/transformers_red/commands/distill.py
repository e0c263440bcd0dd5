"""`transformers-red distill`: distil a student from the command line, the way `trl sft` runs.

Flags and YAML keys are TRL's: `ScriptArguments` (dataset_name, dataset_config, dataset_train_split,
dataset_test_split), `ModelConfig` (model_name_or_path, dtype, attn_implementation, model_revision) and every
`RedConfig` field (an `SFTConfig` plus RED's own), so a `trl sft` YAML runs with RED's fields added:

    transformers-red distill --model_name_or_path PATH --dataset_name data.jsonl --output_dir out
    transformers-red distill --config sft.yaml --width_ratio 0.5

Datasets (`--dataset_name`): a Hub id (offline: cached ones only), a local folder (splits from its file names) or
file (.jsonl / .json / .csv / .parquet, or .txt: one row per paragraph), `builtin` (Python documentation
paragraphs) or `reasoning-gym:<task>` (generated worked problems). Every row is trained unless
`--num_train_samples` asks for fewer. Two-column data trains as prompt/completion (loss on the completion) with
`--dataset_prompt_field` / `--dataset_completion_field` (GSM8K: `question` / `answer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import SUBCOMMANDS

HELP = SUBCOMMANDS["distill"]


def _script_arguments_class():
    from trl import ScriptArguments

    @dataclass
    class DistillScriptArguments(ScriptArguments):
        """TRL's dataset arguments, plus the columns of two-column data and row limits."""

        dataset_path: str | None = field(default=None, metadata={
            "help": "A local data file; the same as --dataset_name FILE."})
        dataset_prompt_field: str | None = field(default=None, metadata={
            "help": "Column holding the prompt of two-column data (GSM8K: 'question'); with "
                    "--dataset_completion_field the rows train as prompt/completion, loss on the completion."})
        dataset_completion_field: str | None = field(default=None, metadata={
            "help": "Column holding the completion of two-column data (GSM8K: 'answer')."})
        num_train_samples: int | None = field(default=None, metadata={
            "help": "Train on the first N rows only (default: every row; generated sources: 2000)."})
        num_eval_samples: int | None = field(default=None, metadata={
            "help": "Evaluate on the first N rows of the test split only (default: every row)."})
        dataset_seed: int = field(default=0, metadata={"help": "Seed of generated datasets."})
        license: str | None = field(default=None, metadata={
            "help": "Licence for the model card (with --push_to_hub); default: the teacher card's."})

    return DistillScriptArguments


def _parser():
    from trl import ModelConfig, TrlParser

    from ..training.config import RedConfig

    return TrlParser((_script_arguments_class(), RedConfig, ModelConfig), prog="transformers-red distill")


def build_parser():
    """The `distill` parser (TRL's `TrlParser` over the script, RedConfig and ModelConfig dataclasses)."""
    return _parser()


def _teacher_arguments(config: Any, model_args: Any) -> tuple[str, dict]:
    """The teacher's name and `from_pretrained` keyword arguments, from ModelConfig and RedConfig together."""
    name, red_name = model_args.model_name_or_path, config.teacher_model_name_or_path
    if name and red_name and name != red_name:
        raise SystemExit(f"error: --model_name_or_path {name} and --teacher_model_name_or_path {red_name} name two "
                         "teachers: give one.")
    name = name or red_name
    if name is None:
        raise SystemExit("error: --model_name_or_path is required (the teacher: a local folder, a Hub id in the "
                         "local cache, or 'smollm2').")
    if model_args.use_peft:
        raise SystemExit("error: --use_peft: RED trains its own projections over the frozen teacher, so LoRA cannot "
                         "be stacked on it. Distil first, then fine-tune the merged student with LoRA (trl sft "
                         "--use_peft on the output folder).")
    if getattr(model_args, "trust_remote_code", False):  # a ModelConfig field in some TRL releases
        raise SystemExit("error: --trust_remote_code: transformers_red loads teachers of the supported "
                         "architectures with their transformers classes only, and never runs remote code.")
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise SystemExit("error: --load_in_4bit / --load_in_8bit: RED forms the student from the teacher's weights, "
                         "which quantised layers do not expose; load the teacher in bfloat16 (--dtype bfloat16).")
    kwargs = dict(config.teacher_model_init_kwargs or {})
    if model_args.dtype not in (None, "float32") or "dtype" not in kwargs:
        kwargs["dtype"] = model_args.dtype
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.model_revision not in (None, "main"):
        kwargs["revision"] = model_args.model_revision
    return name, kwargs


def _load_split(script: Any, config: Any, split: str, num_samples: int | None) -> Any:
    from ..loading import load_text_dataset

    path = script.dataset_path
    name = script.dataset_name if path is None else None
    if path is not None and script.dataset_name is not None:
        raise SystemExit("error: give the data once: --dataset_name (a Hub id, folder or file) or --dataset_path.")
    if path is None and name is None:
        raise SystemExit("error: --dataset_name is required (a Hub id, a local folder or .jsonl/.json/.csv/.parquet/"
                         ".txt file, 'builtin' or 'reasoning-gym:<task>').")
    dataset = load_text_dataset(path, name, config=script.dataset_config, split=split, num_samples=num_samples,
                                seed=script.dataset_seed, text_field=config.dataset_text_field)
    return _as_trl_columns(dataset, script, config, split)


def _as_trl_columns(dataset: Any, script: Any, config: Any, split: str) -> Any:
    """Rename two-column data to TRL's prompt/completion; refuse data without a usable column, naming the flags."""
    columns = list(dataset.column_names)
    pair = (script.dataset_prompt_field, script.dataset_completion_field)
    if any(pair):
        if not all(pair):
            raise SystemExit("error: prompt/completion data needs both --dataset_prompt_field and "
                             "--dataset_completion_field.")
        missing = [c for c in pair if c not in columns]
        if missing:
            raise SystemExit(f"error: the {split!r} split has no column {missing[0]!r} (columns: {columns}); set "
                             "--dataset_prompt_field / --dataset_completion_field to its prompt and completion "
                             "columns.")
        keep = dataset.select_columns(list(pair))
        return keep.rename_columns({pair[0]: "prompt", pair[1]: "completion"}) if pair != ("prompt", "completion") \
            else keep
    usable = {config.dataset_text_field, "messages", "input_ids"}
    if not usable & set(columns) and not {"prompt", "completion"} <= set(columns):
        raise SystemExit(f"error: the {split!r} split has no {config.dataset_text_field!r} column (columns: "
                         f"{columns}). Name the text column with --dataset_text_field, or for two-column data "
                         "(e.g. GSM8K's question/answer) pass --dataset_prompt_field question "
                         "--dataset_completion_field answer.")
    return dataset


def run_distill(argv: Sequence[str] | None = None) -> Any:
    """Parse flags (and `--config file.yaml`), check the data, train, and write the merged student."""
    from ..loading import LoadError, load_model
    from ..training.trainer import RedDistillationTrainer

    script, config, model_args = _parser().parse_args_and_config(args=argv)
    if not any(str(a).lstrip("-").replace("-", "_").startswith("keep_freed_cpu_memory") for a in argv or []):
        config.keep_freed_cpu_memory = True  # this process is the command's: see RedConfig.keep_freed_cpu_memory
    name, init_kwargs = _teacher_arguments(config, model_args)
    evaluates = config.eval_strategy != "no"
    try:  # the data first: a bad column or split fails before the teacher loads
        train_dataset = _load_split(script, config, script.dataset_train_split, script.num_train_samples)
        eval_dataset = (_load_split(script, config, script.dataset_test_split, script.num_eval_samples)
                        if evaluates else None)
        print(f"Training data: {len(train_dataset)} rows from the {script.dataset_train_split!r} split"
              + ("" if script.num_train_samples is None else f" (--num_train_samples {script.num_train_samples})")
              + (f"; evaluation: {len(eval_dataset)} rows from {script.dataset_test_split!r}" if evaluates else ""),
              flush=True)
        teacher, tokenizer = load_model(name, dtype=init_kwargs.pop("dtype", None), init_kwargs=init_kwargs)
    except LoadError as err:
        raise SystemExit(f"error: {err}") from err
    config.teacher_model_name_or_path = name  # recorded in the run identity and the card; loaded above
    trainer = RedDistillationTrainer(model=teacher, args=config, train_dataset=train_dataset,
                                     eval_dataset=eval_dataset, processing_class=tokenizer)
    print(trainer.training_data_summary_line(), flush=True)
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
    """`--resume_from_checkpoint true` means the newest complete checkpoint (as in TRL's scripts); a path stays a
    path."""
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "last"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0", ""):
        return None
    return value


def main(argv: Sequence[str] | None = None) -> int:
    run_distill(argv)
    return 0
