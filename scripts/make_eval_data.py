#!/usr/bin/env python
"""Generate the offline evaluation data shipped in `src/transformers_red/evaluation/tasks/data/`.

Nothing here is hand-written or downloaded: every record is produced, with fixed seeds, from

* reasoning-gym's `gsm_symbolic` (GSM8K-style word problems with worked answers ending in `#### N`),
* reasoning-gym's `chain_sum` (multi-term additions/subtractions; the worked steps are computed here),
* the Python standard library's reference documentation (`pydoc_data.topics`): a 4-way multiple-choice
  "which section is this paragraph from?" task.

Usage:
    python scripts/make_eval_data.py                 # (re)write the files and data/manifest.json
    python scripts/make_eval_data.py --check         # regenerate in memory, compare with the shipped files

Each `make_*` function is deterministic for a given seed. `pydoc_data.topics` changes between Python minor
versions and reasoning-gym's generators between its releases, so the manifest records both; `--check` only
compares files whose sources match the running interpreter / packages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import random
import re
import sys
from typing import Any

SEED = 1234
N_TEST = 200
N_TRAIN = 20
DATA_DIR = pathlib.Path(__file__).resolve().parents[1] / "src" / "transformers_red" / "evaluation" / "tasks" / "data"

GSM_SUFFIX = " Give the result as your final answer. Do not include units."
TRAIN_SEED_OFFSET = 1_000_000  # reasoning-gym seeds item i with Random(seed + i): keep the splits apart
GSM_TRAIN_TEMPLATES = 10  # templates reserved for the few-shot split; the test split never uses them
CHAIN_SUM_CONFIG = dict(min_terms=3, max_terms=6, min_digits=1, max_digits=3)
PYDOC_MIN_CHARS, PYDOC_MAX_CHARS = 200, 700

Record = dict[str, Any]
_CODE = re.compile(r"::=|>>>|\.\.\. |^\s*[-+*] |^\s*\d+\. |\+--|==>|\bdef |\breturn |\(self", re.M)


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("make_eval_data.py needs reasoning-gym: pip install reasoning-gym") from err
    return reasoning_gym


# --------------------------------------------------------------------------------------------- gsm_symbolic
def make_gsm_symbolic(seed: int = SEED, n_test: int = N_TEST, n_train: int = N_TRAIN,
                      n_train_templates: int = GSM_TRAIN_TEMPLATES) -> dict[str, list[Record]]:
    """GSM8K-format problems from reasoning-gym `gsm_symbolic`: {"train": [...], "test": [...]}.

    Each record: question (reasoning-gym's instruction suffix removed, as GSM8K questions have none),
    answer (`metadata["answer_cot"]`, ending in `#### N` exactly like GSM8K; like GSM8K's, every N is an
    integer: the few problems with a decimal answer are skipped), template (reasoning-gym's
    generator index), seed, index. Train (few-shot) and test use disjoint templates: `n_train_templates`
    templates, drawn with `seed`, are reserved for train.
    """
    rg = _reasoning_gym()
    probe = rg.create_dataset("gsm_symbolic", size=5000, seed=seed)
    templates = sorted(set(probe.task_indices))
    train_templates = set(random.Random(seed).sample(templates, n_train_templates))

    def collect(split_seed: int, n: int, keep) -> list[Record]:
        ds = rg.create_dataset("gsm_symbolic", size=20 * n + 1000, seed=split_seed)
        out, seen = [], set()
        for idx in range(len(ds)):
            template = int(ds.task_indices[idx])
            if not keep(template):
                continue
            item = ds[idx]
            question = item["question"]
            if question.endswith(GSM_SUFFIX):
                question = question[: -len(GSM_SUFFIX)]
            answer = item["metadata"]["answer_cot"].strip()
            # GSM8K's format: the final line is exactly "#### <integer>" and it is the dataset's answer.
            if not re.fullmatch(r"-?[0-9]+", item["answer"]) or not answer.endswith(f"\n#### {item['answer']}"):
                continue
            if question in seen:
                continue
            seen.add(question)
            out.append({"question": question, "answer": answer, "template": template,
                        "seed": split_seed, "index": idx})
            if len(out) == n:
                return out
        raise RuntimeError(f"gsm_symbolic: only {len(out)} of {n} usable problems")

    return {"train": collect(seed + TRAIN_SEED_OFFSET, n_train, lambda t: t in train_templates),
            "test": collect(seed, n_test, lambda t: t not in train_templates)}


# --------------------------------------------------------------------------------------------- chain_sum
def chain_sum_steps(expression: str) -> tuple[str, int]:
    """Worked left-to-right solution of "a + b - c ..." in GSM8K's format, and its value."""
    tokens = expression.split()
    if len(tokens) < 3 or len(tokens) % 2 == 0:
        raise ValueError(f"not a chain sum: {expression!r}")
    value = int(tokens[0])
    lines = []
    for op, term in zip(tokens[1::2], tokens[2::2]):
        if op not in "+-":
            raise ValueError(f"unexpected operator {op!r} in {expression!r}")
        new = value + int(term) if op == "+" else value - int(term)
        lines.append(f"{value} {op} {term} = {new}")
        value = new
    lines.append(f"#### {value}")
    return "\n".join(lines), value


def make_chain_sum(seed: int = SEED, n_test: int = N_TEST, n_train: int = N_TRAIN) -> dict[str, list[Record]]:
    """Multi-step sums from reasoning-gym `chain_sum` (3-6 terms, 1-3 digits): {"train", "test"}.

    Each record: question ("What is 57 + 87 - 70?"), answer (one line per step, then `#### N`), expression,
    seed, index. The value is checked against reasoning-gym's own answer; train avoids test expressions.
    """
    rg = _reasoning_gym()

    def collect(split_seed: int, n: int, exclude: set[str]) -> list[Record]:
        ds = rg.create_dataset("chain_sum", size=4 * n + 100, seed=split_seed, **CHAIN_SUM_CONFIG)
        out, seen = [], set(exclude)
        for idx, item in enumerate(ds):
            expression = item["metadata"]["expression"]
            if expression in seen:
                continue
            answer, value = chain_sum_steps(expression)
            if str(value) != item["answer"]:
                raise RuntimeError(f"chain_sum: {expression} = {value}, reasoning-gym says {item['answer']}")
            seen.add(expression)
            out.append({"question": f"What is {expression}?", "answer": answer, "expression": expression,
                        "seed": split_seed, "index": idx})
            if len(out) == n:
                return out
        raise RuntimeError(f"chain_sum: only {len(out)} of {n} distinct problems")

    test = collect(seed, n_test, set())
    return {"train": collect(seed + TRAIN_SEED_OFFSET, n_train, {r["expression"] for r in test}), "test": test}


# --------------------------------------------------------------------------------------------- pydoc topics
def _pydoc_blocks() -> dict[str, list[str]]:
    """Section title -> its blank-line-separated blocks (raw). A topic's title is its first line."""
    from pydoc_data.topics import topics

    blocks: dict[str, list[str]] = {}
    for key in sorted(topics):
        text = topics[key].strip()
        title = text.split("\n", 1)[0].strip()
        blocks.setdefault(title, []).extend(text.split("\n\n")[1:])
    return blocks


def pydoc_related_sections() -> dict[str, set[str]]:
    """Section title -> other sections sharing text with it (one chapter includes another's subsections).

    Such a section is never a distractor: it could be a right answer too.
    """
    owners: dict[str, set[str]] = {}
    for title, blocks in _pydoc_blocks().items():
        for block in blocks:
            normalised = " ".join(block.split())
            if len(normalised) >= 80:
                owners.setdefault(normalised, set()).add(title)
    related: dict[str, set[str]] = {title: set() for title in _pydoc_blocks()}
    for titles in owners.values():
        for title in titles:
            related[title] |= titles - {title}
    return related


def pydoc_sections() -> dict[str, list[str]]:
    """Section title -> prose paragraphs (whitespace normalised) of `pydoc_data.topics`.

    Kept: paragraphs of PYDOC_MIN_CHARS..PYDOC_MAX_CHARS characters that are prose (one indentation, no
    grammar, code, list or table markers, not a heading, starting upper-case and ending in ".", ":" or ")")
    and occur under one title only.
    """
    sections: dict[str, list[str]] = {}
    for title, blocks in _pydoc_blocks().items():
        paragraphs = sections.setdefault(title, [])
        for block in blocks:
            lines = [line for line in block.split("\n") if line.strip()]
            if not lines or any(set(line.strip()) <= set("*=-~^") for line in lines):
                continue  # a heading
            if len({len(line) - len(line.lstrip()) for line in lines}) > 1 or _CODE.search(block):
                continue  # code, grammar, tables or lists: prose is wrapped at one indentation
            paragraph = " ".join(block.split())
            if not paragraph[0].isupper() or paragraph[-1] not in ".:)":
                continue
            if PYDOC_MIN_CHARS <= len(paragraph) <= PYDOC_MAX_CHARS and paragraph not in paragraphs:
                paragraphs.append(paragraph)
    owners: dict[str, int] = {}
    for paragraphs in sections.values():
        for p in paragraphs:
            owners[p] = owners.get(p, 0) + 1
    return {t: [p for p in ps if owners[p] == 1] for t, ps in sections.items()}


def make_pydoc_mc(seed: int = SEED, n_test: int = N_TEST, n_train: int = N_TRAIN,
                  n_choices: int = 4) -> dict[str, list[Record]]:
    """4-way multiple choice: which Python-reference section is a paragraph from? {"train", "test"}.

    Paragraphs are drawn round-robin over sections (seeded order) so no long section dominates; the three
    distractors are drawn at random from the other section titles that share no text with the right one;
    choices are shuffled. Each record: paragraph,
    choices (list of titles), gold (index of the right title), section.
    """
    sections = pydoc_sections()
    related = pydoc_related_sections()
    titles = sorted(sections)
    rng = random.Random(seed)
    queues = {t: rng.sample(sections[t], len(sections[t])) for t in titles}
    order = rng.sample(titles, len(titles))
    picked: list[tuple[str, str]] = []
    while len(picked) < n_test + n_train and any(queues.values()):
        for title in order:
            if queues[title] and len(picked) < n_test + n_train:
                picked.append((title, queues[title].pop()))
    if len(picked) < n_test + n_train:
        raise RuntimeError(f"pydoc: only {len(picked)} usable paragraphs")
    records = []
    for title, paragraph in picked:
        wrong = [t for t in titles if t != title and t not in related[title]]
        choices = rng.sample(wrong, n_choices - 1) + [title]
        rng.shuffle(choices)
        records.append({"paragraph": paragraph, "choices": choices, "gold": choices.index(title),
                        "section": title})
    return {"test": records[:n_test], "train": records[n_test:]}


# --------------------------------------------------------------------------------------------- files
def build_all(seed: int = SEED, n_test: int = N_TEST, n_train: int = N_TRAIN) -> dict[str, list[Record]]:
    """File name -> records, for every shipped file."""
    files = {}
    for name, make in (("gsm_symbolic", make_gsm_symbolic), ("chain_sum", make_chain_sum),
                       ("pydoc_mc", make_pydoc_mc)):
        splits = make(seed=seed, n_test=n_test, n_train=n_train)
        for split in ("train", "test"):
            files[f"{name}_{split}.jsonl"] = splits[split]
    return files


def to_jsonl(records: list[Record]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def sources() -> dict[str, str]:
    """What the content depends on: Python minor version (pydoc) and reasoning-gym's version."""
    from importlib.metadata import version

    return {"python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "reasoning_gym": version("reasoning-gym")}


def _source_of(file_name: str) -> str:
    return "python" if file_name.startswith("pydoc") else "reasoning_gym"


def write_all(out_dir: pathlib.Path = DATA_DIR, seed: int = SEED) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"generator": "scripts/make_eval_data.py", "seed": seed, "sources": sources(),
                                "files": {}}
    for name, records in build_all(seed).items():
        text = to_jsonl(records)
        (out_dir / name).write_text(text, encoding="utf-8")
        manifest["files"][name] = {"rows": len(records), "sha256": hashlib.sha256(text.encode()).hexdigest(),
                                   "source": _source_of(name)}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def check(out_dir: pathlib.Path = DATA_DIR) -> list[str]:
    """Regenerate in memory; return the names of files that differ (skipping those whose source differs)."""
    manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    here = sources()
    differing = []
    for name, records in build_all(manifest["seed"]).items():
        if manifest["sources"][_source_of(name)] != here[_source_of(name)]:
            print(f"skip {name}: generated with {_source_of(name)} {manifest['sources'][_source_of(name)]}, "
                  f"running {here[_source_of(name)]}")
            continue
        if (out_dir / name).read_text(encoding="utf-8") != to_jsonl(records):
            differing.append(name)
    return differing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DATA_DIR)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead")
    args = parser.parse_args(argv)
    if args.check:
        differing = check(args.out)
        print("differ: " + ", ".join(differing) if differing else "all files reproduce")
        return 1 if differing else 0
    manifest = write_all(args.out, args.seed)
    total = sum((args.out / n).stat().st_size for n in manifest["files"])
    for name, info in manifest["files"].items():
        print(f"{name}: {info['rows']} rows")
    print(f"{total / 1024:.0f} KiB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
