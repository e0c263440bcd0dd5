"""Where and in what precision the teacher passes made before `Trainer.__init__` run.

The channel statistics and the clone normalisers are teacher forwards made while the trainer is being built, before
Trainer would move the model to `args.device`. Left alone, a GPU user's teacher would calibrate on the CPU (hours for
an 8B model, while the other DDP ranks wait on rank 0). So the teacher is moved first, by Trainer's own rule, and the
passes run under the mixed precision the training steps will use, so the normalisers describe the activations the
clone term will see.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch


def _sharding_engine_requested(args: Any) -> bool:
    """DeepSpeed or FSDP, from the arguments or `accelerate launch`'s environment (the accelerator does not exist
    yet): those engines place (and partition) the model themselves."""
    launched = any(os.environ.get(k, "").lower() in ("1", "true")
                   for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"))
    return bool(args.deepspeed or args.fsdp or launched)


def place_on_training_device(model: Any, args: Any) -> None:
    """Move `model` to `args.device` where Trainer would (not under DeepSpeed / FSDP, not for a model dispatched
    over devices with a `hf_device_map`, not for bitsandbytes models, which cannot move); in place."""
    if _sharding_engine_requested(args) or getattr(model, "hf_device_map", None) is not None:
        return
    if getattr(model, "quantization_method", None) is not None or getattr(model, "is_loaded_in_4bit", False):
        return
    first = next(model.parameters(), None)
    if first is not None and first.device != args.device:
        model.to(args.device)


def training_autocast(args: Any):
    """The autocast context of the training steps (`bf16` / `fp16` mixed precision), else a null context."""
    if not (args.bf16 or args.fp16):
        return contextlib.nullcontext()
    return torch.autocast(args.device.type, dtype=torch.bfloat16 if args.bf16 else torch.float16)
