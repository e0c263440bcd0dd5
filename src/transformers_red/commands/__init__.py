"""The `transformers-red` command line: one module per subcommand, dispatched from `main`.

Each subcommand module has `HELP` (its line in `SUBCOMMANDS`), `build_parser()` and `main(argv) -> int`. Flags are
spelled with underscores everywhere; the dashed spellings are accepted too. A bad input prints `error: ...` and exits
with status 2; `--debug` (anywhere on the line) shows the traceback instead.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> one line of help; each lives in the module of its name under transformers_red.commands, which is
# imported only when that subcommand runs (so `transformers-red --help` imports no torch, transformers or TRL)
SUBCOMMANDS = {
    "inspect": "Report what compressing a teacher does at step 0 (shapes, eRank, spectra) for RED and random init.",
    "distill": "Distil a student (TRL's flags and YAML: ScriptArguments, ModelConfig and every RedConfig field).",
    "demo": "RED vs random-init students of the embedded chain-reasoning teacher, side by side.",
    "eval": "Evaluate a model with lm-evaluation-harness on offline (or hub) tasks.",
    "erank": "Per-layer eRank of one or more models side by side (table and PNG).",
    "push": "Upload a merged student with a RED model card to the Hugging Face Hub.",
    "plan": "Per-GPU memory estimate of a distillation run from the teacher's config (no weights loaded).",
}


def _module(name: str):
    return importlib.import_module(f".{name}", __name__)


def usage() -> str:
    lines = ["usage: transformers-red {" + ",".join(SUBCOMMANDS) + "} ...", "", "subcommands:"]
    lines += [f"  {name:<8} {text}" for name, text in SUBCOMMANDS.items()]
    lines += ["", "`transformers-red NAME -h` shows the flags of one subcommand."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        print(f"transformers-red: unknown subcommand {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        return _module(argv[0]).main(argv[1:])
    except SystemExit as stop:
        if not isinstance(stop.code, str):  # argparse's own exits (help: 0, usage error: 2)
            raise
        message = stop.code
    except (ValueError, TypeError, OSError, RuntimeError) as err:  # bad input, named by the code that found it
        if debug:
            raise
        message = f"error: {err}"
    print(message if message.startswith("error:") else f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    sys.exit(main())
