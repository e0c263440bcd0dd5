"""`transformers-red erank`: per-layer effective rank of one or more models on the same texts, side by side."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

from ..evaluation.erank import (
    compare_erank,
    format_erank_table,
    load_texts,
    plot_erank,
)
from . import SUBCOMMANDS
from .flags import normalise_flags

HELP = SUBCOMMANDS["erank"]


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `transformers-red erank`."""
    parser = argparse.ArgumentParser(prog="transformers-red erank", description=HELP)
    parser.add_argument("models", nargs="+",
                        help="Model folders (safetensors), hub ids where reachable, or 'smollm2'.")
    parser.add_argument("--text", default="builtin",
                        help="A text file (paragraphs separated by blank lines), 'builtin' (Python docs "
                             "paragraphs, default) or 'reasoning' (GSM-style worked problems, needs reasoning-gym).")
    parser.add_argument("--labels", nargs="+", default=None, help="One label per model (default: folder names).")
    parser.add_argument("--num_texts", type=int, default=None, help="Use only the first N paragraphs.")
    parser.add_argument("--max_length", type=int, default=512, help="Tokens per text (default 512).")
    parser.add_argument("--max_tokens", type=int, default=4096, help="Tokens pooled per layer (default 4096).")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--dtype", default=None, help="float32 (recommended for eRank), bfloat16, ...")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: where the model loads).")
    parser.add_argument("--output", default=None, help="Save a plot of eRank per layer (PNG; needs matplotlib).")
    parser.add_argument("--json", default=None, help="Write {label: [eRank per layer]} and the settings as JSON.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`transformers-red erank MODEL [MODEL ...] --text FILE|builtin [--labels ...] [--output plot.png] [--json F]`."""
    args = build_parser().parse_args(normalise_flags(argv))
    if args.labels is not None and len(args.labels) != len(args.models):
        raise SystemExit(f"error: {len(args.labels)} labels for {len(args.models)} models.")
    try:
        texts = load_texts(args.text, args.num_texts)
        eranks = compare_erank(args.models, texts, args.labels, max_length=args.max_length,
                               max_tokens=args.max_tokens, batch_size=args.batch_size, dtype=args.dtype,
                               device=args.device)
    except (OSError, ValueError, ImportError) as err:
        raise SystemExit(f"error: {err}") from err
    print(format_erank_table(eranks))
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"erank": eranks, "text": args.text, "num_texts": len(texts),
                                    "max_length": args.max_length, "max_tokens": args.max_tokens}, indent=1) + "\n",
                        encoding="utf-8")
        print(f"eRank values written to {args.json}")
    if args.output:
        try:
            plot_erank(eranks, args.output, title=f"Effective rank per layer ({args.text})")
        except ImportError as err:
            print(f"no plot: {err}", file=sys.stderr)
        else:
            print(f"plot written to {args.output}")
    return 0
