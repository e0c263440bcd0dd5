"""`transformers-red plan`: per-GPU memory of a distillation run, estimated from the teacher's config alone
(no weights are loaded; see `transformers_red.training.memory_plan` for the formula)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from ..adapter.architectures import CLONE_TERMS
from ..loading import load_config
from ..training.memory_plan import (
    DEFAULT_LOSS_CHUNK_SIZE,
    ENGINES,
    LOGIT_PATHS,
    estimate_memory,
)
from . import SUBCOMMANDS
from .flags import normalise_flags

HELP = SUBCOMMANDS["plan"]
# torch's dtype names (as `distill --dtype` and `eval --dtype` spell them) -> memory_plan's; the short names too
_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `transformers-red plan`."""
    p = argparse.ArgumentParser(prog="transformers-red plan", description=HELP)
    p.add_argument("--teacher", required=True,
                   help="A folder with config.json, a config.json file, 'smollm2', or a hub id in the local cache.")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--width_ratio", type=float, default=0.5, help="d_S / d_T (default 0.5).")
    group.add_argument("--target_hidden_size", type=int, default=None, help="d_S directly.")
    p.add_argument("--gpus", type=int, default=1, help="Data-parallel processes in all (default 1).")
    p.add_argument("--engine", default="ddp", choices=list(ENGINES),
                   help="ddp, fsdp (FSDP2), zero2 or zero3 (DeepSpeed); default ddp.")
    p.add_argument("--per_device_train_batch_size", type=int, default=8,
                   help="Sequences per GPU per micro-batch (default 8).")
    p.add_argument("--max_length", type=int, default=2048, help="Tokens per sequence (default 2048).")
    p.add_argument("--dtype", default="bfloat16", choices=list(_DTYPES), help="Teacher / activation dtype.")
    # the names plan had before it took the trainer's, still accepted (hidden from --help)
    p.add_argument("--micro_batch_size", type=int, dest="per_device_train_batch_size", help=argparse.SUPPRESS)
    p.add_argument("--seq_len", type=int, dest="max_length", help=argparse.SUPPRESS)
    p.add_argument("--loss_chunk_size", type=int, default=DEFAULT_LOSS_CHUNK_SIZE,
                   help="RedConfig.loss_chunk_size (default: chosen from V and the width, as the trainer does).")
    p.add_argument("--logit_loss_from", default="auto", choices=list(LOGIT_PATHS),
                   help="RedConfig.logit_loss_from (default auto = hidden_states: no (B, T, V) tensor).")
    p.add_argument("--clone_terms", nargs="*", default=list(CLONE_TERMS),
                   help="RedConfig.clone_terms (none: clone_weight=0); default all.")
    p.add_argument("--activation_checkpointing", action="store_true", help="Recompute student layers in backward.")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Micro-batches per optimizer step (> 1 holds the formed student weights through the step).")
    p.add_argument("--form_student_weights", default="auto", choices=["auto", "per_step", "per_forward"],
                   help="RedConfig.form_student_weights (default auto).")
    p.add_argument("--share_projections", action="store_true", help="RedAdapterConfig.share_projections.")
    p.add_argument("--json", action="store_true", help="Print the estimate as JSON instead of the table.")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(normalise_flags(argv))
    config = load_config(args.teacher)
    plan = estimate_memory(config, width_ratio=args.width_ratio, target_hidden_size=args.target_hidden_size,
                           gpus=args.gpus, engine=args.engine,
                           micro_batch_size=args.per_device_train_batch_size, seq_len=args.max_length,
                           dtype=_DTYPES[args.dtype],
                           loss_chunk_size=args.loss_chunk_size, logit_loss_from=args.logit_loss_from,
                           clone_terms=tuple(args.clone_terms),
                           activation_checkpointing=args.activation_checkpointing,
                           share_projections=args.share_projections,
                           gradient_accumulation_steps=args.gradient_accumulation_steps,
                           held_weights=args.form_student_weights != "per_forward")
    print(json.dumps(plan.to_dict(), indent=1) if args.json else plan.table())
    return 0
