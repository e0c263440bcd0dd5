"""The `transformers-red` command line: one module per subcommand, dispatched from `main`.

Each subcommand module has `HELP` and `main(argv) -> int` (and, except `distill`, whose flags are RedConfig's
fields through TRL's parser, a `build_parser()`). Flags are spelled with underscores everywhere; the dashed
spellings are accepted too.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> its module under transformers_red.commands
SUBCOMMANDS = {"inspect": "inspect", "distill": "distill", "demo": "demo", "eval": "eval", "erank": "erank",
               "push": "push"}


def _module(name: str):
    return importlib.import_module(f".{SUBCOMMANDS[name]}", __name__)


def usage() -> str:
    lines = ["usage: transformers-red {" + ",".join(SUBCOMMANDS) + "} ...", "", "subcommands:"]
    lines += [f"  {name:<8} {_module(name).HELP}" for name in SUBCOMMANDS]
    lines += ["", "`transformers-red NAME -h` shows the flags of one subcommand."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        print(f"transformers-red: unknown subcommand {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return _module(argv[0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
