"""`ERankCallback`: watch the student's effective rank during distillation (RED's collapse alarm)."""

from __future__ import annotations

import json
import logging
import os
import statistics
from typing import Any

from transformers import TrainerCallback

from ..constants import ERANK_NAME
from ..evaluation.erank import layerwise_effective_rank
from .distributed import reshard

logger = logging.getLogger(__name__)


class ERankCallback(TrainerCallback):
    """Every `every_steps` steps, measure the student's per-layer eRank on a fixed held-out batch.

    The teacher is measured once (through `disable_adapter()`, no second copy; or `teacher_model` when the student
    is a plain model). Logs `erank/mean`,
    `erank/min`, `erank/min_layer`, `erank/teacher_mean` and `erank/ratio`; warns when the ratio of student to
    teacher mean eRank falls below `collapse_ratio`; keeps the history in `erank.json` in the output folder.

    Args:
        texts: held-out texts (or tokenised batches) to measure on.
        tokenizer: their tokenizer.
        every_steps: interval in optimizer steps (also measured at step 0 and at the end).
        collapse_ratio: alarm threshold on student mean / teacher mean.
    """

    def __init__(self, texts: Any, tokenizer: Any, every_steps: int, collapse_ratio: float = 0.5,
                 max_length: int = 256):
        self.texts, self.tokenizer = texts, tokenizer
        self.every_steps, self.collapse_ratio, self.max_length = every_steps, collapse_ratio, max_length
        self.trainer: Any = None  # set by RedDistillationTrainer, used to log
        self.teacher_model: Any = None  # measured as the teacher when set; else model.disable_adapter()
        self.main_process_only = True  # False under FSDP / ZeRO-3, whose forwards are collectives
        self.teacher: list[float] | None = None
        self.history: list[dict[str, Any]] = []

    def measure(self, model: Any, step: int) -> dict[str, Any]:
        """Measure the student (and the teacher, once) and append to the history."""
        was_training = model.training
        model.eval()
        try:
            if self.teacher is None and self.teacher_model is not None:  # a plain student (train="weights")
                self.teacher = layerwise_effective_rank(self.teacher_model, self.texts, self.tokenizer,
                                                        max_length=self.max_length)
            elif self.teacher is None:
                with model.disable_adapter():
                    self.teacher = layerwise_effective_rank(model, self.texts, self.tokenizer,
                                                            max_length=self.max_length)
            student = layerwise_effective_rank(model, self.texts, self.tokenizer, max_length=self.max_length)
        finally:
            model.train(was_training)
            reshard(model)  # FSDP2: forwards without a backward leave the root unit's weights gathered
        mean, teacher_mean = statistics.fmean(student), statistics.fmean(self.teacher)
        record = {"step": step, "student": student, "mean": mean, "min": min(student),
                  "min_layer": student.index(min(student)), "teacher_mean": teacher_mean,
                  "ratio": mean / teacher_mean}
        self.history.append(record)
        if record["ratio"] < self.collapse_ratio:
            logger.warning("eRank collapse at step %d: student mean eRank %.2f is %.0f%% of the teacher's %.2f "
                           "(alarm below %.0f%%). Random-init projections cause this (RED paper); check init and "
                           "temperature.", step, mean, 100 * record["ratio"], teacher_mean, 100 * self.collapse_ratio)
        return record

    def write(self, output_dir: str) -> str:
        """Write `erank.json` (teacher per-layer eRank and the student history) atomically."""
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, ERANK_NAME)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"teacher": self.teacher, "history": self.history}, f, indent=1)
        os.replace(path + ".tmp", path)
        return path

    def _step(self, state: Any, model: Any) -> None:
        if self.main_process_only and not state.is_world_process_zero:
            return
        if self.history and self.history[-1]["step"] == state.global_step:
            return
        record = self.measure(model, state.global_step)
        if self.trainer is not None:  # joins the next regular log line (Trainer.log averages _metrics)
            for key in ("mean", "min", "min_layer", "teacher_mean", "ratio"):
                self.trainer._metrics["train"][f"erank/{key}"] = [record[key]]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._step(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_steps and state.global_step % self.every_steps == 0:
            self._step(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._step(state, model)
        if state.is_world_process_zero:
            self.write(args.output_dir)

    def load(self, output_dir: str) -> None:
        """Restore the history from a checkpoint folder's `erank.json` (when resuming)."""
        path = os.path.join(output_dir, ERANK_NAME)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            self.teacher, self.history = data.get("teacher"), list(data.get("history", []))
