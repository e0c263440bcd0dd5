"""`RedConfig`: training arguments of `RedDistillationTrainer` (a `trl.SFTConfig` plus the distillation)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import SFTConfig

from ..adapter.architectures import CLONE_TERMS
from ..adapter.config import RedAdapterConfig
from .clone import CLONE_NORMALIZATIONS

TRAIN_TARGETS = ("projections", "weights")
FORMING_MODES = ("auto", "per_step", "per_forward")
# RedConfig fields with a closed set of values: the one table __post_init__ checks
CHOICES = {
    "train": TRAIN_TARGETS,
    "clone_output_space": ("student", "teacher"),
    "clone_normalization": tuple(CLONE_NORMALIZATIONS),
    "logit_loss_from": ("auto", "logits", "hidden_states"),
    "form_student_weights": FORMING_MODES,
}


@dataclass
class RedConfig(SFTConfig):
    """Arguments of RED / LRC distillation, on top of every `trl.SFTConfig` / `TrainingArguments` field.

    Differences from `SFTConfig` defaults: `learning_rate` 1e-4 (LRC), `activation_checkpointing` False (the
    frozen teacher pass needs no activations; turn it on for large teachers), `bf16` only when a CUDA device
    supports it.
    """

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs", "red_adapter_config"]

    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (LRC: 1e-4)."})
    activation_checkpointing: bool | None = field(
        default=False, metadata={"help": "Recompute student activations in backward to save memory."})
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing (transformers 5)."})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; default: on when a CUDA device supports it."})

    # Compression (a shortcut for the common RedAdapterConfig fields; `red_adapter_config` overrides them).
    width_ratio: float | None = field(
        default=0.5, metadata={"help": "Student width d_S / d_T (ignored when target_hidden_size is set)."})
    target_hidden_size: int | None = field(default=None, metadata={"help": "Student hidden width d_S."})
    init: str = field(default="activation", metadata={
        "help": "Projection init: 'activation' (RED channel selection), 'random' (LRC), 'orthogonal'."})
    norm_init: str | None = field(default=None, metadata={
        "help": "Student norm gains: 'teacher' (RED default) or 'ones' (LRC; default for random inits)."})
    calibration_num_samples: int = field(default=15, metadata={"help": "Calibration texts (paper: 15)."})
    red_adapter_config: dict[str, Any] | str | None = field(default=None, metadata={
        "help": "Full RedAdapterConfig as a dict (or JSON string on the CLI); overrides the shortcut fields."})

    train: str = field(default="projections", metadata={
        "help": "What is trained: 'projections' (RED / LRC: the projections and student norm gains over the frozen "
                "teacher) or 'weights' (prune and distil, Minitron's recipe: the step-0 student is merged into a "
                "plain model and its own weights are trained against the teacher)."})

    # Teacher
    teacher_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Teacher to load when the trainer is given no model (local folder; safetensors only)."})
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(default=None, metadata={
        "help": "Keyword arguments of AutoModelForCausalLM.from_pretrained for the teacher (e.g. dtype)."})

    # Loss
    temperature: float = field(default=1.0, metadata={
        "help": "Distillation temperature tau. RED requires 1; LRC used 40."})
    beta: float = field(default=0.0, metadata={
        "help": "Generalised JSD interpolation: 0 = forward KL (paper), 0.5 = JSD, 1 = reverse KL."})
    ce_weight: float = field(default=1.0, metadata={"help": "Weight of the student's next-token cross entropy."})
    kd_weight: float = field(default=1.0, metadata={"help": "Weight of the logit divergence."})
    clone_weight: float = field(default=0.2, metadata={
        "help": "alpha, weight of the activation clone MSE (LRC: 0.2 for Llama, 0.5 for Qwen)."})
    clone_terms: list[str] = field(default_factory=lambda: list(CLONE_TERMS), metadata={
        "help": "Clone terms: q, k, v, gate, up (pre-activations), attn, ffn (module outputs)."})
    clone_output_space: str = field(default="student", metadata={
        "help": "Where attn/ffn outputs are compared: 'student' (paper: teacher output x its P) or 'teacher' "
                "(LRC's code: student output lifted by P^T)."})
    clone_normalization: str = field(default="teacher_mean_square", metadata={
        "help": "'teacher_mean_square': each module's clone MSE divided by its target's mean square on the "
                "calibration texts, averaged over layers (scale-free; default). 'none': the paper's plain MSE "
                "summed over layers."})
    logit_loss_from: str = field(default="auto", metadata={
        "help": "'hidden_states': the logit losses from the final hidden states and head weights, a chunk of trained "
                "tokens at a time, so no (B, T, V) tensor is held; 'logits': from the models' (B, T, V) logits "
                "(fused; the student's and teacher's logits and one gradient buffer of that size); 'auto' (default): "
                "'hidden_states' wherever it applies, else 'logits' (an LM head with a bias, a separate "
                "teacher_model under FSDP/DeepSpeed, train='weights' with several processes or a sharding engine). "
                "Evaluation with prediction outputs always uses the logits."})
    form_student_weights: str = field(default="auto", metadata={
        "help": "When the student weights W_T @ P are formed: 'per_step' once per optimizer step, their gradients "
                "accumulated over the micro-batches and sent into the projections by the last micro-batch's "
                "backward (exact; saves the forming of every micro-batch but the first; holds the student weights "
                "and a float32 sum of their gradients during the step; one process or DDP, not DeepSpeed/FSDP); "
                "'per_forward' in every forward; 'auto' (default): 'per_step' when gradient_accumulation_steps > 1 "
                "without DeepSpeed/FSDP, else 'per_forward'."})
    lmbda: float = field(default=0.0, metadata={
        "help": "Share of micro-batches on which the student samples its own completions of the prompts, which the "
                "teacher then scores (on-policy distillation, TRL's GKD lmbda): 0 off-policy (default), 1 every "
                "batch. Needs prompt/completion data; sampling at `temperature`, no cross entropy on sampled tokens."})
    max_new_tokens: int = field(default=128, metadata={
        "help": "Most tokens the student samples per completion when lmbda > 0 (TRL's GKD max_new_tokens)."})
    loss_chunk_size: int | None = field(default=None, metadata={
        "help": "Tokens per chunk of the logit losses (bounds the float32 (chunk, V) temporaries). None (default): "
                "chosen per batch from the vocabulary and the student width, about tokens x d_S / V (so a chunk's "
                "logits are the size of the hidden states), a power of two in [128, 1024]."})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off in the teacher and student."})
    keep_freed_cpu_memory: bool = field(default=False, metadata={
        "help": "When training on CPU with glibc, keep freed memory in the process instead of returning it to "
                "the OS after every step (mallopt): removes GiBs of page faults per step, but changes the whole "
                "process's allocator, so a library leaves it off unless asked. The CLI, demo and benchmarks, "
                "which own their process, turn it on."})

    # eRank monitoring
    erank_steps: int = field(default=0, metadata={
        "help": "Measure per-layer eRank of the student every N steps (0: off)."})
    erank_num_samples: int = field(default=8, metadata={"help": "Held-out texts for the eRank measurement."})
    erank_collapse_ratio: float = field(default=0.5, metadata={
        "help": "Warn when the student's mean eRank falls below this fraction of the teacher's."})

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = (not self.fp16) and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if self.ddp_find_unused_parameters is None:
            # every projection and gain is used in every forward; Trainer would search for unused ones on every
            # step because a RedModel is not a PreTrainedModel
            self.ddp_find_unused_parameters = False
        super().__post_init__()
        if isinstance(self.clone_terms, str):
            self.clone_terms = [self.clone_terms]
        # "q,k" from the command line arrives as one list item
        self.clone_terms = [t for item in self.clone_terms for t in str(item).replace(",", " ").split() if t]
        problems = []
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            problems.append(f"temperature must be a finite number > 0, got {self.temperature}")
        if not 0 <= self.beta <= 1:
            problems.append(f"beta must be in [0, 1] (0 forward KL, 0.5 JSD, 1 reverse KL), got {self.beta}")
        for name in ("ce_weight", "kd_weight", "clone_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                problems.append(f"{name} must be a finite number >= 0, got {value}")
        if self.max_length is not None and self.max_length <= 0:
            problems.append(f"max_length must be a positive number of tokens (or None), got {self.max_length}")
        if isinstance(self.red_adapter_config, str):
            problems.append("red_adapter_config must be a dict of RedAdapterConfig fields (JSON object on the "
                            f"command line), got the string {self.red_adapter_config[:40]!r}")
        checkpointing_kwargs = (getattr(self, "activation_checkpointing_kwargs", None)
                                or getattr(self, "gradient_checkpointing_kwargs", None) or {})
        if ((self.activation_checkpointing or self.gradient_checkpointing)
                and checkpointing_kwargs.get("use_reentrant") and self.clone_weight > 0 and self.clone_terms):
            # reentrant checkpointing runs the first forward without gradients: the captured module outputs the clone
            # term compares would carry none, and the clone gradients would be silently wrong
            problems.append("activation checkpointing with use_reentrant=True gives the clone term wrong gradients "
                            "(the captured module outputs have no autograd graph); use the default "
                            "use_reentrant=False, or clone_weight=0")
        if self.ce_weight == self.kd_weight == 0 and (self.clone_weight == 0 or not self.clone_terms):
            problems.append("every loss weight is zero (ce_weight, kd_weight, clone_weight): nothing to train")
        unknown = set(self.clone_terms) - set(CLONE_TERMS)
        if unknown:
            problems.append(f"unknown clone_terms {sorted(unknown)}; choose from {list(CLONE_TERMS)}")
        problems += [f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}"
                     for name, allowed in CHOICES.items() if getattr(self, name) not in allowed]
        if not 0 <= self.lmbda <= 1:
            problems.append(f"lmbda (share of on-policy batches) must be in [0, 1], got {self.lmbda}")
        if self.max_new_tokens <= 0:
            problems.append(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.lmbda > 0 and self.packing:
            problems.append("on-policy distillation (lmbda > 0) samples completions of each row's prompt, which "
                            "packed rows no longer have: use packing=False with lmbda > 0")
        if self.loss_chunk_size is not None and self.loss_chunk_size <= 0:
            problems.append(f"loss_chunk_size must be > 0 (or None: chosen from V and the width), got "
                            f"{self.loss_chunk_size}")
        problems += _unsupported_sft_settings(self)
        if self.erank_steps < 0 or self.erank_num_samples <= 0:
            problems.append("erank_steps must be >= 0 and erank_num_samples > 0")
        if problems:
            raise ValueError("Invalid RedConfig: " + "; ".join(problems) + ".")
        self.adapter_config()  # validates the width and init now, not after the teacher has loaded

    def adapter_config(self) -> RedAdapterConfig:
        """The `RedAdapterConfig` these arguments describe."""
        fields = {"init": self.init, "norm_init": self.norm_init, "calibration_num_samples":
                  self.calibration_num_samples, "seed": self.seed}
        if self.target_hidden_size is not None:
            fields["target_hidden_size"] = self.target_hidden_size
        else:
            fields["width_ratio"] = self.width_ratio
        overrides = self.red_adapter_config or {}
        if isinstance(overrides, RedAdapterConfig):
            overrides = dataclasses.asdict(overrides)
        if "target_hidden_size" in overrides or "width_ratio" in overrides:
            fields.pop("target_hidden_size", None)
            fields.pop("width_ratio", None)
        return RedAdapterConfig(**{**fields, **overrides})


def _unsupported_sft_settings(config: RedConfig) -> list[str]:
    """SFTConfig / TrainingArguments settings that RED's loss never reads: refused rather than silently ignored."""
    problems = []
    if config.loss_type != "nll":
        problems.append(f"loss_type={config.loss_type!r} is an SFT loss; RED trains with its own CE + KD + clone loss "
                        "(weights ce_weight, kd_weight, clone_weight): leave loss_type='nll'")
    if config.label_smoothing_factor:
        problems.append(f"label_smoothing_factor={config.label_smoothing_factor} is not applied by the distillation "
                        "loss (the teacher's distribution already softens the targets): leave it 0")
    if config.neftune_noise_alpha is not None:
        problems.append("neftune_noise_alpha adds noise to the teacher's own embedding, which the frozen teacher pass "
                        "shares: leave it None (NEFTune the merged student afterwards if wanted)")
    if config.use_liger_kernel:
        problems.append("use_liger_kernel patches the teacher's modules that RED wraps: leave it False "
                        "(logit_loss_from='hidden_states' is RED's memory-saving path)")
    return problems
