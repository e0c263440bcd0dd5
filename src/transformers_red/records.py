"""Writing measured results into the project's markdown records (`docs/results.md`), section by section.

A section is the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; benchmarks and examples replace
only their own section, so one run never disturbs another's numbers. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import os
import re
import tempfile


def update_marked_section(path: str | os.PathLike, name: str, text: str) -> None:
    """Replace the `name` section of the markdown file at `path` with `text` (appended if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if len(pattern.findall(old)) > 1:
        raise ValueError(f"{path} has more than one {begin} section; remove the duplicates first.")
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else f"{old.rstrip()}\n\n{block}\n".lstrip()
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".md")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, path)
