"""`RedAdapterConfig`: what to compress, to which width, and how to initialise the projections.

Mirrors PEFT's adapter configs (a dataclass with `save_pretrained` / `from_pretrained` to JSON), so a
compressed student can be rebuilt from its teacher and this file alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..constants import ADAPTER_CONFIG_NAME
from .architectures import get_architecture

_SAMPLES_PER_TENSOR = 1024  # teacher weights hashed per tensor
# Config keys that do not change the teacher's function or shapes and must not break the fingerprint.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
                         "output_hidden_states", "output_attentions", "return_dict", "_attn_implementation",
                         "attn_implementation", "_attn_implementation_autoset", "architectures"}


def teacher_config_fingerprint(config: Any) -> str:
    """SHA-256 (first 16 hex digits) of the teacher config's shape-defining fields."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    data = {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def teacher_weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 (16 hex digits) of the teacher's weights: every tensor's name, shape and dtype, and 1024 values
    taken at evenly spaced positions.

    Reading every value of an 8B teacher (16 GB in bf16) would take about half a minute per resume; the samples
    take milliseconds and still tell apart any two fine-tunes (they change almost every value).
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        # a wrapped teacher hashes as the plain one: its own tensors under their plain names, not the adapter's
        items = sorted((k, v) for k, v in model.state_dict().items() if not k.endswith(".red_weight"))
    for name, tensor in items:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].to(device="cpu", dtype=torch.float32)
        digest.update(f"{name.replace('.base_layer', '')}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class RedAdapterConfig:
    """Configuration of a RED (or LRC) width-reduction adapter.

    Give exactly one of `target_hidden_size` and `width_ratio`. With `init="activation"` the adapter needs
    calibration data once; the chosen residual channels are then stored here (`channel_indices`).
    """

    target_hidden_size: int | None = field(
        default=None, metadata={"help": "Student hidden (residual) width d_S. Exclusive with width_ratio."})
    width_ratio: float | None = field(
        default=None, metadata={"help": "d_S / d_T in (0, 1); d_S = round(ratio * d_T). Exclusive with "
                                        "target_hidden_size."})
    init: Literal["activation", "random", "orthogonal"] = field(
        default="activation", metadata={"help": "'activation': RED channel selection from teacher activation "
                                                "statistics; 'random': LRC's N(0, init_std); 'orthogonal': "
                                                "random matrix with orthonormal columns."})
    init_std: float = field(default=0.02, metadata={"help": "Standard deviation of init='random' (LRC: 0.02)."})
    norm_init: Literal["teacher", "ones"] | None = field(
        default=None, metadata={"help": "Student RMSNorm gains at init: 'teacher' = the teacher's gains on "
                                        "the selected channels (step 0 equals the hard-pruned teacher); "
                                        "'ones' = LRC. Default: 'teacher' for init='activation', else 'ones'."})
    share_projections: bool = field(
        default=False, metadata={"help": "Share one projection per layer for q/k/v and one for gate/up (the "
                                         "paper's 'IO' sharing). Off: one projection per layer and module."})
    target_modules: dict[str, list[str]] | None = field(
        default=None, metadata={"help": "{'input': [...], 'output': [...], 'norms': [...]} module names inside "
                                        "each decoder layer. Recorded from the architecture registry "
                                        "(adapter/architectures.py); a value that differs from it is refused."})
    calibration_num_samples: int = field(
        default=15, metadata={"help": "Number of calibration texts (paper: 15)."})
    calibration_max_length: int = field(
        default=2048, metadata={"help": "Tokens per calibration text at most (longer ones are truncated)."})
    calibration_batch_size: int = field(default=4, metadata={"help": "Calibration batch size."})
    calibration_seed: int | None = field(
        default=None, metadata={"help": "None: take the first calibration_num_samples texts; an integer: "
                                        "draw them at random with this seed."})
    calibration_source: str | None = field(
        default=None, metadata={"help": "Where the calibration texts came from (recorded for the model card)."})
    seed: int = field(default=0, metadata={"help": "Seed of init='random' / 'orthogonal'."})
    trainable_dtype: Literal["float32", "teacher"] = field(
        default="float32", metadata={"help": "Dtype of the projections and norm gains. 'float32': float32 master "
                                             "tensors over a bf16/fp16 teacher (an AdamW update of 1e-4 on a "
                                             "selection entry of 1 rounds away in bf16, whose spacing there is "
                                             "2^-7), cast to the teacher's dtype in every forward; a float32/64 "
                                             "teacher's own dtype otherwise. 'teacher': the teacher's dtype "
                                             "(half the memory of the trainable state and its gradients)."})
    # Recorded by `get_red_model`; not meant to be set by hand.
    model_type: str | None = field(default=None, metadata={"help": "Teacher model_type (recorded)."})
    teacher_name_or_path: str | None = field(default=None, metadata={"help": "Teacher identity (recorded)."})
    teacher_config_fingerprint: str | None = field(
        default=None, metadata={"help": "Hash of the teacher config (recorded; checked on load)."})
    teacher_weights_digest: str | None = field(
        default=None, metadata={"help": "Hash of sampled teacher weights (recorded; checked on load)."})
    teacher_hidden_size: int | None = field(default=None, metadata={"help": "Teacher width d_T (recorded)."})
    student_hidden_size: int | None = field(default=None, metadata={"help": "Student width d_S (recorded)."})
    channel_indices: list[int] | None = field(
        default=None, metadata={"help": "Selected residual channels, sorted (recorded by init='activation')."})
    calibration_num_texts: int | None = field(
        default=None, metadata={"help": "Calibration texts really used, at most calibration_num_samples "
                                        "(recorded)."})
    calibration_num_tokens: int | None = field(
        default=None, metadata={"help": "Non-padding calibration tokens really used (recorded)."})

    def __post_init__(self) -> None:
        if self.init not in ("activation", "random", "orthogonal"):
            raise ValueError(f"init={self.init!r} is not supported; use 'activation' (RED), 'random' (LRC) "
                             "or 'orthogonal'.")
        if self.norm_init is None:
            self.norm_init = "teacher" if self.init == "activation" else "ones"
        if self.norm_init not in ("teacher", "ones"):
            raise ValueError(f"norm_init={self.norm_init!r} is not supported; use 'teacher' or 'ones'.")
        if (self.target_hidden_size is None) == (self.width_ratio is None):
            raise ValueError("Give exactly one of target_hidden_size (e.g. 288) and width_ratio (e.g. 0.5).")
        if self.target_hidden_size is not None and (not _is_int(self.target_hidden_size)
                                                    or self.target_hidden_size <= 0):
            raise ValueError(f"target_hidden_size must be a positive integer, got {self.target_hidden_size!r}; "
                             "use width_ratio for a fraction of the teacher width.")
        if self.width_ratio is not None and not (isinstance(self.width_ratio, (int, float))
                                                 and 0.0 < float(self.width_ratio) < 1.0):
            raise ValueError(f"width_ratio must be a number strictly between 0 and 1, got {self.width_ratio!r}.")
        if not (isinstance(self.init_std, (int, float)) and 0 < self.init_std < float("inf")):
            raise ValueError(f"init_std must be a finite number > 0, got {self.init_std}.")
        for name in ("calibration_num_samples", "calibration_max_length", "calibration_batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.target_modules is not None:
            missing = {"input", "output", "norms"} - set(self.target_modules)
            if missing:
                raise ValueError("target_modules needs the keys 'input', 'output' and 'norms'; "
                                 f"missing {sorted(missing)}.")
        if self.trainable_dtype not in ("float32", "teacher"):
            raise ValueError(f"trainable_dtype={self.trainable_dtype!r} is not supported; use 'float32' (float32 "
                             "projections over a half-precision teacher) or 'teacher'.")
        if self.channel_indices is not None:
            self.channel_indices = [int(i) for i in self.channel_indices]

    def trainable_dtype_for(self, teacher_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the projections and gains over teacher weights of `teacher_dtype`."""
        if self.trainable_dtype == "float32" and teacher_dtype in (torch.bfloat16, torch.float16):
            return torch.float32
        return teacher_dtype

    @property
    def needs_calibration(self) -> bool:
        """Whether channels must still be selected from teacher activations (RED init or teacher norm gains, and no
        `channel_indices` yet)."""
        return (self.init == "activation" or self.norm_init == "teacher") and self.channel_indices is None

    def resolve_hidden_size(self, teacher_hidden_size: int) -> int:
        """Return d_S for a teacher of width `teacher_hidden_size`, or raise if it is not a narrower width."""
        if self.target_hidden_size is not None:
            d_s = self.target_hidden_size
        else:
            d_s = int(round(self.width_ratio * teacher_hidden_size))
        if not 0 < d_s < teacher_hidden_size:
            raise ValueError(f"The student width must be between 1 and {teacher_hidden_size - 1} (the teacher's "
                             f"hidden_size is {teacher_hidden_size}), got {d_s}. Choose a smaller "
                             "target_hidden_size or a width_ratio in (0, 1).")
        return d_s

    def resolved_for(self, model: Any) -> "RedAdapterConfig":
        """A copy of this config completed for the teacher `model`, checked once before any expensive work:
        model type (must be registered), d_T and d_S, the target modules from the architecture registry, and
        the teacher's identity and config fingerprint."""
        if not hasattr(model, "config") or not hasattr(model.config, "model_type"):
            raise TypeError(f"Expected a transformers PreTrainedModel, got {type(model).__name__}.")
        model_type = model.config.model_type
        architecture = get_architecture(model_type)
        if self.model_type not in (None, model_type):
            raise ValueError(f"This adapter config was made for a {self.model_type!r} teacher, not {model_type!r}.")
        d_t = model.config.hidden_size
        d_s = self.resolve_hidden_size(d_t)
        if self.student_hidden_size not in (None, d_s):
            raise ValueError(f"This adapter config records student_hidden_size={self.student_hidden_size}, but "
                             f"its width setting gives {d_s} for this teacher (hidden_size {d_t}).")
        if self.channel_indices is not None:
            channels = self.channel_indices
            if len(channels) != d_s or len(set(channels)) != d_s or min(channels) < 0 or max(channels) >= d_t:
                raise ValueError(f"channel_indices must be {d_s} distinct channels in [0, {d_t}) for this width "
                                 f"(d_S = {d_s} of d_T = {d_t}), got {len(channels)} values"
                                 f"{'' if len(set(channels)) == len(channels) else ' with repeats'} in "
                                 f"[{min(channels)}, {max(channels)}]. Fix the width or the channel list.")
        targets = architecture.target_modules()
        if self.target_modules is not None and {k: sorted(v) for k, v in self.target_modules.items()} != {
                k: sorted(v) for k, v in targets.items()}:
            raise ValueError(f"target_modules={self.target_modules} differs from the {model_type!r} entry of the "
                             f"architecture registry ({targets}). Every module that reads or writes the residual "
                             "stream must be wrapped, or the student computes a different function; change "
                             "transformers_red/adapter/architectures.py instead (docs/architectures.md).")
        resolved = dataclasses.replace(self)
        resolved.model_type, resolved.teacher_hidden_size, resolved.student_hidden_size = model_type, d_t, d_s
        resolved.target_modules = targets
        resolved.teacher_name_or_path = self.teacher_name_or_path or getattr(model, "name_or_path", None) or None
        fingerprint, digest = teacher_config_fingerprint(model.config), teacher_weights_digest(model)
        if self.teacher_config_fingerprint not in (None, fingerprint):
            raise ValueError(f"This adapter was made for another teacher ({self.teacher_name_or_path!r}, config "
                             f"fingerprint {self.teacher_config_fingerprint}); this teacher's fingerprint is "
                             f"{fingerprint}. Load it onto the teacher it was trained from.")
        if self.teacher_weights_digest not in (None, digest):
            raise ValueError(f"This adapter was made for a teacher with other weights (same config, "
                             f"{self.teacher_name_or_path!r}; weights digest {self.teacher_weights_digest}): load it "
                             "onto the teacher it was trained from.")
        resolved.teacher_config_fingerprint, resolved.teacher_weights_digest = fingerprint, digest
        return resolved

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `red_adapter_config.json` into `save_directory` (atomically)."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, ADAPTER_CONFIG_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, revision: str | None = None,
                        token: str | bool | None = None) -> "RedAdapterConfig":
        """Read `red_adapter_config.json` from a folder or a Hub repo id (downloaded through huggingface_hub)."""
        from .remote import adapter_folder

        directory = adapter_folder(directory, revision=revision, token=token)
        path = os.path.join(directory, ADAPTER_CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {ADAPTER_CONFIG_NAME} in {directory!s}: is it a folder written by "
                                    "RedModel.save_pretrained?")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path} has unknown fields {sorted(unknown)}; was it written by a newer "
                             "transformers_red?")
        return cls(**data)
