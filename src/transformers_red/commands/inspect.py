"""`transformers-red inspect`: what compressing a teacher does at step 0 (shapes, eRank, spectra) for RED and
random init."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from ..adapter.config import RedAdapterConfig
from ..loading import LoadError, load_model
from . import SUBCOMMANDS
from .flags import normalise_flags

HELP = SUBCOMMANDS["inspect"]


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `transformers-red inspect`."""
    p = argparse.ArgumentParser(prog="transformers-red inspect", description=HELP)
    p.add_argument("--teacher", default=None, help="Local folder, 'smollm2', or omitted for a tiny random Llama.")
    p.add_argument("--gguf_file", default=None, help="GGUF file name inside --teacher, if it is a GGUF folder.")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--width_ratio", type=float, default=0.5, help="d_S / d_T (default 0.5).")
    group.add_argument("--target_hidden_size", type=int, default=None, help="d_S directly.")
    p.add_argument("--inits", nargs="+", default=["activation", "random"],
                   choices=["activation", "random", "orthogonal"])
    p.add_argument("--calibration_samples", type=int, default=15, help="Calibration texts (paper: 15).")
    p.add_argument("--eval_texts", type=int, default=16, help="Held-out texts for eRank and perplexity.")
    p.add_argument("--max_length", type=int, default=256, help="Tokens per text at most.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="Also write the report as JSON here.")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(normalise_flags(argv))
    from ..evaluation.inspection import build_report, format_report
    from ..resources.texts import builtin_texts

    for name in ("eval_texts", "calibration_samples", "max_length"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be a positive number, got {getattr(args, name)}.")
    width = {"width_ratio": args.width_ratio} if args.target_hidden_size is None else {
        "target_hidden_size": args.target_hidden_size}
    try:
        config = RedAdapterConfig(**width, calibration_num_samples=args.calibration_samples,
                                  calibration_max_length=args.max_length, seed=args.seed)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    try:
        teacher, tokenizer = load_model(args.teacher, gguf_file=args.gguf_file, seed=args.seed)
    except LoadError as err:
        raise SystemExit(f"error: {err}") from err
    texts = builtin_texts()
    calibration, held_out = texts[: args.calibration_samples], texts[-args.eval_texts:]
    report = build_report(teacher, tokenizer, config, calibration, held_out, inits=tuple(args.inits),
                          max_length=args.max_length, show_progress_bar=not args.quiet)
    print(format_report(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0
