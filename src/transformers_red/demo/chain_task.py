"""A multi-step reasoning task family with a known number of composition steps, and a small teacher for it.

Variable-binding chains
-----------------------
A problem binds single-letter variables and asks for one of them; the model writes every intermediate value
(GSM8K-calculator style, one equation per step) and the final answer after ``#``::

    hops=2   prompt  e=1;d=e*2;s=d-1;?s
             target   => 1*2=2;2-1=1;#1
             text    e=1;d=e*2;s=d-1;?s => 1*2=2;2-1=1;#1<eos>     (format_example; <eos> = end marker)
    hops=3   h=8;f=h+1;g=f-1;x=g+1;?x => 8+1=9;9-1=8;8+1=9;#9
    hops=0   x=8;?x => #8                                            (the control task)

* The *hop count* ``h`` is the number of composition steps the answer needs: the queried variable is the
  end of a chain ``base -> v1 -> ... -> vh`` with ``vi = v(i-1) <op> c``; each step needs the value the
  previous one produced, so there are exactly ``h`` sequential compositions. ``h = 0`` is the control task:
  the query names the constant itself, a single copy with no composition (``u=4;?u => #4``).
* Operations: ``+c`` and ``-c`` (``c`` in 1..9) and ``*2``. Values stay in 0..``max_value`` (9 for the
  shipped task: every step is a one-digit fact, learnable by a small model in minutes); an operation that
  would leave the range is never drawn, so there is no wrap-around.
* Variable names are random distinct lowercase letters; the bindings are listed in chain order.
* Rationale styles (``rationale=``): ``"values"`` (default, ``5+4=9;``), ``"explicit"`` (``a=5+4=9;``),
  ``"compact"`` (``a=9;``). The final answer always follows the last ``#``.
* Distractors (``distractors=(min, max)``): unused constant bindings placed, shuffled, among the constants
  before the chain, so the base must be found by name (``z=3;o=5;a=o+4;?a``). Off by default: in our
  CPU-budget experiments (docs/reasoning_teacher.md) a 0.8M-parameter model did not learn name-based lookup
  in a 10-15 minute budget, while the distractor-free chains are solved almost perfectly.

Generation is deterministic for a seed (``random.Random`` seeded with a string, independent of
``PYTHONHASHSEED``). :func:`evaluate_model` scores greedy generations by exact match of the final ``#N``,
per hop count.

The embedded teacher (:func:`load_reasoning_teacher`) is a 4-layer LlamaForCausalLM trained from scratch
on this family by ``scripts/train_reasoning_teacher.py``; see ``docs/reasoning_teacher.md``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

__all__ = [
    "END_MARKER",
    "PAD_TOKEN",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "UNK_TOKEN",
    "TASK_CHARACTERS",
    "MAX_VALUE",
    "DISTRACTORS",
    "RATIONALE",
    "RATIONALES",
    "HOPS",
    "Problem",
    "generate_problem",
    "generate_problems",
    "generate_mixed_problems",
    "format_example",
    "parse_answer",
    "score_answer",
    "build_task_tokenizer",
    "greedy_generate",
    "evaluate_model",
    "reasoning_teacher_dir",
    "load_reasoning_teacher",
    "teacher_report",
]

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
END_MARKER = EOS_TOKEN  # the text that ends every training example (tokenised to the eos id)

# Characters of the task, plus a few spare punctuation marks (so slightly different formats still tokenise).
TASK_CHARACTERS = string.digits + string.ascii_lowercase + "=;?+-*#> " + "(),.:/\n"
# Defaults = the task the shipped teacher was trained on.
MAX_VALUE = 9  # every value, constant and intermediate, lies in 0..MAX_VALUE
DISTRACTORS = (0, 0)  # (min, max) unused constant bindings per problem
RATIONALE = "values"  # "7+5=12;" per step; see RATIONALES
RATIONALES = ("values", "explicit", "compact")
HOPS = range(0, 7)  # hop counts of the shipped teacher
_ANSWER_RE = re.compile(r"#(\d+)\s*$")


@dataclass(frozen=True)
class Problem:
    """One chain problem.

    ``prompt`` is what the model sees, ``target`` the step-by-step continuation it must produce (without the
    end marker), ``answer`` the value of the queried variable, ``hops`` the number of composition steps.
    ``chain`` names the variables from the base constant to the queried one (``len(chain) == hops + 1``) and
    ``values`` their values, so ``values[1:]`` are the intermediate results written in the rationale.
    """

    prompt: str
    target: str
    answer: int
    hops: int
    chain: tuple[str, ...] = ()
    values: tuple[int, ...] = ()

    @property
    def text(self) -> str:
        """The full training text, ``prompt + target + END_MARKER``."""
        return format_example(self)


def _step(rng: random.Random, value: int, max_value: int) -> tuple[str, int, int]:
    """Draw one operation valid for ``value``: returns (op, operand, result) with the result in range."""
    ops = []
    if value + 1 <= max_value:
        ops.append("+")
    if value - 1 >= 0:
        ops.append("-")
    if 1 <= value and value * 2 <= max_value:
        ops.append("*")
    op = rng.choice(ops)
    if op == "*":
        return op, 2, value * 2
    if op == "+":
        c = rng.randint(1, min(9, max_value - value))
        return op, c, value + c
    c = rng.randint(1, min(9, value))
    return op, c, value - c


def generate_problem(rng: random.Random, hops: int, distractors: tuple[int, int] = DISTRACTORS,
                     max_value: int = MAX_VALUE, rationale: str = RATIONALE) -> Problem:
    """One problem with ``hops`` composition steps, drawn from ``rng``.

    ``distractors`` is the (min, max) number of unused constant bindings, shuffled with the base constant
    before the derived bindings (default none: the hop-0 control is then a copy of the only constant).
    Values lie in 0..``max_value``. ``rationale`` is ``"values"`` (``7+5=12;`` per step), ``"explicit"``
    (``b=7+5=12;``) or ``"compact"`` (``b=12;``); the final answer follows ``#``.
    """
    lo, hi = distractors
    if hops < 0:
        raise ValueError(f"hops must be >= 0, got {hops}")
    if not 0 <= lo <= hi:
        raise ValueError(f"distractors must be (min, max) with 0 <= min <= max, got {distractors}")
    if rationale not in RATIONALES:
        raise ValueError(f"rationale must be one of {RATIONALES}, got {rationale!r}")
    if max_value < 2:
        raise ValueError(f"max_value must be >= 2, got {max_value}")
    n_distractors = rng.randint(lo, hi)
    n_vars = hops + 1 + n_distractors
    if n_vars > len(string.ascii_lowercase):
        raise ValueError(f"{hops} hops with {n_distractors} distractors need more than 26 variables")
    names = rng.sample(string.ascii_lowercase, n_vars)
    chain, others = names[: hops + 1], names[hops + 1 :]

    values = [rng.randint(0, max_value)]
    derived, steps = [], []
    for i in range(1, hops + 1):
        op, c, result = _step(rng, values[-1], max_value)
        derived.append(f"{chain[i]}={chain[i - 1]}{op}{c}")
        if rationale == "values":
            steps.append(f"{values[-1]}{op}{c}={result};")
        elif rationale == "explicit":
            steps.append(f"{chain[i]}={values[-1]}{op}{c}={result};")
        else:
            steps.append(f"{chain[i]}={result};")
        values.append(result)

    # All constants first (the base and the distractors, shuffled), then the derived bindings in chain order.
    constants = [f"{chain[0]}={values[0]}"] + [f"{v}={rng.randint(0, max_value)}" for v in others]
    rng.shuffle(constants)
    statements = constants + derived
    prompt = "".join(s + ";" for s in statements) + f"?{chain[-1]}"
    target = " => " + "".join(steps) + f"#{values[-1]}"
    return Problem(prompt=prompt, target=target, answer=values[-1], hops=hops, chain=tuple(chain),
                   values=tuple(values))


def generate_problems(n: int, hops: int, seed: int = 0, **task) -> list[Problem]:
    """``n`` problems with exactly ``hops`` composition steps; deterministic given (``hops``, ``seed``).

    ``task`` keywords (``distractors``, ``max_value``, ``rationale``) are passed to :func:`generate_problem`.
    """
    rng = random.Random(f"red-chain/{seed}/{hops}")
    return [generate_problem(rng, hops, **task) for _ in range(n)]


def generate_mixed_problems(n: int, hops: Sequence[int] | range = HOPS, seed: int = 0,
                            weights: Sequence[float] | None = None, **task) -> list[Problem]:
    """``n`` problems whose hop counts are drawn from ``hops`` (uniformly, or with relative ``weights``).

    For training; deterministic given the arguments. ``task`` keywords go to :func:`generate_problem`.
    """
    hops = list(hops)
    if weights is not None and len(weights) != len(hops):
        raise ValueError(f"{len(weights)} weights for {len(hops)} hop counts")
    rng = random.Random(f"red-chain-mixed/{seed}")
    drawn = [rng.choice(hops) for _ in range(n)] if weights is None else rng.choices(hops, weights, k=n)
    return [generate_problem(rng, h, **task) for h in drawn]


def format_example(problem: Problem) -> str:
    """The full training text: ``prompt + target + END_MARKER``."""
    return problem.prompt + problem.target + END_MARKER


def completion_columns(problems: Iterable[Problem]) -> dict[str, list[str]]:
    """Problems as TRL prompt-completion columns: ``{"prompt": [...], "completion": [target + END_MARKER, ...]}``."""
    problems = list(problems)
    return {"prompt": [p.prompt for p in problems], "completion": [p.target + END_MARKER for p in problems]}


# --------------------------------------------------------------------------- scoring
def parse_answer(generated_text: str) -> int | None:
    """The final answer ``N`` of a ``...#N`` continuation, or None when malformed.

    Text after the end marker is ignored; the continuation must end with ``#`` and digits (trailing
    whitespace allowed).
    """
    text = generated_text.split(END_MARKER, 1)[0]
    match = _ANSWER_RE.search(text)
    return int(match.group(1)) if match else None


def score_answer(generated_text: str, problem: Problem) -> bool:
    """Exact match of the final ``#N`` in ``generated_text`` (the continuation, or prompt + continuation)."""
    answer = parse_answer(generated_text)
    return answer is not None and answer == problem.answer


# --------------------------------------------------------------------------- tokenizer
def build_task_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` for the task (56 ids).

    Ids 0..3 are ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``, then one id per character of
    :data:`TASK_CHARACTERS` (digits, lowercase letters, ``=;?+-*#> ``, a few spare marks). A ``<bos>`` is
    prepended to every encoded sequence (``add_special_tokens=True``); no ``<eos>`` is appended (the training
    text carries it as :data:`END_MARKER`). Unknown characters map to ``<unk>``. Padding defaults to the
    left (for batched generation). ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip it.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in TASK_CHARACTERS:
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    return tok


# --------------------------------------------------------------------------- generation / evaluation
@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64) -> list[str]:
    """Greedy continuations of ``prompts`` (one batch, left padded), decoded without special tokens.

    Uses ``model.generate(do_sample=False)`` with the KV cache; generation stops at the tokenizer's eos (the
    end marker). (A hand-written greedy loop was measured no faster for these tiny models.)
    """
    device = next(model.parameters()).device
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    input_ids = enc["input_ids"].to(device)
    attention_mask = enc["attention_mask"].to(device)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    new = out[:, input_ids.shape[1]:]
    texts = []
    for row in new.tolist():
        if eos in row:
            row = row[: row.index(eos)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


@torch.no_grad()
def evaluate_model(model, tokenizer, problems: Iterable[Problem], batch_size: int = 128,
                   max_new_tokens: int | None = None, return_outputs: bool = False, show_progress: bool = False):
    """Greedy exact-match accuracy of the final ``#N``, per hop count: ``{hops: accuracy}``.

    Problems are batched by hop count (similar lengths, little padding). ``max_new_tokens`` defaults to the
    length in characters (= tokens of the task tokenizer) of the longest reference target of the batch plus
    9, enough for the reference rationale, the answer and the end marker. With ``return_outputs=True``
    returns ``(accuracy, outputs)`` where ``outputs`` lists
    ``(problem, generated_text, correct)`` in input order.
    """
    problems = list(problems)
    was_training = model.training
    model.eval()
    by_hops: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(problems):
        by_hops[p.hops].append(i)
    generated: list[str | None] = [None] * len(problems)
    chunks = [by_hops[h][start : start + batch_size] for h in sorted(by_hops)
              for start in range(0, len(by_hops[h]), batch_size)]
    try:
        for chunk in tqdm(chunks, desc="evaluating", unit="batch", disable=not show_progress, leave=False):
            limit = max_new_tokens
            if limit is None:
                limit = max(len(problems[i].target) for i in chunk) + 1 + 8
            texts = greedy_generate(model, tokenizer, [problems[i].prompt for i in chunk], limit)
            for i, text in zip(chunk, texts):
                generated[i] = text
    finally:
        model.train(was_training)
    correct = [score_answer(t, p) for t, p in zip(generated, problems)]
    accuracy = {}
    for hops in sorted(by_hops):
        idx = by_hops[hops]
        accuracy[hops] = sum(correct[i] for i in idx) / len(idx)
    if return_outputs:
        return accuracy, list(zip(problems, generated, correct))
    return accuracy


# --------------------------------------------------------------------------- embedded teacher
def reasoning_teacher_dir() -> Path:
    """The folder of the packaged teacher checkpoint (``transformers_red/demo/reasoning_teacher``)."""
    return Path(__file__).resolve().parent / "reasoning_teacher"


def load_reasoning_teacher(folder: str | Path | None = None, device: str | torch.device = "cpu",
                           dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` of the embedded chain-reasoning teacher, loaded offline, in eval mode.

    ``folder`` defaults to :func:`reasoning_teacher_dir`. The model is a ``LlamaForCausalLM`` read from
    safetensors with ``AutoModelForCausalLM.from_pretrained``; the tokenizer with ``AutoTokenizer``.
    Raises FileNotFoundError (with the rebuild command) when the checkpoint is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    packaged = folder is None
    folder = Path(folder) if folder is not None else reasoning_teacher_dir()
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.json")
               if not (folder / name).is_file()]
    if missing and not packaged:
        raise FileNotFoundError(f"{folder} is not a teacher folder with safetensors weights (missing: "
                                f"{', '.join(missing)}): save the teacher with save_pretrained (and its tokenizer).")
    if missing:
        raise FileNotFoundError(
            f"reasoning teacher checkpoint not found in {folder} (missing: {', '.join(missing)}). "
            "Rebuild it with `python scripts/train_reasoning_teacher.py` (about 10 minutes on CPU), or "
            "reinstall transformers_red with its package data."
        )
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kwargs).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


def weights_digest(model) -> str:
    """sha256 over the sorted state dict (float32 bytes): the `weights_sha256` of `training_report.json`."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def teacher_report(folder: str | Path | None = None) -> dict:
    """The ``training_report.json`` shipped with the teacher (settings, wall time, held-out accuracy)."""
    folder = Path(folder) if folder is not None else reasoning_teacher_dir()
    return json.loads((folder / "training_report.json").read_text())
