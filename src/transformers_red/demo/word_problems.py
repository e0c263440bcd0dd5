"""Multi-step arithmetic word problems in English, with a controllable number of reasoning steps K.

The task the real-LLM reasoning teacher (:mod:`transformers_red.resources.smollm2`) is fine-tuned on. A
person starts with some objects and then K events change the count (finds / buys / loses / gives away /
doubles ...); the question asks for the final count. The worked answer writes one equation per event, each
starting from the previous line's result, and ends with a GSM8K-style final line ``#### N``::

    Question: Mia has 8 marbles. Then she finds 5 more marbles. Then she gives 3 marbles to a friend.
    How many marbles does Mia have now?
    Answer:
     8 + 5 = 13
    13 - 3 = 10
    #### 10

Solving it needs the K steps in order: every intermediate count depends on all earlier events, and a step
whose result is wrong makes every later one wrong. Problems are generated procedurally from a seed, so the
fine-tune never sees a held-out problem (training and held-out problems come from different seed streams).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = [
    "STEPS",
    "WordProblem",
    "generate_word_problem",
    "generate_word_problems",
    "generate_mixed_word_problems",
    "parse_final_answer",
    "evaluate_word_problems",
]

STEPS = range(1, 7)  # reasoning-step counts K the teacher is trained on
MAX_COUNT = 99  # every count, start and intermediate, lies in 0..MAX_COUNT
_FINAL = re.compile(r"####\s*(-?\d+)")

_NAMES = ("Mia", "Noah", "Emma", "Liam", "Ava", "Lucas", "Zoe", "Omar", "Sara", "Ben", "Lena", "Ivan", "Nina",
          "Tom", "Ana", "Raj", "Yuki", "Eli", "Maya", "Leo")
_PRONOUN = {"Mia": "she", "Emma": "she", "Ava": "she", "Zoe": "she", "Sara": "she", "Lena": "she", "Nina": "she",
            "Ana": "she", "Yuki": "she", "Maya": "she"}
_OBJECTS = ("marbles", "apples", "stickers", "coins", "books", "pencils", "cards", "shells", "stamps", "cookies")
_ADD = ("finds {n} more {obj}", "buys {n} more {obj}", "gets {n} {obj} from a friend", "wins {n} {obj}")
_SUB = ("gives {n} {obj} to a friend", "loses {n} {obj}", "sells {n} {obj}", "gives away {n} {obj}")
_DOUBLE = ("doubles the number of {obj}",)


@dataclass(frozen=True)
class WordProblem:
    """One problem: ``prompt`` (ends with ``"Answer:\\n"``), ``target`` (the worked answer with its
    ``#### N`` line, no end-of-sequence token), ``answer`` (N), ``steps`` (K), ``values`` (the start
    count and the K intermediate results)."""

    prompt: str
    target: str
    answer: int
    steps: int
    values: tuple[int, ...]


def _event(rng: random.Random, count: int) -> tuple[str, str, int]:
    """One event valid for ``count``: (phrase template, equation, new count), the count kept in range."""
    kinds = []
    if count + 1 <= MAX_COUNT:
        kinds.append("+")
    if count >= 1:
        kinds.append("-")
    if 1 <= count <= 30:  # doubling stays mental arithmetic
        kinds.append("*")
    kind = rng.choice(kinds)
    if kind == "*":
        return rng.choice(_DOUBLE), f"{count} * 2 = {2 * count}", 2 * count
    if kind == "+":
        n = rng.randint(1, min(9, MAX_COUNT - count))
        return rng.choice(_ADD).replace("{n}", str(n)), f"{count} + {n} = {count + n}", count + n
    n = rng.randint(1, min(9, count))
    return rng.choice(_SUB).replace("{n}", str(n)), f"{count} - {n} = {count - n}", count - n


def generate_word_problem(rng: random.Random, steps: int) -> WordProblem:
    """One problem with ``steps`` (K >= 1) events, drawn from ``rng``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    name = rng.choice(_NAMES)
    pronoun = _PRONOUN.get(name, "he")
    obj = rng.choice(_OBJECTS)
    count = rng.randint(2, 30)
    values = [count]
    sentences, equations = [f"{name} has {count} {obj}."], []
    for _ in range(steps):
        phrase, equation, count = _event(rng, count)
        sentences.append(f"Then {pronoun} {phrase.replace('{obj}', obj)}.")
        equations.append(equation)
        values.append(count)
    question = " ".join(sentences) + f" How many {obj} does {name} have now?"
    prompt = f"Question: {question}\nAnswer:\n"
    target = "\n".join(equations) + f"\n#### {count}"
    return WordProblem(prompt=prompt, target=target, answer=count, steps=steps, values=tuple(values))


def generate_word_problems(n: int, steps: int, seed: int = 0) -> list[WordProblem]:
    """``n`` problems with exactly ``steps`` events; deterministic given (``steps``, ``seed``)."""
    rng = random.Random(f"red-word-problems/{seed}/{steps}")
    return [generate_word_problem(rng, steps) for _ in range(n)]


def generate_mixed_word_problems(n: int, steps: Sequence[int] | range = STEPS, seed: int = 0) -> list[WordProblem]:
    """``n`` problems whose K is drawn uniformly from ``steps``; deterministic given the arguments."""
    steps = list(steps)
    rng = random.Random(f"red-word-problems-mixed/{seed}")
    return [generate_word_problem(rng, rng.choice(steps)) for _ in range(n)]


def parse_final_answer(text: str) -> int | None:
    """The integer after the first ``####`` in ``text`` (a generated worked answer), or None."""
    match = _FINAL.search(text)
    return int(match.group(1)) if match else None


def evaluate_word_problems(model, tokenizer, problems: Iterable[WordProblem], batch_size: int = 64,
                           return_outputs: bool = False):
    """Greedy exact match of the final ``#### N``, per K: ``{steps: accuracy}``.

    Problems are batched by K (similar lengths). Each continuation may run to the reference target's token
    count plus 8 and stops at the tokenizer's eos. With ``return_outputs=True`` returns
    ``(accuracy, [(problem, generated_text, correct), ...])`` in input order.
    """
    from .chain_task import greedy_generate

    problems = list(problems)
    was_training = model.training
    model.eval()
    by_steps: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(problems):
        by_steps[p.steps].append(i)
    generated: list[str] = [""] * len(problems)
    try:
        for k in sorted(by_steps):
            idx = by_steps[k]
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                limit = max(len(tokenizer(problems[i].target)["input_ids"]) for i in chunk) + 8
                texts = greedy_generate(model, tokenizer, [problems[i].prompt for i in chunk], limit)
                for i, text in zip(chunk, texts):
                    generated[i] = text
    finally:
        model.train(was_training)
    correct = [parse_final_answer(t) == p.answer for t, p in zip(generated, problems)]
    accuracy = {k: sum(correct[i] for i in idx) / len(idx) for k, idx in sorted(by_steps.items())}
    if return_outputs:
        return accuracy, list(zip(problems, generated, correct))
    return accuracy
