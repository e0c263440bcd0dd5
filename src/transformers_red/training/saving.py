"""Steps 3 to 6 of the pipeline (part): what a RED run writes and reads back: checkpoints (the adapter, or the
plain student with train="weights", the run state, the engine's optimizer state) written atomically, resume, the
merged student's export, the model card and the push to the Hub. Under FSDP2 / DeepSpeed every rank takes part in
the gathers and rank 0 writes.

`RedSavingMixin` is one base of `RedDistillationTrainer` (before TRL's `SFTTrainer`, whose methods it overrides);
it reads the trainer's RED state (`_adapter_config`, `_run_identity`, `_erank_callback`, ...).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerState
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_utils import TrainOutput

from ..adapter.merge import outside_zero3_init, record_summary, student_config, tied_parameter_names
from ..constants import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    ERANK_NAME,
    EXPORT_INCOMPLETE_NAME,
    LEGACY_SUMMARY_NAME,
    LOSS_SETTINGS,
    STUDENT_SUMMARY_NAME,
    STUDENT_WEIGHTS_NAME,
)
from .checkpoints import (
    RUN_STATE_NAME,
    checkpoint_problem,
    last_complete_checkpoint,
    read_run_state,
    required_files,
    write_run_state,
)
from .distributed import barrier, reshard, whole_parameters

logger = logging.getLogger(__name__)
_LOW_DISK_BYTES = 256 * 2**20  # a failed save with less free space than this is reported as a full disk


class RedSavingMixin:
    """Checkpoints, resume, export and push of a `RedDistillationTrainer` (see the module docstring)."""

    # `build_model_card` arguments for every card this trainer writes or pushes (license, language, ...), under
    # those given to push_to_hub / create_model_card: how `transformers-red distill --license` reaches the card
    card_kwargs: dict[str, Any] | None = None

    def _get_output_dir(self, trial):
        staging = getattr(self, "_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """Write the checkpoint into a staging folder, then rename it: a crash never leaves a half checkpoint."""
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        self._staging_dir = os.path.join(run_dir, f".staging-{name}")
        shutil.rmtree(self._staging_dir, ignore_errors=True)
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:  # written before the rename: a checkpoint folder always has it
                write_run_state(os.path.join(self._staging_dir, name), self._run_identity, self._total_train_tokens)
        except (OSError, RuntimeError) as err:  # torch reports a full disk as "basic_ios::clear: iostream error"
            free = shutil.disk_usage(run_dir).free
            raise OSError(errno.ENOSPC if free < _LOW_DISK_BYTES else getattr(err, "errno", None) or errno.EIO,
                          f"Saving {name} into {run_dir} failed ({type(err).__name__}: {err}); {free / 2**20:.0f} MB "
                          f"are free there{' (the disk is probably full)' if free < _LOW_DISK_BYTES else ''}. Earlier "
                          f"checkpoints are intact; the partial one is in {self._staging_dir} and is never resumed "
                          "from.") from err
        finally:
            staging, self._staging_dir = self._staging_dir, None
        barrier()  # every rank has written its files (RNG state, shards) into the staging folder
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            if self.args.push_to_hub:
                self._push_checkpoint(final)
            for attr in ("best_model_checkpoint",):
                value = getattr(self.state, attr)
                if value and value.startswith(staging):
                    setattr(self.state, attr, final + value[len(os.path.join(staging, name)):])
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        barrier()  # no rank goes on (or resumes) before the checkpoint is in place

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under FSDP Trainer also writes the whole wrapped model (`save_fsdp_model`: the frozen teacher, pickled, in
        every checkpoint); a RED checkpoint's model state is its adapter file (with train="weights" the student's
        safetensors), so only the optimizer and the scheduler are written here."""
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import save_fsdp_optimizer

        reshard(self.model)  # the optimizer's sharded parameters must be the registered ones
        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model,
                            output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Trainer's per-save push would upload `output_dir` (tokenizer, `training_args.bin`, TRL's card) from the
        staging folder; RED pushes the finished checkpoint itself (`_push_checkpoint`), after the rename."""

    def _push_checkpoint(self, folder: str) -> None:
        """`hub_strategy` as Trainer reads it, with RED's files: every_save and checkpoint push the checkpoint into
        `last-checkpoint/` (every_save: the adapter only; checkpoint: everything a resume needs), all_checkpoints
        into `checkpoint-N/`, end nothing. Never `training_args.bin` (it pickles the token). A failed upload is
        logged and training goes on: the local checkpoint is intact."""
        strategy = str(getattr(self.args.hub_strategy, "value", self.args.hub_strategy))
        if strategy == "end" or not self.is_world_process_zero():
            return
        from huggingface_hub import HfApi

        if strategy == "every_save":
            files = [ADAPTER_CONFIG_NAME, STUDENT_WEIGHTS_NAME if self._trains_weights else ADAPTER_WEIGHTS_NAME,
                     RUN_STATE_NAME, ERANK_NAME]
        else:  # what a resume elsewhere needs
            files = [*required_files(self._trains_weights), "rng_state*.pth", ERANK_NAME]
        target = os.path.basename(folder) if strategy == "all_checkpoints" else "last-checkpoint"
        try:
            HfApi(token=self.args.hub_token).upload_folder(
                repo_id=self.hub_model_id, folder_path=folder, path_in_repo=target, allow_patterns=files,
                commit_message=f"Training in progress, step {self.state.global_step}", revision=self.args.hub_revision)
        except Exception as err:  # the Hub's answer: training goes on, the checkpoint is on disk
            logger.warning("Pushing %s to %s failed (%s: %s); the local checkpoint is intact.", folder,
                           self.hub_model_id, type(err).__name__, err)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoint: the adapter state (projections, norm gains, config with the selected channels)."""
        output_dir = output_dir or self.args.output_dir
        if self._trains_weights:  # a plain model: Trainer's own save (safetensors, tokenizer)
            super()._save(output_dir, state_dict)
            if self.args.should_save:
                self._adapter_config.save_pretrained(output_dir)  # the channel selection, checked on resume
        else:
            red = self.red_model
            adapter = red.adapter_state_dict()  # every rank takes part: it gathers FSDP2 / ZeRO-3 shards
            if self.args.should_save:
                red.save_pretrained(output_dir, adapter_state=adapter)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)
        if self._erank_callback is not None and self.args.should_save:
            self._erank_callback.write(output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (`_internal_call`) keep the adapter state; otherwise write the merged, plain student."""
        if _internal_call and self._trains_weights and not self._uses_sharding_engine:
            return super().save_model(output_dir, _internal_call=True)
        if _internal_call and self._trains_weights:
            # the plain student gathered whole, written as one process writes it (Trainer's FSDP save writes
            # engine shards, or nothing of ours with SHARDED_STATE_DICT; its ZeRO-3 save needs 16-bit consolidation)
            state = self._full_student_state()
            if self.args.should_save:
                self._save(output_dir, state_dict=state)
            return None
        if _internal_call:
            # the adapter alone, gathered on every rank; Trainer's FSDP / DeepSpeed save would first gather the whole
            # wrapped model, frozen teacher included, onto the saving rank (and, FSDP, skip `_save` unless the state
            # dict type is FULL_STATE_DICT)
            return self._save(output_dir)
        output_dir = output_dir or self.args.output_dir
        student = self._gathered_student()
        if self.args.should_save:
            self.export_student(output_dir, student)
        barrier()  # the export is complete before any rank reads or pushes it
        if self.args.push_to_hub:  # as Trainer.save_model does: the merged student, with the RED card
            self.push_to_hub(commit_message="Model save")

    def _full_student_state(self) -> dict[str, torch.Tensor] | None:
        """train="weights": the plain student's full state dict (CPU) on the process that saves, None on the others.
        A collective under FSDP2 / ZeRO-3: every rank calls it."""
        model = self.accelerator.unwrap_model(self.model)
        if self.is_fsdp_enabled:  # a module's state_dict() stays sharded under FSDP2, even with its units gathered
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            reshard(model)
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            with whole_parameters(model):
                state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} \
                    if self.args.should_save else None
        return state if self.args.should_save else None

    def _load_full_student_state(self, checkpoint: str) -> None:
        """train="weights" under FSDP2: the student's safetensors into this rank's shards (every rank reads it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = load_file(os.path.join(checkpoint, STUDENT_WEIGHTS_NAME))
        model = self.accelerator.unwrap_model(self.model)
        reshard(model)
        # not strict: save_pretrained leaves a tied head's weight out; any other gap is refused
        result = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        missing = sorted(set(result.missing_keys) - tied_parameter_names(model))
        if missing or result.unexpected_keys:
            raise ValueError(f"{os.path.join(checkpoint, STUDENT_WEIGHTS_NAME)} does not fit the student being "
                             f"trained: missing {missing[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}.")

    def _gathered_student(self) -> Any:
        """The merged student on the process that saves (None on the others). Under FSDP / ZeRO-3 every rank gathers
        the weights and merges, since the merge's own check runs a forward, a collective there. With
        train="weights" there a plain copy is built from the gathered state (the trained model's own parameters
        are shards, and writing them on one rank would run a collective on one rank)."""
        sharded = self._uses_sharding_engine
        if self._trains_weights and sharded:
            state = self._full_student_state()
            if state is None:
                return None
            model = self.accelerator.unwrap_model(self.model)
            with outside_zero3_init():
                student = AutoModelForCausalLM.from_config(model.config)
            student.load_state_dict(state, assign=True)  # a tied head's weight is in the gathered state too
            student.tie_weights()
            return student.eval()
        student = None
        with whole_parameters(self.model):
            if self.args.should_save or sharded:
                student = self.merged_student()
        return student if self.args.should_save else None

    def export_student(self, output_dir: str, student: Any = None) -> Any:
        """Merge and write a plain student (safetensors, config, generation config, tokenizer) plus
        `red_summary.json` and `erank.json`.

        Atomic as a whole: files are written to a staging folder; while they are moved in, a marker file
        (`.red_export_incomplete`) says the folder is not a finished export (push and `load_model` refuse it); the
        summary, with the size of every file of the export, is moved in last and the marker removed after it. Weight
        files of an earlier export that this one does not have (other shards) are removed. `student`: the merged
        student when the caller has it (`save_model` gathers it on every rank of a sharded run); default: merge now.
        """
        os.makedirs(output_dir, exist_ok=True)
        staging = os.path.join(output_dir, ".staging-student")
        shutil.rmtree(staging, ignore_errors=True)
        student = student if student is not None else self.merged_student()
        summary = self.red_summary()
        record_summary(student, summary)  # config.json carries it too: the student keeps it however it is re-saved
        student.save_pretrained(staging)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(staging)
        if self._erank_callback is not None and self._erank_callback.teacher is not None:
            self._erank_callback.write(staging)
        files = {name: os.path.getsize(os.path.join(staging, name)) for name in sorted(os.listdir(staging))}
        with open(os.path.join(staging, STUDENT_SUMMARY_NAME), "w", encoding="utf-8") as f:
            json.dump({**summary, "files": files}, f, indent=2)
        marker = os.path.join(output_dir, EXPORT_INCOMPLETE_NAME)
        with open(marker, "w", encoding="utf-8") as f:
            f.write("an export is being moved into this folder; if this file stays, re-run trainer.save_model()\n")
        for name in (STUDENT_SUMMARY_NAME, LEGACY_SUMMARY_NAME, *os.listdir(output_dir)):
            stale = name in (STUDENT_SUMMARY_NAME, LEGACY_SUMMARY_NAME) or (
                name.startswith("model") and name.endswith((".safetensors", ".safetensors.index.json")))
            if stale and name not in files and os.path.isfile(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))
        for name in [*files, STUDENT_SUMMARY_NAME]:  # the summary (with the file list) last
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        os.remove(marker)
        os.rmdir(staging)
        return student

    def red_summary(self) -> dict[str, Any]:
        """What the saved student's `red_summary.json` records: adapter, loss and training amount."""
        config, args = self._adapter_config, self.args
        keys = (*LOSS_SETTINGS, "learning_rate", "max_length", "seed")
        erank_source = None
        if self._erank_callback is not None:
            erank_source = f"{len(self._erank_callback.texts)} held-out texts ({self._erank_source})"
        return {"adapter": config.to_dict(), "distillation": {k: getattr(args, k) for k in keys},
                "erank_source": erank_source,
                "global_step": self.state.global_step, "tokens_trained": self._total_train_tokens,
                "teacher_hidden_size": config.teacher_hidden_size,
                "student_hidden_size": config.student_hidden_size}

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None,
                    **kwargs: Any) -> str | None:
        """Push the merged student (what `save_model` writes) with a RED model card to `args.hub_model_id`.

        Trainer's own push_to_hub would upload `output_dir`, which holds adapter checkpoints. Trainer's and TRL's
        card arguments are honoured (`license`, `language`, `finetuned_from`, `tags`, `dataset_name`,
        `dataset_tags`: `transformers_red.card.trainer_card_kwargs`), then `card_kwargs` (set by
        `transformers-red distill`) fill what they leave out; the rest go to `transformers_red.hub.push_compressed`
        (eval_results, datasets, erank_text, teacher_name_or_path, measure_speed).
        """
        from ..card import trainer_card_kwargs
        from ..hub import push_compressed

        if revision is not None or not blocking:
            raise ValueError("RedDistillationTrainer.push_to_hub uploads the merged student to the main branch and "
                             "waits for it; for anything else call transformers_red.hub.push_compressed.")
        kwargs = {**(self.card_kwargs or {}), **trainer_card_kwargs(kwargs)}
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id or os.path.basename(
            os.path.abspath(self.args.output_dir))
        student = self._gathered_student()  # a collective under FSDP / ZeRO-3: every rank takes part
        if not self.args.should_save:
            return None
        with tempfile.TemporaryDirectory(prefix="red-student-") as tmp:
            self.export_student(tmp, student)
            return push_compressed(tmp, repo_id, token=token if token is not None else self.args.hub_token,
                                   private=bool(self.args.hub_private_repo if private is None else private),
                                   commit_message=commit_message or "End of training", **kwargs)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, **kwargs: Any) -> None:
        """Write the RED card (teacher, widths, init, loss settings, steps, tokens, eRank, what the width buys) as
        README.md in `output_dir`, in place of TRL's generic card (which TRL writes at every checkpoint). Trainer's
        card arguments (`license`, `language`, `finetuned_from`, ...) are honoured as in `push_to_hub`."""
        if not self.is_world_process_zero():
            return
        from ..card import build_model_card, trainer_card_kwargs

        config = student_config(self._teacher_config, self._adapter_config.student_hidden_size).to_dict()
        erank = None
        if self._erank_callback is not None and self._erank_callback.teacher is not None:
            erank = {"teacher": self._erank_callback.teacher, "history": self._erank_callback.history}
        card_kwargs = {**(self.card_kwargs or {}), **trainer_card_kwargs(
            {**kwargs, "dataset_name": dataset_name, "tags": tags})}
        card = build_model_card(config, red_summary=self.red_summary(), erank=erank,
                                model_name=model_name or self.args.hub_model_id or
                                os.path.basename(os.path.abspath(self.args.output_dir)), **card_kwargs)
        os.makedirs(self.args.output_dir, exist_ok=True)
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir, self._trains_weights)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint in {self.args.output_dir} to resume from.")
        if resume_from_checkpoint and self._already_finished(resume_from_checkpoint):
            # transformers would run one more step past max_steps (upstream, reproduced with a plain Trainer)
            self._load_from_checkpoint(resume_from_checkpoint)
            self.state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, "trainer_state.json"))
            logger.warning("%s already holds step %d of max_steps=%d: nothing is trained; its weights are kept.",
                           resume_from_checkpoint, self.state.global_step, self.args.max_steps)
            if self._erank_callback is not None:  # the checkpoint was written before the end-of-training measurement
                self._erank_callback.on_train_end(self.args, self.state, self.control, model=self.model)
            loss = next((h["train_loss"] for h in reversed(self.state.log_history) if "train_loss" in h), float("nan"))
            return TrainOutput(self.state.global_step, loss, {})
        if resume_from_checkpoint and self.is_deepspeed_enabled:
            self._restore_run_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _already_finished(self, checkpoint: str) -> bool:
        path = os.path.join(checkpoint, "trainer_state.json")
        if self.args.max_steps <= 0 or not os.path.isfile(path):
            return False
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("global_step", 0) >= self.args.max_steps

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Restore the adapter state, or with train="weights" the student's weights (optimizer, scheduler and RNG
        are restored by Trainer), and RED's run state."""
        self._restore_run_state(resume_from_checkpoint)
        weights = os.path.join(resume_from_checkpoint,
                               STUDENT_WEIGHTS_NAME if self._trains_weights else ADAPTER_WEIGHTS_NAME)
        if self._trains_weights and self.is_fsdp_enabled:
            self._load_full_student_state(resume_from_checkpoint)
        elif self._trains_weights:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:
            red = self.red_model
            red.load_adapter_state_dict(load_file(weights, device=str(next(red.parameters()).device)))

    def _restore_run_state(self, checkpoint: str) -> None:
        """Check that `checkpoint` is complete and of this run, and restore the tokens trained and the eRank
        history. Trainer never calls `_load_from_checkpoint` under DeepSpeed (the engine loads the module itself),
        so `train` calls this directly there."""
        problem = checkpoint_problem(checkpoint, self._trains_weights)
        if problem is not None:
            raise ValueError(f"Cannot resume from {checkpoint}: {problem} (train={self.args.train!r}). "
                             "Resume from an earlier checkpoint, or with resume_from_checkpoint=True to take the "
                             "newest complete one.")
        state = read_run_state(checkpoint, self._run_identity)  # refuses another run's checkpoint
        self._total_train_tokens = int(state["tokens_trained"])
        if self._erank_callback is not None:
            self._erank_callback.load(checkpoint)

    def _load_best_model(self) -> None:
        if self.state.best_model_checkpoint:
            self._load_from_checkpoint(self.state.best_model_checkpoint)
