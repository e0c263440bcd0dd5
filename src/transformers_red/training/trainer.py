"""`RedDistillationTrainer`: distil a width-reduced student from its teacher (LRC loss, RED init), on TRL.

The trainer wraps the teacher with the RED adapter (calibrating on a few texts), then trains only the
projections and student norm gains with CE + KL/JSD at temperature + alpha x clone MSE, all per token and
normalised by `num_items_in_batch`. The teacher pass is the same object under `disable_adapter()`, so one copy
of the teacher's weights is in memory. Checkpoints hold the adapter state; `save_model()` writes the merged,
plain student (both in `saving.py`, the `RedSavingMixin` base).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer
from trl import SFTTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import disable_dropout_in_model

from ..adapter.architectures import RESIDUAL_TERMS
from ..adapter.calibrate import materialise_batches
from ..adapter.config import teacher_weights_digest
from ..adapter.model import RedModel, calibrate_channels, get_red_model
from ..constants import PAPER_CITATION, PAPER_ID, PAPER_TITLE, TAGS
from ..data import batch_token_count, position_ids_from_mask
from ..loading import load_model
from .callbacks import ERankCallback
from .checkpoints import last_complete_checkpoint, run_identity
from .clone import CloneLoss, capture_outputs, clone_sites
from .config import RedConfig
from .cpu_memory import keep_freed_cpu_memory
from .distributed import from_main_process, is_distributed, register_zero3_leaf_modules, whole_parameters
from .losses import (
    IGNORE_INDEX,
    LogitLossWorkspace,
    auto_loss_chunk_size,
    fused_logit_loss,
    generalized_jsd_loss,
    hidden_state_logit_loss,
    shift_labels,
)
from .on_policy import ON_POLICY_KEY, OnPolicyMixin
from .placement import place_on_training_device, training_autocast
from .rows import check_dataset, first_texts, training_data_summary
from .saving import RedSavingMixin


class RedDistillationTrainer(RedSavingMixin, OnPolicyMixin, SFTTrainer):
    """Distil a RED (or LRC) student from a teacher on a text dataset.

    `args.train` chooses what is trained: "projections" (RED / LRC, the default) or "weights" (prune and
    distil: the step-0 student, i.e. the teacher hard-pruned to the selected channels, merged into a plain model
    whose own weights are trained against the frozen teacher with the same losses).

    Args:
        model: the teacher (`PreTrainedModel` or a local path), or an already built `RedModel`. None: load
            `args.teacher_model_name_or_path`.
        args: a `RedConfig`.
        train_dataset: a `datasets.Dataset` with a `args.dataset_text_field` column (or anything `SFTTrainer`
            accepts).
        teacher_model: optional separate teacher (model or path) for the teacher pass; by default the teacher
            pass runs the same weights under `disable_adapter()`.
        calibration_dataset: texts for the activation statistics; default the first
            `args.calibration_num_samples` texts of `train_dataset`.
        erank_dataset: held-out texts for `ERankCallback` (when `args.erank_steps > 0`); default: `eval_dataset`,
            else the built-in Python documentation texts.
    """

    _tag_names = ["trl", *TAGS]
    _name = "RED"
    _paper = {"title": PAPER_TITLE, "id": PAPER_ID, "citation": PAPER_CITATION}
    loss_is_scaled_for_ga = True
    generalized_jsd_loss = staticmethod(generalized_jsd_loss)

    def __init__(self, model: Any = None, args: RedConfig | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, teacher_model: Any = None,
                 calibration_dataset: Any = None, erank_dataset: Any = None, callbacks: list | None = None,
                 **kwargs: Any):
        args = args if args is not None else RedConfig(output_dir="red-student")
        if not isinstance(args, RedConfig):
            raise TypeError(f"args must be a RedConfig, got {type(args).__name__}.")
        check_dataset(train_dataset, args, "train_dataset")
        self._given_train_rows = len(train_dataset) if hasattr(train_dataset, "__len__") else None
        self._refuse_unsupported(args, train_dataset, eval_dataset, kwargs)
        name = model if isinstance(model, str) else args.teacher_model_name_or_path if model is None else None
        if model is None and name is None:
            raise ValueError("Give the teacher: RedDistillationTrainer(model=teacher_or_path, ...) or "
                             "RedConfig(teacher_model_name_or_path=...).")
        if name is not None:
            model = load_model(name, tokenizer=False, init_kwargs=args.teacher_model_init_kwargs)[0]
        if processing_class is None:
            source = name or getattr(model, "name_or_path", None)
            if not source:
                raise ValueError("Pass processing_class (the teacher's tokenizer).")
            processing_class = AutoTokenizer.from_pretrained(source)
        vocab_size = model.config.get_text_config().vocab_size
        if hasattr(processing_class, "__len__") and len(processing_class) > vocab_size:
            raise ValueError(f"The tokenizer has {len(processing_class)} tokens but the teacher's vocabulary has "
                             f"{vocab_size}: use the teacher's own tokenizer (ids past the vocabulary would fail "
                             "in the embedding).")
        if isinstance(teacher_model, str):
            teacher_model = load_model(teacher_model, tokenizer=False, init_kwargs=args.teacher_model_init_kwargs)[0]
        calibration, calibration_source = self._calibration_texts(args, train_dataset, calibration_dataset,
                                                                  processing_class)
        # the teacher passes below (channel statistics, clone normalisers) run where and how the run trains
        place_on_training_device(model, args)
        with whole_parameters(model), training_autocast(args):  # a zero.Init teacher: calibrate on real weights
            if not isinstance(model, RedModel):
                model = self._build_red_model(model, args, name, calibration, calibration_source, processing_class)
            self._clone = self._build_clone_loss(model, args, calibration, processing_class)
        self._adapter_config = model.red_config
        self._student_hidden_size = model.student_hidden_size  # the automatic loss chunk's width
        self._trains_weights = args.train == "weights"
        teacher = teacher_model if teacher_model is not None else model.base_model
        self._teacher_config = teacher.config
        # get_red_model recorded the wrapped teacher's digest; a separate teacher (or an old config) is hashed here
        digest = model.red_config.teacher_weights_digest if teacher_model is None else None
        self._run_identity = run_identity(args, model.red_config, digest or teacher_weights_digest(teacher))
        if self._trains_weights:
            model, teacher_model = self._prune(model, teacher_model)
        if teacher_model is not None:
            student_vocab = model.config.get_text_config().vocab_size
            teacher_vocab = teacher_model.config.get_text_config().vocab_size
            if student_vocab != teacher_vocab:
                raise ValueError(f"The student has vocab_size {student_vocab} but the teacher has {teacher_vocab}: "
                                 "the KL compares full next-token distributions and needs a shared vocabulary.")
        if args.disable_dropout:
            disable_dropout_in_model(model)
            if teacher_model is not None:
                disable_dropout_in_model(teacher_model)
        self._erank_callback = None
        if args.erank_steps > 0:
            texts = self._erank_texts(erank_dataset if erank_dataset is not None else eval_dataset, args,
                                      processing_class)
            self._erank_callback = ERankCallback(texts, processing_class, args.erank_steps, args.erank_collapse_ratio,
                                                 max_length=args.max_length or 256)
            self._erank_callback.teacher_model = teacher_model if self._trains_weights else None
            callbacks = [*(callbacks or []), self._erank_callback]
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks, **kwargs)
        self.model_accepts_loss_kwargs = True  # so Trainer counts num_items_in_batch for our loss
        if hasattr(self.train_dataset, "__len__") and len(self.train_dataset) == 0:
            raise ValueError(f"No training row is left after tokenisation: TRL drops rows with no trained token, and "
                             f"truncation to max_length={args.max_length} removed every completion. Raise max_length "
                             "or shorten the prompts.")
        self._logit_loss_from = self._choose_logit_path(args, teacher_model)
        if args.lmbda > 0 and self._uses_sharding_engine:
            raise ValueError("On-policy distillation (lmbda > 0) merges the student to sample, which under DeepSpeed "
                             "or FSDP would gather the whole model on every rank: use DDP (or one process), or "
                             "lmbda=0.")
        if self.is_deepspeed_enabled and not self._trains_weights:
            register_zero3_leaf_modules(model)
        on_cpu = self.args.device.type == "cpu"
        if args.keep_freed_cpu_memory and on_cpu:
            keep_freed_cpu_memory()
        if self._erank_callback is not None:
            self._erank_callback.trainer = self
            # sharded engines gather weights in the forward (every rank measures); otherwise the main process only
            self._erank_callback.main_process_only = not self._uses_sharding_engine
        self.teacher_model = self._prepare_teacher(teacher_model) if teacher_model is not None else None
        self._clone_names = self._clone.names if self._clone is not None else frozenset()
        # CPU: keep the loss scratch between steps (no allocator cache); CUDA's caching allocator reuses it anyway
        self._loss_workspace = LogitLossWorkspace() if on_cpu else None
        self._forms_per_step = self._forms_weights_per_step(args)

    def training_data_summary_line(self) -> str:
        """What the run will train on, said before it starts: rows, tokens after TRL's tokenisation, truncation to
        `max_length` and packing, and the steps that covers."""
        return training_data_summary(self.train_dataset, self._given_train_rows, self.args)

    @property
    def _uses_sharding_engine(self) -> bool:
        """FSDP or DeepSpeed: weights or optimizer state are spread over the ranks, so gathering, merging and the
        eRank forward are collectives every rank takes part in."""
        return self.is_fsdp_enabled or self.is_deepspeed_enabled

    def _choose_logit_path(self, args: RedConfig, teacher_model: Any) -> str:
        """`RedConfig.logit_loss_from` resolved: 'auto' is 'hidden_states' (no (B, T, V) tensor) wherever that path
        applies, else 'logits'; an explicit 'hidden_states' where it cannot apply is refused, saying why."""
        reasons = []
        if teacher_model is not None and self._uses_sharding_engine:
            reasons.append("a separate teacher_model's LM-head weight would be read outside its forward, where "
                           "DeepSpeed ZeRO-3 / FSDP have partitioned it (let the teacher pass run on the RedModel: "
                           "no teacher_model)")
        if self._trains_weights and (self.accelerator.num_processes > 1 or self._uses_sharding_engine):
            reasons.append("train='weights' would run the plain student's decoder past the DDP/FSDP/DeepSpeed "
                           "wrapper (no gradient sync, partitioned head)")
        student = self.accelerator.unwrap_model(self.model)
        student = student.base_model if isinstance(student, RedModel) else student
        if _head_bias(student) is not None or (teacher_model is not None and _head_bias(teacher_model) is not None):
            reasons.append("the LM head has a bias, which the hidden-state path does not add")
        if args.logit_loss_from == "hidden_states" and reasons:
            raise ValueError("logit_loss_from='hidden_states' cannot be used here: " + "; ".join(reasons)
                             + ". Use 'auto' (it falls back to 'logits' here) or 'logits'.")
        if args.logit_loss_from == "auto":
            return "logits" if reasons else "hidden_states"
        return args.logit_loss_from

    @property
    def logit_loss_from(self) -> str:
        """The logit path this run uses: 'hidden_states' or 'logits' (`RedConfig.logit_loss_from` resolved)."""
        return self._logit_loss_from

    def _forms_weights_per_step(self, args: RedConfig) -> bool:
        """Whether the student weights are formed once per optimizer step (`RedConfig.form_student_weights`)."""
        if args.form_student_weights == "per_forward" or self._trains_weights:
            return False
        if args.form_student_weights == "per_step" and self._uses_sharding_engine:
            raise ValueError("form_student_weights='per_step' does not work with DeepSpeed or FSDP: they free the "
                             "gathered teacher weights after each forward, and the held student weights would be "
                             "formed from them again in the last backward. Use 'auto' or 'per_forward'.")
        return not self._uses_sharding_engine and (args.form_student_weights == "per_step"
                                                   or args.gradient_accumulation_steps > 1)

    def training_step(self, model: Any, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
        """Trainer's step; with per-step forming, one micro-batch under `RedModel.hold_formed_weights`, the last one
        of the optimizer step (`accelerator.sync_gradients`, as Trainer's loop sets it) sending every micro-batch's
        gradients into the projections."""
        if not self._forms_per_step:
            return super().training_step(model, inputs, num_items_in_batch)
        with self.red_model.hold_formed_weights(last_micro_batch=self.accelerator.sync_gradients):
            return super().training_step(model, inputs, num_items_in_batch)

    # ---------------------------------------------------------------------------------------- setup
    @staticmethod
    def _refuse_unsupported(args: RedConfig, train_dataset: Any, eval_dataset: Any, kwargs: dict) -> None:
        """What RED cannot honour, refused before the teacher is calibrated (RedConfig refuses its own fields)."""
        columns = getattr(train_dataset, "column_names", None)
        if args.lmbda > 0 and columns is not None and "prompt" not in columns:
            raise ValueError(f"lmbda={args.lmbda} (on-policy distillation) samples completions of prompts: give "
                             f"prompt/completion data (TRL's 'prompt' and 'completion' columns; got {columns}).")
        if kwargs.get("peft_config") is not None:
            raise ValueError("peft_config: RED trains its own projections over the frozen teacher, and a PEFT adapter "
                             "cannot be stacked on the wrapped teacher. Distil first, then apply LoRA to the merged "
                             "student: peft.get_peft_model(trainer.merged_student(), LoraConfig(...)).")
        if args.eval_strategy != "no" and eval_dataset is None:
            raise ValueError(f"eval_strategy={args.eval_strategy.value!r} needs an eval_dataset: pass "
                             "RedDistillationTrainer(eval_dataset=...) or leave eval_strategy='no'.")

    def _calibration_texts(self, args: RedConfig, train_dataset: Any, calibration_dataset: Any,
                           tokenizer: Any) -> tuple[Any, str]:
        """The calibration data (channel statistics and clone normalisation) and a description of it; (None, "")
        when neither is needed."""
        if calibration_dataset is not None:
            return calibration_dataset, "calibration_dataset"
        config = args.adapter_config()
        if not config.needs_calibration and (args.clone_weight == 0 or args.clone_normalization == "none"):
            return None, ""
        texts = first_texts(train_dataset, args, config.calibration_num_samples, tokenizer)
        return texts, f"first {len(texts)} texts of train_dataset"

    def _build_red_model(self, teacher: Any, args: RedConfig, name: str | None, calibration: Any, source: str,
                         tokenizer: Any) -> RedModel:
        config = args.adapter_config()
        config.teacher_name_or_path = config.teacher_name_or_path or name or getattr(teacher, "name_or_path", None)
        if not config.needs_calibration:
            calibration = None
        elif config.calibration_source is None or source != "calibration_dataset":
            config.calibration_source = source
        if config.needs_calibration and is_distributed():
            # one calibration, on global rank 0: every rank must train the same channels
            def calibrate() -> tuple:
                resolved = config.resolved_for(teacher)
                channels = calibrate_channels(teacher, resolved, calibration, tokenizer, not args.disable_tqdm)
                return channels, resolved.calibration_num_texts, resolved.calibration_num_tokens

            # the counts travel with the channels, so every rank's card records what rank 0 calibrated on
            (config.channel_indices, config.calibration_num_texts,
             config.calibration_num_tokens) = from_main_process(calibrate)
        # the progress bar follows disable_tqdm, and only the main process draws one
        return get_red_model(teacher, config, calibration, tokenizer,
                             show_progress_bar=not args.disable_tqdm and args.process_index == 0)

    @staticmethod
    def _build_clone_loss(red: RedModel, args: RedConfig, calibration: Any, tokenizer: Any) -> CloneLoss | None:
        """The clone term over the wrapped modules, its normalisers measured on the calibration texts."""
        if args.clone_weight == 0 or not args.clone_terms:
            return None
        names = clone_sites(red.base_model, red.architecture, red.layout, args.clone_terms)
        clone = CloneLoss(names, red.projection, args.clone_output_space, args.clone_normalization)
        if args.clone_normalization != "none":
            config = red.red_config
            batches = materialise_batches(calibration, tokenizer, batch_size=config.calibration_batch_size,
                                          max_length=config.calibration_max_length,
                                          num_samples=config.calibration_num_samples, seed=config.calibration_seed,
                                          device=next(red.parameters()).device,
                                          vocab_size=red.config.get_text_config().vocab_size)
            show = not args.disable_tqdm and args.process_index == 0

            def scales() -> dict:
                clone.calibrate(_teacher_outputs(red, tqdm(batches, desc="clone normalisers", disable=not show),
                                                 clone.names))
                return clone.scales

            clone.scales = from_main_process(scales)  # every rank divides by the same constants
        return clone

    def _prune(self, red: RedModel, teacher_model: Any) -> tuple[Any, Any]:
        """train="weights": the merged step-0 student (trainable) and the teacher (the user's, else RED's own)."""
        if self._clone is not None:  # residual-space clone targets keep the initial projection, fixed
            fixed = {n: red.projection(n).detach().clone() for group in RESIDUAL_TERMS
                     for n, _ in self._clone.module_names.get(group, [])}
            self._clone.projection = fixed.__getitem__
        student = red.merge_and_unload()
        for p in student.parameters():
            p.requires_grad_(True)
        teacher = red.unload()
        return student, teacher_model if teacher_model is not None else teacher

    def _erank_texts(self, dataset: Any, args: RedConfig, tokenizer: Any) -> list[str]:
        if dataset is not None and not isinstance(dataset, dict):
            self._erank_source = "given dataset"
            if isinstance(dataset, list):
                return dataset[: args.erank_num_samples]
            return first_texts(dataset, args, args.erank_num_samples, tokenizer)
        from ..resources.texts import builtin_texts

        self._erank_source = "Python documentation paragraphs, transformers_red.resources.builtin_texts"
        return builtin_texts()[-args.erank_num_samples:]

    def _prepare_teacher(self, teacher: Any) -> Any:
        """Prepare a separate teacher as TRL does: DeepSpeed / FSDP engines, else evaluation-mode placement."""
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    @property
    def red_model(self) -> RedModel:
        """The `RedModel` being trained (unwrapped from any accelerate wrapper)."""
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, RedModel):
            if self._trains_weights:
                raise TypeError("RedConfig(train='weights') trains a plain pruned student, not a RedModel: use "
                                "trainer.merged_student() (or trainer.model).")
            raise TypeError(f"Expected the trainer's model to be a RedModel, got {type(model).__name__}.")
        return model

    def merged_student(self) -> Any:
        """The plain student of width d_S: the merged RedModel (a new model), or with train="weights" the trained
        model itself."""
        if self._trains_weights:
            return self.accelerator.unwrap_model(self.model)
        return self.red_model.merge_and_unload(progressbar=False)

    # ----------------------------------------------------------------------------------------- loss
    @contextlib.contextmanager
    def _teacher_pass(self):
        """Yields (callable, captured activations) for the frozen teacher forward, without gradients."""
        with torch.no_grad():
            if self.teacher_model is None:
                red = self.red_model
                with red.disable_adapter(), red.capture_activations(self._clone_names) as acts:
                    yield self.model, acts
            else:
                with capture_outputs(self.accelerator.unwrap_model(self.teacher_model), self._clone_names) as acts:
                    yield self.teacher_model, acts

    def _final_hidden_and_head(self, model: Any, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """(final hidden states (B, T, d), LM-head weight (V, d), logit soft cap) of one pass, without logits: the
        decoder's forward, then the head's weight (a RED head's student weight W_T @ P in the student pass)."""
        inner = self.accelerator.unwrap_model(model)
        hf_model = inner.base_model if isinstance(inner, RedModel) else inner
        head = hf_model.get_output_embeddings()  # no bias: _choose_logit_path refused this path for one
        softcap = getattr(hf_model.config, "final_logit_softcapping", None)
        if isinstance(inner, RedModel):  # through the DDP/FSDP/DeepSpeed wrapper, so its hooks run
            hidden, weight = model(**inputs, use_cache=False, red_hidden_and_head=True)
            return hidden, weight, softcap
        # a plain model (train="weights", or a separate teacher, no gradient): called past any wrapper
        hidden = hf_model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        return hidden, head.weight, softcap

    def _student_capture(self, model: Any, teacher_acts: dict):
        if self._trains_weights:
            return capture_outputs(self.accelerator.unwrap_model(model), self._clone_names)
        requests = self._clone.student_requests(teacher_acts) if self._clone is not None else {}
        return self.red_model.capture_activations(self._clone_names, **requests)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """CE + KL/JSD at temperature + alpha x clone MSE, summed over trained tokens / num_items_in_batch."""
        mode = "train" if self.model.training else "eval"
        args = self.args
        labels = inputs["labels"]
        forward_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        # the student's own samples are no ground truth: no cross entropy on them (the KL carries the teacher)
        ce_weight = 0.0 if inputs.get(ON_POLICY_KEY) else args.ce_weight
        chunk = args.loss_chunk_size or auto_loss_chunk_size(labels.numel(), self._student_hidden_size,
                                                             self._teacher_config.get_text_config().vocab_size)
        losses = dict(kd_weight=args.kd_weight, ce_weight=ce_weight, beta=args.beta,
                      temperature=args.temperature, chunk_size=chunk, workspace=self._loss_workspace)
        if self._logit_loss_from == "hidden_states" and not return_outputs:
            with self._teacher_pass() as (teacher, teacher_acts):
                t_hidden, t_head, t_cap = self._final_hidden_and_head(teacher, forward_inputs)
            with self._student_capture(model, teacher_acts) as student_acts:
                s_hidden, s_head, s_cap = self._final_hidden_and_head(model, forward_inputs)
            logit_loss, (kd, ce, teacher_ce) = hidden_state_logit_loss(
                s_hidden, s_head, t_hidden, t_head, labels, softcap=s_cap, teacher_softcap=t_cap, **losses)
            outputs = None
        else:
            with self._teacher_pass() as (teacher, teacher_acts):
                teacher_logits = teacher(**forward_inputs, use_cache=False).logits
            with self._student_capture(model, teacher_acts) as student_acts:
                outputs = model(**forward_inputs, use_cache=False)
            logit_loss, (kd, ce, teacher_ce) = fused_logit_loss(outputs.logits, teacher_logits, labels, **losses)
            del teacher_logits
        token_mask = shift_labels(labels) != IGNORE_INDEX
        clone = self._clone.sums(student_acts, teacher_acts, token_mask) if self._clone is not None else {}
        clone_total = sum(clone.values()) if clone else ce.new_zeros(())
        local_tokens = token_mask.sum().clamp_min(1)
        denominator = local_tokens if num_items_in_batch is None else torch.as_tensor(num_items_in_batch).to(ce)
        loss = (logit_loss + args.clone_weight * clone_total) / denominator
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        if not torch.isfinite(loss):
            last = last_complete_checkpoint(args.output_dir)
            raise FloatingPointError(
                f"Non-finite distillation loss ({float(loss.detach())}) at step {self.state.global_step + 1}: "
                f"ce={float(ce.detach())}, kd={float(kd.detach())}, clone={float(clone_total.detach())}. "
                "The last good checkpoint is "
                f"{last or 'none (nothing was saved yet)'}; lower the learning rate or check the data, then resume "
                "with train(resume_from_checkpoint=True).")
        self._log_components(mode, local_tokens, ce, kd, teacher_ce, clone, inputs)
        return (loss, outputs) if return_outputs else loss

    def _log_components(self, mode: str, tokens: torch.Tensor, ce, kd, teacher_ce, clone: dict, inputs) -> None:
        gather = self.accelerator.gather_for_metrics
        n = gather(tokens.detach().reshape(1)).sum().clamp_min(1)
        values = {"ce_loss": ce, "kd_loss": kd, "teacher_ce_loss": teacher_ce,
                  **({"clone_loss": sum(clone.values())} if clone else {}),
                  **{f"clone/{term}": value for term, value in clone.items()}}
        for key, value in values.items():
            self._metrics[mode][key].append((gather(value.detach().reshape(1)).sum() / n).item())
        if mode == "train":
            if self.args.lmbda > 0:  # the share of sampled micro-batches over the logging window
                self._metrics[mode]["on_policy"].append(float(bool(inputs.get(ON_POLICY_KEY))))
            self._total_train_tokens += int(gather(batch_token_count(inputs).reshape(1)).sum())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


def _head_bias(hf_model: Any) -> torch.Tensor | None:
    """The bias of a model's LM head (or of the layer a RED wrapper holds), None if it has none."""
    head = hf_model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return bias if bias is not None else getattr(getattr(head, "base_layer", None), "bias", None)


@torch.no_grad()
def _teacher_outputs(red: RedModel, batches: list[dict[str, torch.Tensor]], names: frozenset[str]):
    """Yields (captured outputs of `names`, (B, T) token mask) of the teacher pass over each batch."""
    for batch in batches:
        mask = batch["attention_mask"]
        with red.disable_adapter(), red.capture_activations(names) as outputs:
            red(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                use_cache=False)
        yield outputs, mask.bool()
