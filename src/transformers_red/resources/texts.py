"""Text every machine has, for calibration, eRank and generic distillation: no download, deterministic."""

from __future__ import annotations


def builtin_texts(n: int | None = None, min_chars: int = 200) -> list[str]:
    """Deterministic English paragraphs from ``pydoc_data.topics`` (stdlib).

    Topics are sorted by key and split on blank lines; stripped paragraphs with at
    least ``min_chars`` characters are kept. The content depends on the Python
    minor version (3.11 gives 787 paragraphs at the default ``min_chars``).

    Args:
        n: return only the first ``n`` paragraphs (all if ``None``).
        min_chars: minimum paragraph length in characters.
    """
    from pydoc_data.topics import topics

    texts = [
        p.strip()
        for key in sorted(topics)
        for p in topics[key].split("\n\n")
        if len(p.strip()) >= min_chars
    ]
    return texts if n is None else texts[:n]


def reasoning_texts(n: int, seed: int = 0, task: str = "gsm_symbolic") -> list[str]:
    """`n` GSM8K-style worked problems from reasoning-gym ("Question: ...\\nAnswer: <steps> #### N"), offline.

    Needs `pip install reasoning-gym` (in the `test` extra). Deterministic for a seed.
    """
    try:
        import reasoning_gym
    except ImportError as err:
        raise ImportError("reasoning_texts needs reasoning-gym: pip install reasoning-gym") from err
    dataset = reasoning_gym.create_dataset(task, size=n, seed=seed)
    texts = []
    for item in dataset:
        answer = item["metadata"].get("answer_cot") or item["answer"]
        texts.append(f"Question: {item['question']}\nAnswer: {answer}")
    return texts
