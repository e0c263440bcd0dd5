"""`transformers-red eval`: benchmark a (compressed) causal LM with lm-evaluation-harness (offline tasks ship with
the package)."""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence

from ..evaluation.lm_eval import (
    OFFLINE_TAG,
    OFFLINE_TASKS,
    _jsonable,
    _require_lm_eval,
    evaluate_compressed,
)
from . import SUBCOMMANDS
from .flags import normalise_flags

HELP = SUBCOMMANDS["eval"]


def _limit(value: str) -> int | float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError("--limit must be positive")
    return int(number) if number >= 1 and number.is_integer() else number


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `transformers-red eval`."""
    parser = argparse.ArgumentParser(prog="transformers-red eval", description=HELP)
    parser.add_argument("model", help="A saved model folder (safetensors), a hub id where reachable, or 'smollm2'.")
    parser.add_argument("--tasks", nargs="+", default=["red_gsm_symbolic"],
                        help=f"Task / tag names (default red_gsm_symbolic). Offline: {', '.join(OFFLINE_TASKS)}, "
                             f"{OFFLINE_TAG} (all three); with a hub: any lm-eval task, e.g. gsm8k arc_challenge.")
    parser.add_argument("--num_fewshot", type=int, default=None,
                        help="Override the tasks' shots (default: 5 for GSM-style tasks, 0 for multiple choice).")
    parser.add_argument("--limit", type=_limit, default=None,
                        help="Only the first N documents per task (or a fraction < 1). Recorded in the results.")
    parser.add_argument("--batch_size", default="8", help="Batch size, or 'auto'.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available).")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as saved).")
    parser.add_argument("--max_gen_toks", type=int, default=256, help="Generation budget (default 256).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for few-shot sampling etc. (default 0).")
    parser.add_argument("--output", default=None, help="Write the full results (table, card results, raw) as JSON.")
    parser.add_argument("--eval_results", default=None,
                        help="Write the card-ready results as JSON, for `transformers-red push --eval_results`.")
    parser.add_argument("--log_samples", action="store_true", help="Keep per-sample outputs in --output.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`transformers-red eval MODEL [--tasks ...] [--num_fewshot N] [--limit N] [--batch_size N] [--output F]`."""
    args = build_parser().parse_args(normalise_flags(argv))
    try:
        _require_lm_eval()
    except ImportError as err:
        raise SystemExit(f"error: {err}") from err
    batch_size: int | str = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        result = evaluate_compressed(args.model, tasks=args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                     batch_size=batch_size, device=device, max_gen_toks=args.max_gen_toks,
                                     dtype=args.dtype, log_samples=args.log_samples, random_seed=args.seed)
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        raise SystemExit(f"error: {err}") from err
    print(result.table)
    if args.limit is not None:
        print(f"(limit {args.limit}: scores on a subset of each task, not comparable to full runs)")
    if args.output:
        result.to_json(args.output)
        print(f"results written to {args.output}")
    if args.eval_results:
        path = pathlib.Path(args.eval_results)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.card_results(), indent=1, default=_jsonable) + "\n", encoding="utf-8")
        print(f"card results written to {args.eval_results}")
    return 0
