"""`transformers-red demo`: RED vs random-init students of the embedded chain-reasoning teacher, side by side
(the README's main command)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from ..demo.run import VARIANTS, format_demo, run_demo
from . import SUBCOMMANDS
from .flags import normalise_flags

HELP = SUBCOMMANDS["demo"]


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `transformers-red demo` (every one has a default: the README's main command has none)."""
    parser = argparse.ArgumentParser(prog="transformers-red demo", description=HELP)
    parser.add_argument("--teacher", default=None, help="Teacher folder (default: the embedded one).")
    parser.add_argument("--data", default=None, help="Train on this .txt/.jsonl file instead of generated problems.")
    parser.add_argument("--output_dir", default=None, help="Where results.json and plots go.")
    parser.add_argument("--width_ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=["red", "lrc40", "lrc1"], choices=list(VARIANTS))
    parser.add_argument("--eval_per_hop", type=int, default=50)
    parser.add_argument("--train_samples", type=int, default=4000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--step0", action="store_true", help="Also evaluate every student before training.")
    parser.add_argument("--no_plots", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the embedded teacher is too small to gain from more, and one "
                             "thread is steadier on a shared machine; 0 keeps torch's default).")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(normalise_flags(argv))
    if args.teacher is not None and not os.path.isdir(args.teacher):  # named as the flag, not as run_demo's argument
        raise SystemExit(f"error: --teacher {args.teacher} is not a folder.")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)  # this process is the command's own
    report = run_demo(teacher_dir=args.teacher, data=args.data, output_dir=args.output_dir,
                      width_ratio=args.width_ratio, steps=args.steps, seeds=tuple(args.seeds),
                      variants=tuple(args.variants),
                      eval_per_hop=args.eval_per_hop, train_samples=args.train_samples, batch_size=args.batch_size,
                      learning_rate=args.learning_rate, step0=args.step0, plots=not args.no_plots,
                      show_progress=not args.quiet)
    print(format_demo(report))
    return 0
