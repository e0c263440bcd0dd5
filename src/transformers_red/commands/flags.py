"""One flag style for every subcommand: underscores, as transformers, TRL and lm-eval spell them."""

from __future__ import annotations

from collections.abc import Sequence


def normalise_flags(argv: Sequence[str] | None) -> list[str] | None:
    """`--max-length 8` -> `--max_length 8`: dashed spellings, as typed from habit, are accepted.

    Only option names change (the part of `--name=value` before `=`); values and positionals are untouched.
    """
    if argv is None:
        return None
    out = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name, sep, value = token[2:].partition("=")
            token = "--" + name.replace("-", "_") + sep + value
        out.append(token)
    return out
