"""The docs cannot drift from the code.

* Every signature written in docs/api.md and docs/hub.md matches the real object's `inspect.signature`, and
  every name such a signature uses exists.
* Every `transformers-red` flag the docs (docs/*.md, README.md) show exists in that subcommand's parser, is spelled
  with underscores, and every synopsis lists all of its subcommand's flags.
* Every `__all__` of the package resolves, and every `transformers_red.x.y` named in the docs exists.

The convention (stated at the top of docs/api.md):

* A code span `name(p1, p2=default, *, p3=default, **kwargs)` (optionally `-> result`) is a signature: the
  parameters in their real order with their real names; a default, where one is written, equals the real one
  (`=...` hides it); `...` stands for parameters left out; `name(...)` names a callable without its parameters.
* `name` is `transformers_red.module.name`, a name in `transformers_red.__all__`, a name the package defines once
  (`EvaluationResult.card_results`), `Class.method`, `red.method` (a `RedModel`), `trainer.method` (a
  `RedDistillationTrainer`), or a bare method of the class of the last class signature, or of the class opening a
  list item (`- `RedModel`: ...`), above it under the same heading.
* Spans of other libraries' objects (`AutoModelForCausalLM.from_pretrained(...)`, `api.upload_folder(...)`) start
  with a name in FOREIGN below.
* A `transformers-red NAME ...` command (or `-m transformers_red.commands NAME ...`), in a fenced block or a code
  span, and a code span `NAME --flag ...` show flags of subcommand NAME.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import itertools
import pathlib
import pkgutil
import re
from dataclasses import dataclass

import pytest

import transformers_red
from transformers_red.adapter.model import RedModel
from transformers_red.commands import SUBCOMMANDS
from transformers_red.training.trainer import RedDistillationTrainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIGNATURE_DOCS = [ROOT / "docs" / "api.md", ROOT / "docs" / "hub.md"]
CLI_DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
# First names of spans that show other libraries' objects (checked by those libraries, not here).
FOREIGN = {"AutoModelForCausalLM", "AutoTokenizer", "ModelCard", "ModelCardData", "EvalResult", "HfApi", "api",
           "huggingface_hub", "transformers", "trl", "torch", "accelerate", "lm_eval", "config", "teacher_config",
           "np"}
INSTANCES = {"red": RedModel, "trainer": RedDistillationTrainer}

SPAN = re.compile(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)*)`(?!`)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
ITEM = re.compile(r"^(?P<star>\*{0,2})(?P<name>[A-Za-z_]\w*)?(?:=(?P<default>.+))?$", re.S)


# --------------------------------------------------------------------------------------------- the package
def package_modules() -> dict[str, object]:
    modules = {"transformers_red": transformers_red}
    for info in pkgutil.walk_packages(transformers_red.__path__, "transformers_red."):
        if info.name.endswith("__main__"):  # runs the command line when imported
            continue
        modules[info.name] = importlib.import_module(info.name)
    return modules


MODULES = package_modules()


def _definitions() -> dict[str, list[object]]:
    """Short name -> the package's module-level callables and modules of that name (where they are defined)."""
    found: dict[str, list[object]] = {}
    for module_name, module in MODULES.items():
        found.setdefault(module_name.rpartition(".")[2], []).append(module)
        for name, obj in vars(module).items():
            if callable(obj) and getattr(obj, "__module__", None) == module_name:
                found.setdefault(name, []).append(obj)
    return found


DEFINITIONS = _definitions()


def _resolve_dotted(parts: list[str], context: type | None) -> list[object]:
    """Objects a dotted name can mean (several for a bare name defined in several modules), [] for none."""
    head, rest = parts[0], parts[1:]
    if head == "transformers_red":
        obj: object = transformers_red
        for i, part in enumerate(rest):
            module = ".".join(["transformers_red", *rest[: i + 1]])
            if module in MODULES:  # a module before a same-named attribute (evaluation.perplexity)
                obj = MODULES[module]
            elif hasattr(obj, part):
                obj = getattr(obj, part)
            else:
                return []
        return [obj]
    if head in INSTANCES:
        starts = [INSTANCES[head]] if rest else []
    elif context is not None and not rest and callable(inspect.getattr_static(context, head, None)):
        starts = [getattr(context, head)]
    elif head in getattr(transformers_red, "__all__", ()):
        starts = [getattr(transformers_red, head)]
    else:
        starts = DEFINITIONS.get(head, [])
    found = []
    for obj in starts:
        for part in rest:
            if not hasattr(obj, part):
                break
            obj = getattr(obj, part)
        else:
            found.append(obj)
    return found


# --------------------------------------------------------------------------------------------- the docs
@dataclass
class Span:
    path: pathlib.Path
    line: int
    text: str
    section: int  # index of the heading the span is under
    leads_item: bool  # the span opens a list item (`- `Name`: ...`)

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: `{self.text}`"


def prose_spans(path: pathlib.Path) -> list[Span]:
    """Inline code spans outside fenced blocks, each with its line and the heading it is under."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), path.read_text())
    sections = list(itertools.accumulate(line.startswith("#") for line in text.split("\n")))
    spans = []
    for m in SPAN.finditer(text):
        line = text.count("\n", 0, m.start())
        line_start = text.rfind("\n", 0, m.start()) + 1
        leads = re.fullmatch(r"\s*- ", text[line_start: m.start()]) is not None
        spans.append(Span(path, line + 1, " ".join(m.group(1).split()), sections[line], leads))
    return spans


def _unquoted(text: str):
    """(index, character, bracket depth after it) of each character of `text` outside quotes."""
    depth, quote = 0, None
    for i, ch in enumerate(text):
        if quote or ch in "'\"":
            quote = None if ch == quote else (quote or ch)
            continue
        depth += (ch in "([{") - (ch in ")]}")
        yield i, ch, depth


def parse_signature(text: str) -> tuple[str, str] | None:
    """`name(params) -> result` -> (name, params); None when the span is not a call-shaped name."""
    m = re.match(r"[A-Za-z_][\w.]*\(", text)
    if not m:
        return None
    opening = m.end() - 1
    for i, ch, depth in _unquoted(text[opening:]):
        if depth == 0:
            rest = text[opening + i + 1:].strip()
            if rest and not rest.startswith("->"):
                return None  # `red.unload().save_pretrained`: a chain, not a signature
            return text[:opening], text[opening + 1: opening + i]
    return None


def _split_top_level(params: str) -> list[str]:
    cuts = [i for i, ch, depth in _unquoted(params) if ch == "," and depth == 0]
    pieces = [params[a + 1: b] for a, b in zip([-1, *cuts], [*cuts, len(params)])]
    return [p.strip() for p in pieces if p.strip()]


def real_parameters(obj: object) -> tuple[list[str], dict[str, object]]:
    """(`*`-marked parameter tokens in order, defaults) of a callable; `self` of a function read off its class
    is dropped."""
    signature = inspect.signature(obj)
    params = list(signature.parameters.values())
    if params and params[0].name in ("self", "cls") and inspect.isfunction(obj):
        params = params[1:]
    tokens, defaults, star = [], {}, False
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            tokens.append(f"*{p.name}")
            star = True
        elif p.kind is p.KEYWORD_ONLY and not star:
            tokens.append("*")
            star = True
        if p.kind is p.VAR_KEYWORD:
            tokens.append(f"**{p.name}")
        elif p.kind is not p.VAR_POSITIONAL:
            tokens.append(p.name)
        if p.default is not p.empty:
            defaults[p.name] = p.default
    return tokens, defaults


def _written_default(text: str, obj: object) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        module = inspect.getmodule(obj)
        namespace = {**vars(builtins), **(vars(module) if module else {})}
        head, *rest = text.split(".")
        if head not in namespace:
            raise AssertionError(f"default {text!r} is neither a literal nor a name of {module.__name__}") from None
        value = namespace[head]
        for part in rest:
            value = getattr(value, part)
        return value


def signature_problem(obj: object, params: str) -> str | None:
    """Why the written parameters do not match the object's signature (None when they do)."""
    if params.strip() == "...":
        return None
    try:
        tokens, defaults = real_parameters(obj)
    except (TypeError, ValueError):
        return f"{obj!r} has no signature to check"
    pattern, written = "^,", []
    for item in _split_top_level(params):
        if item == "...":
            pattern += "(?:[^,]+,)*"
            continue
        m = ITEM.match(item)
        if not m or (m["star"] and m["default"]) or not (m["name"] or m["star"] == "*"):
            return f"{item!r} is not a parameter (write name, name=default, *, *args or **kwargs)"
        token = m["star"] + (m["name"] or "")
        pattern += re.escape(token) + ","
        written.append(token)
        if m["default"] not in (None, "...") and m["name"]:
            if m["name"] not in defaults:
                return f"{m['name']} has no default in the code"
            expected = defaults[m["name"]]
            value = _written_default(m["default"], obj)
            if not (value is expected or (type(value) is type(expected) and value == expected)
                    or (isinstance(value, float) and value == expected)):
                return f"{m['name']}={m['default']}, but the code's default is {expected!r}"
    if not re.match(pattern + "$", "," + "".join(f"{t}," for t in tokens)):
        return f"written ({', '.join(written)}), the code has ({', '.join(tokens)})"
    return None


def _is_class(obj: object) -> bool:
    return inspect.isclass(obj) and getattr(obj, "__module__", "").startswith("transformers_red")


def signature_problems(path: pathlib.Path) -> list[str]:
    problems, context, section = [], None, None
    for span in prose_spans(path):
        if span.section != section:
            context, section = None, span.section
        parsed = parse_signature(span.text)
        name = parsed[0] if parsed else span.text
        if not re.fullmatch(r"[A-Za-z_][\w.]*", name):
            continue
        parts = name.split(".")
        if parts[0] in FOREIGN or parts[0] == "name" or (parts[0] in vars(builtins) and parts[0] not in DEFINITIONS):
            continue
        found = _resolve_dotted(parts, context)
        if not parsed:  # a bare name: a class opening a list item sets the context; other words may be anything
            if span.leads_item and len(found) == 1 and _is_class(found[0]):
                context = found[0]
            continue
        if not found:
            problems.append(f"{span.where()}: no such name in transformers_red")
            continue
        if len(found) == 1 and _is_class(found[0]):
            context = found[0]
        for obj in found:
            problem = signature_problem(obj, parsed[1])
            if problem:
                problems.append(f"{span.where()}: {problem}")
                break
    return problems


@pytest.mark.parametrize("path", SIGNATURE_DOCS, ids=lambda p: p.name)
def test_every_signature_in_the_docs_matches_the_code(path):
    problems = signature_problems(path)
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------- the command line
class _Parsed(BaseException):  # not an Exception: passes every `except Exception` on its way out
    pass


def subcommand_flags(name: str) -> set[str]:
    """Option strings of a subcommand's parser, whichever parser it builds: its first parse is intercepted."""
    import argparse

    seen = []
    original = argparse.ArgumentParser.parse_known_args

    def intercept(self, *args, **kwargs):
        seen.append(self)
        raise _Parsed

    argparse.ArgumentParser.parse_known_args = intercept
    try:
        importlib.import_module(f"transformers_red.commands.{name}").main([])
    except _Parsed:
        pass
    finally:
        argparse.ArgumentParser.parse_known_args = original
    assert seen, f"transformers-red {name} parsed no arguments"
    from trl import TrlParser

    # hidden aliases (help=SUPPRESS) are accepted but documented nowhere
    flags = {s for action in seen[0]._actions if action.help != argparse.SUPPRESS for s in action.option_strings}
    flags |= {"--debug"}  # the dispatcher's
    return flags | {"--config"} if isinstance(seen[0], TrlParser) else flags  # TrlParser reads --config itself


COMMAND = re.compile(r"(?:transformers-red|transformers_red\.commands)\s+(" + "|".join(SUBCOMMANDS) + r")\b(.*)")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


def _shown_commands(path: pathlib.Path) -> list[tuple[int, str, str]]:
    """(line, subcommand, the rest of the command) for every command the file shows."""
    found = []
    text = path.read_text()
    for fence in FENCE.finditer(text):
        first = text.count("\n", 0, fence.start()) + 1
        lines = fence.group(0).split("\n")
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            # shell continuation lines, and the indented lines of a usage synopsis
            while i + 1 < len(lines) and (line.rstrip().endswith("\\") or (
                    COMMAND.search(line) and lines[i + 1][:1].isspace() and lines[i + 1].lstrip().startswith("["))):
                i += 1
                line = line.rstrip().rstrip("\\") + " " + lines[i]
            i += 1
            for m in COMMAND.finditer(line.split(" #")[0]):
                found.append((first + start, m[1], re.split(r"&&|;|\s\|\s", m[2])[0]))
    for span in prose_spans(path):
        m = COMMAND.search(span.text) or re.match(r"(" + "|".join(SUBCOMMANDS) + r")(\s+--.*)", span.text)
        if m:
            found.append((span.line, m[1], m[2]))
    return found


@pytest.fixture(scope="module")
def parser_flags():
    return {name: subcommand_flags(name) for name in SUBCOMMANDS}


def test_every_flag_the_docs_show_exists_in_the_subcommand(parser_flags):
    problems, checked = [], 0
    for path in CLI_DOCS:
        for line, name, rest in _shown_commands(path):
            for flag in FLAG.findall(rest):
                checked += 1
                where = f"{path.relative_to(ROOT)}:{line}: transformers-red {name} {flag}"
                if "-" in flag[2:]:
                    problems.append(f"{where}: spell it with underscores")
                elif flag not in parser_flags[name]:
                    problems.append(f"{where}: not a flag of `transformers-red {name}`")
    assert checked > 50
    assert not problems, "\n".join(problems)


def test_flags_in_prose_are_spelled_with_underscores(parser_flags):
    """A lone `--flag-name` span whose underscore spelling is one of our flags (benchmarks' and other tools'
    flags are theirs to spell)."""
    ours = set().union(*parser_flags.values())
    problems = []
    for path in CLI_DOCS:
        for span in prose_spans(path):
            for flag in FLAG.findall(span.text) if span.text.startswith("--") else []:
                if "-" in flag[2:] and flag.replace("-", "_").replace("__", "--", 1) in ours:
                    problems.append(f"{span.where()}: spell {flag} with underscores")
    assert not problems, "\n".join(problems)


def test_every_synopsis_lists_every_flag(parser_flags):
    """A synopsis (`transformers-red NAME [--flag X] ...`) shows all of the subcommand's flags; `distill`'s says
    "every RedConfig flag" instead."""
    problems = []
    for path in CLI_DOCS:
        for line, name, rest in _shown_commands(path):
            if "[--" not in rest or "every RedConfig flag" in rest:
                continue
            ours = {f for f in parser_flags[name] if f.startswith("--") and "-" not in f[2:]} - {"--help", "--debug"}
            missing = sorted(ours - set(FLAG.findall(rest)))
            if missing:
                problems.append(f"{path.relative_to(ROOT)}:{line}: transformers-red {name} lacks {missing}")
    assert not problems, "\n".join(problems)


def test_dashed_spellings_of_our_flags_appear_nowhere_in_the_package(parser_flags):
    """Help texts, errors and docstrings name our flags as the parsers spell them (`--eval_results`)."""
    ours = {f for flags in parser_flags.values() for f in flags if "-" not in f[2:]}
    problems = []
    for path in sorted(pathlib.Path(transformers_red.__file__).parent.rglob("*.py")):
        if path.name == "flags.py":  # the one place that maps dashed spellings to ours
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for flag in FLAG.findall(line):
                if "-" in flag[2:] and "--" + flag[2:].replace("-", "_") in ours:
                    problems.append(f"{path.relative_to(ROOT)}:{number}: {flag}")
    assert not problems, "spell these with underscores:\n" + "\n".join(problems)


# --------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("module_name", sorted(MODULES))
def test_every_name_in_all_exists(module_name):
    module = MODULES[module_name]
    missing = [name for name in getattr(module, "__all__", []) if not hasattr(module, name)]
    assert not missing, f"{module_name}.__all__ names {missing}, which do not exist"


def test_every_dotted_package_name_in_the_docs_exists():
    """`transformers_red.x.y` anywhere in the docs (signature or not) is a module or an attribute."""
    problems = []
    for path in CLI_DOCS:
        for span in prose_spans(path):
            for name in re.findall(r"(?<![\w.])transformers_red(?:\.[A-Za-z_]\w*)+", span.text):
                if not _resolve_dotted(name.split("."), None):
                    problems.append(f"{span.where()}: {name} does not exist")
    assert not problems, "\n".join(problems)
